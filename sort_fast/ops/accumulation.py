"""What both implementations of the Grad-CAM cosine ops agree on: the dtype their sums
accumulate in (docs/ops.md, "The Triton kernels")."""
import torch


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32 (both backends)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
