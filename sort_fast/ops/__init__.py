"""Fused operators: each module holds one op (its kernels, autograd Function and functional entry)."""
