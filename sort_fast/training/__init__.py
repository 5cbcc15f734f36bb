"""Shared pieces of ``sort_fast.train`` and ``sort_fast.evaluate``: the typed configuration
and its flags, data order, training state, checkpoints, objectives, the evaluation routine,
plots and logs."""
from ..errors import CLIError
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, build_evaluate_parser, build_train_parser
from .data import DataOrder
from .eval_report import write_report
from .eval_result import EvalResult
from .evaluation import evaluate
from .metrics_table import format_table
from .objective import Objective, attention_alignment, gradcam_gradient
from .state import TrainState

__all__ = [
    "CLIError",
    "DataOrder",
    "EvalResult",
    "Objective",
    "TrainConfig",
    "TrainState",
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
