"""sort_fast: fused kernels and a trainer for SOrT (Sub-question Oriented Tuning)."""
from . import layout, metrics
from .losses import SOrTLoss, SOrTLossOutput
from .ops.contrastive_loss import (
    ContrastiveGradientLoss,
    contrastive_gradient_loss,
    gradcam_similarity,
)

__version__ = "0.1.0"

__all__ = [
    "ContrastiveGradientLoss",
    "SOrTLoss",
    "SOrTLossOutput",
    "contrastive_gradient_loss",
    "gradcam_similarity",
    "layout",
    "metrics",
    "__version__",
]
