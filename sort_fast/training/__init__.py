"""Shared pieces of ``sort_fast.train`` and ``sort_fast.evaluate``: flags, data order,
checkpoints, objectives, the evaluation routine, plots and logs."""
from .checkpoint import load_checkpoint, save_checkpoint
from ..errors import CLIError
from .config import build_evaluate_parser, build_train_parser
from .data import DataOrder
from .evaluation import EvalResult, evaluate, format_table, write_report
from .objective import Objective, attention_alignment, gradcam_gradient

__all__ = [
    "CLIError",
    "DataOrder",
    "EvalResult",
    "Objective",
    "attention_alignment",
    "build_evaluate_parser",
    "build_train_parser",
    "evaluate",
    "format_table",
    "gradcam_gradient",
    "load_checkpoint",
    "save_checkpoint",
    "write_report",
]
