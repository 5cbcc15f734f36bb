"""VQA models that produce the joint embedding SOrT differentiates."""
from .pythia import PythiaConfig, PythiaOutput, PythiaVQA, pythia_sizes

__all__ = ["PythiaConfig", "PythiaOutput", "PythiaVQA", "pythia_sizes"]
