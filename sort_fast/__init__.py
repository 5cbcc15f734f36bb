"""sort_fast: fused kernels and a trainer for SOrT (Sub-question Oriented Tuning)."""
from . import layout, metrics
from .gradcam import GradCAM
from .losses import SOrTLoss, SOrTLossOutput
from .ops.contrastive_loss import (
    ContrastiveGradientLoss,
    contrastive_gradient_loss,
    gradcam_similarity,
)
from .ops.head_gradcam import head_gradcam

__version__ = "0.1.0"

__all__ = [
    "ContrastiveGradientLoss",
    "GradCAM",
    "SOrTLoss",
    "SOrTLossOutput",
    "contrastive_gradient_loss",
    "gradcam_similarity",
    "head_gradcam",
    "layout",
    "metrics",
    "__version__",
]
