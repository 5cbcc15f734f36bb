"""VQA models that produce the joint embedding SOrT differentiates: the interface the trainer
depends on (docs/models.md) and its implementations (docs/vlm.md for the decoder)."""
from typing import Any, Dict

from .interface import ModelSpec, VQAModel, VQAOutput
from .llava import LlavaOutput, LlavaVQA, LlavaVQAConfig
from .pythia import PythiaConfig, PythiaOutput, PythiaVQA, pythia_sizes

__all__ = ["ModelSpec", "VQAModel", "VQAOutput", "PythiaConfig", "PythiaOutput", "PythiaVQA",
           "pythia_sizes", "LlavaVQAConfig", "LlavaOutput", "LlavaVQA", "MODEL_CONFIGS",
           "model_kind"]

#: the configuration class of every model kind a checkpoint's ``model_kind`` can name
MODEL_CONFIGS: Dict[str, type] = {"pythia": PythiaConfig, "llava": LlavaVQAConfig}


def model_kind(config: Any) -> str:
    """The ``MODEL_CONFIGS`` key of a model configuration."""
    return next(k for k, cls in MODEL_CONFIGS.items() if isinstance(config, cls))
