"""``python -m sort_fast.evaluate CHECKPOINT|RUN_DIR``: evaluate a trained model.

Computes on the validation groups (those of training unless data flags say otherwise) the
consistency quadrants, accuracies, Grad-CAM ranking metrics and grounding, with the same
routine training uses (:func:`sort_fast.training.evaluation.evaluate`), and writes
``metrics.json``, ``table1.md`` and PNG plots.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .data import Vocab
from .errors import CLIError
from .training.checkpoint import MODEL_KEYS, load_checkpoint, model_from_checkpoint
from .training.config import EVAL_DIR, build_evaluate_parser, run_command
from .training.data import load_val_data
from .training.distributed import resolve_device
from .training.eval_report import write_report
from .training.evaluation import evaluate, load_hat
from .training.logs import setup_logging

__all__ = ["main", "evaluate_checkpoint"]

PROG = "python -m sort_fast.evaluate"


def evaluate_checkpoint(args) -> Dict[str, Any]:
    """Evaluates ``args.checkpoint`` (a checkpoint file or the run folder holding
    ``checkpoint.pt``) as the flags say; returns the metrics."""
    if Path(args.checkpoint).is_dir():
        args.checkpoint = str(Path(args.checkpoint) / "checkpoint.pt")
        if not Path(args.checkpoint).is_file():
            raise CLIError(f"{Path(args.checkpoint).parent} holds no checkpoint.pt: is it a "
                           "run folder (the trainer's --out)?")
    state = load_checkpoint(args.checkpoint, MODEL_KEYS)
    model = model_from_checkpoint(state, args.checkpoint)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    log = setup_logging(None)
    data = load_val_data(args, state["source"], Vocab(state["vocab"]),
                         Vocab(state["answer_vocab"]), model.config.feature_dim)
    device = resolve_device(args.device, 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model.to(device)
    log.info("evaluating %s (%s, step %d) on %d validation groups", args.checkpoint,
             state["method"], state["step"], len(data.val))
    result = evaluate(model, data.val, batch_groups=args.batch_groups, device=device,
                      naive=args.autograd_reference, answer_vocab=data.answer_vocab,
                      hat_maps=load_hat(args.hat_dir, data.val),
                      templates=getattr(data.val, "templates", None))
    table = write_report(result, out, method=state["method"],
                         extra={"step": state["step"], "checkpoint": str(args.checkpoint)},
                         plots=args.plots)
    log.info("wrote metrics.json, table1.md and plots to %s", out)
    print(table, flush=True)
    return result.metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_command(PROG, evaluate_checkpoint, build_evaluate_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
