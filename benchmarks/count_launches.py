"""Kernel-like operators of one default-size trainer step, counted at PyTorch's dispatcher on
the CPU, split by phase, with the launch overhead they would cost on a GPU.

Run::

    python benchmarks/count_launches.py                 # the trainer's defaults, fp32
    python benchmarks/count_launches.py --amp bf16      # under bf16 autocast
    python benchmarks/count_launches.py --foreach       # Adamax with foreach=True

The step is :func:`sort_fast.training.static_step.train_step` on the trainer's first batch
(``python -m sort_fast.train`` defaults: synthetic benchmark, 64 groups, ``--loss sort``,
gradient clipping, Adamax). Counted: every operator that reaches the dispatcher and is not a
view or a bare allocation (:class:`~sort_fast.training.op_census.OpCensus`); a ``sort_fast::``
custom operator counts once (on a GPU the loss forward is 2 Triton launches, its backward 1).
On the CPU the LSTM is decomposed into per-time-step operators that cuDNN runs as one call
(the ``forward: LSTM`` row; its backward is counted in ``backward``). The GPU estimate assumes
one launch per counted operator at ``--us-per-launch`` microseconds (5 us: the CPU-side cost
of a PyTorch eager launch on a recent GPU), the overhead CUDA graphs remove.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Dict, List, Optional, Sequence

import torch

from sort_fast.data import collate_groups
from sort_fast.models import PythiaVQA
from sort_fast.training import Objective
from sort_fast.training.config import build_train_parser
from sort_fast.training.data import DataOrder, load_train_data, model_config
from sort_fast.training.op_census import OpCensus
from sort_fast.training.static_step import train_step

PHASES = ("forward", "forward: LSTM", "gradcam", "loss", "backward", "optimizer")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def count_step(amp: str = "none", foreach: bool = False,
               train_flags: Sequence[str] = ()) -> OpCensus:
    """The census of the second trainer step (the first allocates the optimizer state)."""
    args = build_train_parser().parse_args(list(train_flags))
    torch.manual_seed(args.seed)
    data = load_train_data(args)
    model = PythiaVQA(model_config(args, data)).train()
    order = DataOrder(len(data.train), args.batch_groups, args.seed)
    batch = collate_groups([data.train[i] for i in order.indices(0)])
    objective = Objective(args.loss, lambda_reasoning=args.lambda_reasoning,
                          lambda_sub=args.lambda_sub, lambda_irrelevant=args.lambda_irrelevant,
                          margin=args.margin, lambda_attention=args.lambda_attention,
                          naive=args.autograd_reference)
    optimizer = torch.optim.Adamax(model.parameters(), lr=args.lr, foreach=foreach or None)
    census = OpCensus()

    def enter(phase: str):
        return lambda *_: setattr(census, "phase", phase)

    hooks = [model.register_forward_hook(enter("gradcam")),
             model.question_encoder.lstm.register_forward_pre_hook(enter("forward: LSTM")),
             model.question_encoder.lstm.register_forward_hook(enter("forward"))]
    if objective.sort_loss is not None:
        hooks.append(objective.sort_loss.register_forward_pre_hook(enter("loss")))
    autocast = (torch.autocast("cpu", dtype=AMP[amp]) if amp != "none"
                else contextlib.nullcontext())
    for counted in (False, True):
        with census if counted else contextlib.nullcontext():
            census.phase = "forward"
            train_step(model, batch, objective, optimizer, grad_clip=args.grad_clip,
                       autocast=autocast, mark=lambda phase: setattr(census, "phase", phase))
    for hook in hooks:
        hook.remove()
    return census


def table(census: OpCensus, us_per_launch: float) -> List[Dict[str, object]]:
    """One row per phase and a total: operators, and the launch overhead in ms."""
    rows: List[Dict[str, object]] = []
    for phase in PHASES:
        n = census.kernels(phase)
        rows.append({"phase": phase, "ops": n, "overhead_ms": n * us_per_launch / 1e3})
    total = census.kernels()
    rows.append({"phase": "total", "ops": total, "overhead_ms": total * us_per_launch / 1e3})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amp", choices=("none", *AMP), default="none")
    parser.add_argument("--foreach", action="store_true",
                        help="Adamax(foreach=True): one operator per update for all tensors")
    parser.add_argument("--us-per-launch", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=0, help="also list the N commonest ops")
    args = parser.parse_args(argv)
    census = count_step(args.amp, args.foreach)
    print(f"one trainer step (amp {args.amp}, Adamax foreach={args.foreach}), "
          f"{args.us_per_launch:g} us per launch")
    print(f"{'phase':<16}{'ops':>7}{'GPU launch ms':>15}")
    for row in table(census, args.us_per_launch):
        print(f"{row['phase']:<16}{row['ops']:>7}{row['overhead_ms']:>15.2f}")
    if args.top:
        by_op: Dict[str, int] = {}
        for (_, op), n in census.ops.items():
            by_op[op] = by_op.get(op, 0) + n
        for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {op:<40}{n:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
