"""sort_fast: fused kernels and a trainer for SOrT (Sub-question Oriented Tuning)."""
from . import layout, metrics

__version__ = "0.1.0"

__all__ = ["layout", "metrics", "__version__"]
