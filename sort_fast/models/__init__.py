"""VQA models that produce the joint embedding SOrT differentiates: the interface the trainer
depends on (docs/models.md) and its implementations."""
from .interface import ModelSpec, VQAModel, VQAOutput
from .pythia import PythiaConfig, PythiaOutput, PythiaVQA, pythia_sizes

__all__ = ["ModelSpec", "VQAModel", "VQAOutput", "PythiaConfig", "PythiaOutput", "PythiaVQA",
           "pythia_sizes"]
