"""Fused operators: each module holds one op (its ``torch.library`` custom ops with fake
implementations and registered autograd, and its functional entry); the Triton kernels of an
op live beside it in ``<op>_kernels.py``, imported only when used (docs/ops.md)."""
import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None
