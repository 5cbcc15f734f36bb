"""``python -m sort_fast.train``: train a Pythia-style VQA model with SOrT or a baseline loss.

Without arguments it trains full SOrT on the embedded synthetic benchmark (a few minutes on a
laptop CPU) and prints the evaluation table. See ``--help`` for every flag. Multi-process:
``torchrun --nproc_per_node=K -m sort_fast.train ...`` (each process takes a disjoint shard of
every step's groups; ``DistributedDataParallel`` averages the gradients; rank 0 writes the
outputs).

A trainer holds a lock on its ``--out`` folder (a second one there is refused). SIGINT or
SIGTERM ends the current step, saves the checkpoint and prints the command that resumes the
run (exit 128 + the signal number); a second signal stops at once.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .models import PythiaVQA
from .training.checkpoint import (MODEL_KEYS, TRAINING_KEYS, load_checkpoint, lock_run_dir,
                                  model_from_checkpoint, remove_stale_temp_files, rng_state,
                                  save_checkpoint, set_rng_state)
from .errors import CLIError, Interrupted
from .training.config import (EVAL_DIR, METHOD_NAMES, build_train_parser, command_line,
                              explicit_flags, run_command)
from .training.data import (DataOrder, Datasets, StepBatchSampler, load_train_data,
                            make_loader, model_config)
from .training.distributed import (DistContext, average_over_processes, close_distributed,
                                   gather_objects, init_distributed, wrap_model)
from .training.evaluation import evaluate, format_table, load_hat, write_report
from .training.fingerprint import check_fingerprint, data_fingerprint
from .training.logs import JsonLog, setup_logging
from .training.objective import Objective

__all__ = ["main", "train", "TrainResult"]

PROG = "python -m sort_fast.train"
CHECKPOINT = "checkpoint.pt"
# the report a finished run writes (and the evaluator, into EVAL_DIR), besides the plots
REPORT = ("table1.md", "metrics.json")
# what a fresh start (not --resume) removes of an earlier run in the same --out, the checkpoint
# first (a fresh start killed before its first save then leaves nothing to resume), before the
# new run writes anything
RUN_OUTPUTS = (CHECKPOINT, "log.jsonl", "train.log", *REPORT)
# flags that change the trajectory: a resumed run must use the checkpoint's values
TRAJECTORY_FLAGS = (
    "seed", "batch_groups", "loss", "lambda_reasoning", "lambda_sub", "lambda_irrelevant",
    "margin", "lambda_attention", "lr", "warmup_steps", "grad_clip", "hidden_dim", "joint_dim",
    "dropout", "naive", "init", "synthetic_seed", "synthetic_train_groups", "introspect",
    "vqa_questions", "vqa_annotations", "features", "amp", "synthetic_design", "image_glimpses",
    "input_ablation",
)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# flags about this invocation, never taken from a checkpoint's stored config
RUN_CONTROL_FLAGS = ("out", "resume", "overwrite", "explicit", "plots")


@dataclasses.dataclass
class TrainResult:
    """The trained ``model`` (this process's copy) and the final validation ``metrics``
    (``None`` on ranks > 0, which do not evaluate)."""

    model: PythiaVQA
    metrics: Optional[Dict[str, Any]]


def _adopt_stored_flags(args: argparse.Namespace, stored: Dict[str, Any]) -> None:
    """``--resume`` continues the stored run: every flag not given on this command line takes
    the checkpoint's value; given flags that would change the training trajectory must match
    it (all mismatches in one message)."""
    given = set(getattr(args, "explicit", ()))
    defaults = build_train_parser()
    trained = {name: stored.get(name, defaults.get_default(name)) for name in TRAJECTORY_FLAGS}
    changed = [f"--{name.replace('_', '-')} {value!r} (this run: {getattr(args, name)!r})"
               for name, value in trained.items()
               if name in given and value != getattr(args, name)]
    if changed:
        raise CLIError("cannot resume: the checkpoint was trained with " + ", ".join(changed)
                       + "; leave these flags out to continue with the checkpoint's values")
    for name, value in stored.items():
        if name not in given and name not in RUN_CONTROL_FLAGS and hasattr(args, name):
            setattr(args, name, value)


def _build_model(args: argparse.Namespace, data: Datasets,
                 resume: Optional[Dict[str, Any]]) -> PythiaVQA:
    """A fresh model, the weights of ``--init`` (whose vocabulary must fit), or for a resumed
    run the checkpoint's model (``--init`` is not read again: its file may be gone)."""
    if resume is not None:
        return model_from_checkpoint(resume, Path(args.out) / CHECKPOINT)
    if args.init is None:
        return PythiaVQA(model_config(args, data))
    state = load_checkpoint(args.init, MODEL_KEYS)
    if state["vocab"] != data.vocab.tokens or state["answer_vocab"] != data.answer_vocab.tokens:
        raise CLIError(f"--init {args.init}: its vocabulary differs from this data's")
    return model_from_checkpoint(state, args.init)


def _warmup(warmup_steps: int):
    """Linear warm-up from 0 over ``warmup_steps``, then constant (a schedule that does not
    depend on the run's length, so a resumed run with more steps continues the same curve)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def compiled_step(objective: Objective):
    """``objective`` under ``torch.compile``: the model's forward (its LSTM included, through
    Dynamo's RNN support), the closed-form Grad-CAM and the loss in one graph."""
    compiled = torch.compile(objective)

    def step(model: PythiaVQA, batch):
        with torch._dynamo.config.patch(allow_rnn=True):
            return compiled(model, batch)

    return step


def _postfix(parts: Dict[str, float], groups_per_s: float) -> str:
    """The progress bar's text: the latest loss parts and the throughput."""
    return " ".join(f"{k}={v:.3g}" for k, v in parts.items()) + f" {groups_per_s:.0f} grp/s"


@contextlib.contextmanager
def _catch_signals() -> Iterator[List[int]]:
    """While in the block, SIGINT and SIGTERM are appended to the yielded list (the training
    loop saves and stops at the end of its step); a second one raises KeyboardInterrupt.
    Signal handlers exist only in the main thread: elsewhere nothing is caught."""
    caught: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handle(signum: int, frame: Any) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _finished_report(out: Path, step: int, plots: bool) -> Optional[Dict[str, Any]]:
    """``metrics.json`` of a run that finished at ``step``, if its whole report was written
    (``table1.md`` and, with ``plots``, every plot); ``None`` for a partial report, which the
    run then writes again."""
    if plots:
        from .training.plots import CURVES, PLOTS  # imports matplotlib

        if not all((out / name).exists() for name in (*PLOTS, CURVES)):
            return None
    if not all((out / name).exists() for name in REPORT):
        return None
    try:
        report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("step") == step else None


def _remove_run(out: Path) -> None:
    """Removes an earlier run's outputs from ``out`` (the checkpoint first), and the report the
    evaluator wrote into its default folder there."""
    from .training.plots import CURVES, PLOTS  # imports matplotlib

    for name in (*RUN_OUTPUTS, *PLOTS, CURVES):
        (out / name).unlink(missing_ok=True)
    for name in (*REPORT, *PLOTS):
        (out / EVAL_DIR / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # absent, or holding files of the user's
        (out / EVAL_DIR).rmdir()


def _finite_weights(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one host sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


@contextlib.contextmanager
def _run_folder(args: argparse.Namespace, ctx: DistContext) -> Iterator[Path]:
    """Checks ``--out`` against ``--resume``/``--overwrite`` and, on rank 0, holds the folder's
    lock for the block, removes temporary files of processes that died while writing and, for
    a fresh start, the earlier run's outputs."""
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not (args.resume or args.overwrite):
        raise CLIError(f"{ckpt_path} exists: pass --resume to continue that run, --overwrite "
                       "to start afresh, or another --out")
    if args.resume and not ckpt_path.exists():
        raise CLIError(f"--resume: {ckpt_path} does not exist")
    if not ctx.is_main:
        yield out
        return
    out.mkdir(parents=True, exist_ok=True)
    with lock_run_dir(out):
        remove_stale_temp_files(out)
        if not args.resume:
            _remove_run(out)
        yield out


def train(args: argparse.Namespace) -> TrainResult:
    """Runs training as the flags (of :func:`build_train_parser`) say."""
    ctx = init_distributed(args.device, args.threads)
    try:
        with _run_folder(args, ctx) as out:
            return _train(args, ctx, out)
    finally:
        close_distributed(ctx)


def _train(args: argparse.Namespace, ctx: DistContext, out: Path) -> TrainResult:
    ckpt_path = out / CHECKPOINT
    log = setup_logging(out / "train.log" if ctx.is_main else None, quiet=not ctx.is_main)
    jsonl = JsonLog(out / "log.jsonl")
    resume = None
    if args.resume:
        resume = load_checkpoint(ckpt_path, TRAINING_KEYS)
        _adopt_stored_flags(args, resume["config"])

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    data = load_train_data(args)
    assert data.train is not None
    fingerprint = data_fingerprint(args, data)
    if resume is not None:
        if "data_fingerprint" in resume:
            check_fingerprint(resume["data_fingerprint"], fingerprint, ckpt_path)
        else:
            log.warning("%s has no data fingerprint (written by an older version): this run's "
                        "data is not compared with the data it was trained on", ckpt_path)
    hat_maps = load_hat(args.hat_dir, data.val) if ctx.is_main else None
    order = DataOrder(len(data.train), args.batch_groups, args.seed)
    if order.batch_groups < ctx.world_size:
        raise CLIError(f"--batch-groups {order.batch_groups} is smaller than the "
                       f"{ctx.world_size} processes")
    total = args.max_steps or args.epochs * order.steps_per_epoch
    model = _build_model(args, data, resume).to(ctx.device)
    optimizer = torch.optim.Adamax(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(args.warmup_steps))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
    objective = Objective(args.loss, lambda_reasoning=args.lambda_reasoning,
                          lambda_sub=args.lambda_sub, lambda_irrelevant=args.lambda_irrelevant,
                          margin=args.margin, lambda_attention=args.lambda_attention,
                          naive=args.naive)
    method = METHOD_NAMES[args.loss]
    log.info("%s on %d train / %d val groups (%s data, loaded in %.1fs); %d parameters; "
             "device %s x%d; %d steps of %d groups (%d per epoch)", method, len(data.train),
             len(data.val), data.source["kind"], time.perf_counter() - t0,
             sum(p.numel() for p in model.parameters()), ctx.device, ctx.world_size, total,
             order.batch_groups, order.steps_per_epoch)

    step = 0
    if resume is not None:
        order.check(resume["data"])
        if len(resume["rng"]) != ctx.world_size:
            raise CLIError(f"cannot resume: the checkpoint was written by {len(resume['rng'])} "
                           f"process(es), this run has {ctx.world_size}")
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if "scaler" in resume:
            scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"][ctx.rank])
        step = int(resume["step"])
    finished = step >= total
    # a finished run whose report is partial (killed while writing it) evaluates again
    report = _finished_report(out, step, args.plots) if finished and ctx.is_main else None
    if resume is not None:
        if ctx.is_main:
            jsonl.truncate_after(step, drop_eval_at_step=finished and report is None)
        log.info("resumed from %s at step %d", ckpt_path, step)
    saved_step = step if resume is not None else None  # the step of the checkpoint on disk

    def kept() -> str:
        return (f"the checkpoint of step {saved_step} is kept" if saved_step is not None else
                "no checkpoint was written")

    def save() -> None:
        nonlocal saved_step
        if not _finite_weights(model):  # every rank: they hold the same weights
            raise CLIError(f"the weights are not finite after step {step} (a non-finite "
                           f"gradient); {kept()}; try a lower --lr")
        rngs = gather_objects(rng_state(), ctx)  # collective: every rank takes part
        if not ctx.is_main:
            saved_step = step
            return
        try:
            save_checkpoint({
                "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rngs, "data": order.state(step),
                "scaler": scaler.state_dict(),
                "config": {k: v for k, v in vars(args).items() if k != "explicit"},
                "model_config": dataclasses.asdict(model.config),
                "vocab": data.vocab.tokens, "answer_vocab": data.answer_vocab.tokens,
                "source": data.source, "method": method, "data_fingerprint": fingerprint},
                ckpt_path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            reason = next(iter(str(e).splitlines()), type(e).__name__)
            raise CLIError(f"cannot write {ckpt_path} ({reason}): the disk may be full; the "
                           "previous checkpoint is kept") from None
        saved_step = step

    def stop_signal(caught: List[int], sync_point: bool) -> int:
        """The signal to stop on after this step (0: none). Processes agree on it at
        ``sync_point`` steps (one collective), so that every rank stops at the same step."""
        if not ctx.distributed:
            return caught[0] if caught else 0
        return max(gather_objects(caught[0] if caught else 0, ctx)) if sync_point else 0

    def run_eval():
        return evaluate(model, data.val, batch_groups=args.batch_groups, device=ctx.device,
                        naive=args.naive, answer_vocab=data.answer_vocab, hat_maps=hat_maps,
                        templates=getattr(data.val, "templates", None))

    bar = tqdm(total=total, initial=step, desc=method, unit="step", dynamic_ncols=True,
               disable=None if ctx.is_main else True, file=sys.stderr)
    step_loss = compiled_step(objective) if args.compile else objective
    autocast = (torch.autocast(ctx.device.type, dtype=AMP_DTYPES[args.amp]) if args.amp != "none"
                else contextlib.nullcontext())
    pending: List[Tuple[int, Dict[str, Any], Dict[str, torch.Tensor]]] = []
    train_model = wrap_model(model, ctx)
    batches = iter(make_loader(
        data.train, StepBatchSampler(order, step, total, ctx.rank, ctx.world_size),
        workers=args.workers, pin_memory=ctx.device.type == "cuda"))

    def flush() -> None:
        """Reads the pending steps' loss parts, averaged over the processes, from the device
        (one host sync; every process calls it at the same steps), checks them and writes
        their log lines."""
        if not pending:
            return
        names = list(pending[0][2])
        values = average_over_processes(torch.stack([torch.stack([parts[n].float() for n in names])
                                                     for _, _, parts in pending]), ctx).tolist()
        for (step_done, record, _), row in zip(pending, values):
            parts = dict(zip(names, row))
            if not math.isfinite(parts["loss"]):
                raise CLIError(f"the loss is not finite at step {step_done}; {kept()}; try a "
                               "lower --lr")
            # fp16's gradient scaler skips a step with an inf gradient itself
            if not math.isfinite(parts.get("grad_norm", 0.0)) and not scaler.is_enabled():
                raise CLIError(f"the gradient is not finite at step {step_done} (its loss is "
                               f"finite); {kept()}; try a lower --lr")
            if ctx.is_main:
                jsonl.write({**record, **parts, "groups_per_s": record["groups_per_s"]})
        if ctx.is_main:
            bar.set_postfix_str(_postfix(parts, record["groups_per_s"]), refresh=False)
        pending.clear()

    start = step
    groups_seen, t_train = 0, time.perf_counter()
    with _catch_signals() as caught:
        while step < total:
            train_model.train()
            batch = next(batches).to(ctx.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss, parts = step_loss(train_model, batch)
            scaler.scale(loss).backward()  # DDP averages the gradients over the processes
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                    args.grad_clip).detach()
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            groups_seen += order.batch_groups
            pending.append((step, {"event": "train", "step": step, "epoch": order.epoch(step - 1),
                                   "lr": lr,
                                   "groups_per_s": groups_seen / (time.perf_counter() - t_train)},
                            parts))
            if ctx.is_main:
                bar.update(1)
            eval_due = args.eval_every and step % args.eval_every == 0 and step < total
            save_now = (args.save_every and step % args.save_every == 0) or step == total
            stop = stop_signal(caught, step % args.log_every == 0 or save_now)
            if step % args.log_every == 0 or eval_due or save_now or stop:
                flush()  # before a save: a non-finite loss never reaches a checkpoint
            if eval_due and ctx.is_main:
                metrics = run_eval().metrics
                jsonl.write({"event": "eval", "step": step, **metrics})
                log.info("step %d: consistency %.2f%%, reasoning acc %.2f%%, MP@1 %.2f, MRR %.2f",
                         step, 100 * metrics["consistency"], 100 * metrics["reasoning_accuracy"],
                         100 * metrics["mp1"], 100 * metrics["mrr"])
            if save_now or stop:
                save()
            if stop:
                bar.close()
                prog = (PROG if not ctx.distributed else
                        f"torchrun --nproc_per_node={ctx.world_size} -m sort_fast.train")
                raise Interrupted(stop, step, command_line(
                    prog, build_train_parser(), args, resume=True, overwrite=False))
    bar.close()
    if ctx.is_main and groups_seen:
        log.info("trained %d steps in %.1fs", step - start, time.perf_counter() - t_train)
    if not ctx.is_main:
        return TrainResult(model, None)
    if report is not None:
        log.info("the run in %s had already finished (step %d); its report is kept", out, step)
        print(format_table(report["metrics"], report["method"]), flush=True)
        return TrainResult(model, report["metrics"])
    result = run_eval()
    jsonl.write({"event": "eval", "step": step, **result.metrics})
    table = write_report(result, out, method=method, extra={"step": step}, plots=args.plots)
    log.info("wrote %s, %s%s to %s", CHECKPOINT, "metrics.json",
             " and plots" if args.plots else "", out)
    print(table, flush=True)
    return TrainResult(model, result.metrics)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = build_train_parser().parse_args(argv)
    args.explicit = explicit_flags(build_train_parser, argv)  # what --resume must not override
    return run_command(PROG, train, args)


if __name__ == "__main__":
    sys.exit(main())
