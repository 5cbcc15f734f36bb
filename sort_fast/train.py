"""``python -m sort_fast.train``: train a VQA model with SOrT or a baseline loss.

Without arguments it trains full SOrT on the embedded synthetic benchmark (a few minutes on a
laptop CPU) and prints the evaluation table. See ``--help`` for every flag and
docs/training.md for the configuration, the training state and the loop. Multi-process:
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
import logging
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import PackedBatch
from .data.buckets import ShapeBuckets, pad_to_bucket
from .errors import CLIError, Interrupted
from .models import LlavaVQA, VQAModel, model_kind
from .models.llava import ADAPTER_DIR, MERGED_DIR
from .training.checkpoint import (
    MODEL_KEYS,
    TRAINING_KEYS,
    atomic_write,
    load_checkpoint,
    lock_run_dir,
    model_from_checkpoint,
    remove_stale_temp_files,
    rng_state,
    set_rng_state,
    write_run_checkpoint,
)
from .training.config import (
    EVAL_DIR,
    TrainConfig,
    build_train_parser,
    command_line,
    method_name,
    parse_train_args,
    resumed_config,
    run_command,
)
from .training.data import (
    DataOrder,
    Datasets,
    StepBatchSampler,
    check_model_flags,
    load_train_data,
    make_loader,
    model_config,
)
from .training.distributed import (
    DistContext,
    close_distributed,
    gather_objects,
    init_distributed,
    wrap_model,
)
from .training.eval_report import write_report
from .training.evaluation import evaluate, load_hat
from .training.fingerprint import check_fingerprint, data_fingerprint
from .training.logs import JsonLog, StepLog, setup_logging
from .training.metrics_table import format_table
from .training.objective import Objective
from .training.state import TrainState, every_n_steps
from .training.static_step import compile_objective, cuda_graph_step, make_optimizer, train_step

__all__ = ["main", "train", "TrainResult"]

PROG = "python -m sort_fast.train"
CHECKPOINT = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
# the report a finished run writes (and the evaluator, into EVAL_DIR), besides the plots
REPORT = ("table1.md", "metrics.json")
# what a fresh start (not --resume) removes of an earlier run in the same --out, the checkpoint
# first (a fresh start killed before its first save then leaves nothing to resume), before the
# new run writes anything
RUN_OUTPUTS = (CHECKPOINT, "log.jsonl", "train.log", CONFIG_FILE, *REPORT)
HF_OUTPUTS = (MERGED_DIR, ADAPTER_DIR)  # --model llava: LlavaVQA.save_pretrained's folders
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# False: --cuda-graphs pads and buckets every batch but neither compiles nor captures (a run
# on the CPU that tests the padded path)
CAPTURE_GRAPHS = True


@dataclasses.dataclass
class TrainResult:
    """The trained ``model`` (this process's copy) and the final validation ``metrics``
    (``None`` on ranks > 0, which do not evaluate)."""

    model: VQAModel
    metrics: Optional[Dict[str, Any]]


def _build_model(config: TrainConfig, data: Datasets, resume: Optional[Dict[str, Any]],
                 out: Path) -> VQAModel:
    """A fresh model, the weights of ``--init`` (whose vocabulary must fit), or for a resumed
    run the checkpoint's model (``--init`` is not read again: its file may be gone)."""
    if resume is not None:
        return model_from_checkpoint(resume, out / CHECKPOINT)
    init = config.model.init
    if init is None and config.model.hf_model is not None:
        try:
            return LlavaVQA(model_config(config.model, data), pretrained=config.model.hf_model)
        except ValueError as e:
            raise CLIError(f"--hf-model {e}") from None
    if init is None:
        return model_config(config.model, data).build()
    state = load_checkpoint(init, MODEL_KEYS)
    if state["vocab"] != data.vocab.tokens or state["answer_vocab"] != data.answer_vocab.tokens:
        raise CLIError(f"--init {init}: its vocabulary differs from this data's")
    kind = state.get("model_kind", "pythia")
    if kind != config.model.model:
        raise CLIError(f"--init {init}: a --model {kind} checkpoint, but this run trains "
                       f"--model {config.model.model}")
    return model_from_checkpoint(state, init)


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0 over ``warmup_steps``, then constant (a schedule that does not
    depend on the run's length, so a resumed run with more steps continues the same curve)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def _to_device(batch: PackedBatch, device: torch.device,
               buckets: Optional[ShapeBuckets]) -> PackedBatch:
    """``batch`` on ``device``; with ``buckets`` (``--cuda-graphs``) first padded to its static
    shape (:func:`~sort_fast.data.buckets.pad_to_bucket`) and pinned, so the copy is
    asynchronous."""
    if buckets is None:
        return batch.to(device, non_blocking=True)
    padded = pad_to_bucket(batch, buckets)
    if device.type == "cuda":
        padded = padded.pin_memory()
    return padded.to(device, non_blocking=True)


def _check_cuda_graphs(config: TrainConfig, ctx: DistContext) -> None:
    """``--cuda-graphs`` needs one CUDA process, no ``--compile`` (it compiles the step
    itself) and no fp16 gradient scaling (whose inf check reads the device every step)."""
    run = config.run
    if not (run.cuda_graphs and CAPTURE_GRAPHS):
        return
    conflict = ("--compile" if run.compile else "--amp fp16" if run.amp == "fp16" else
                "torchrun" if ctx.distributed else None)
    if conflict:
        raise CLIError(f"--cuda-graphs cannot run with {conflict}")
    if ctx.device.type != "cuda":
        raise CLIError(f"--cuda-graphs needs a CUDA device (this run's is {ctx.device})")


def _check_llava_run(config: TrainConfig) -> None:
    """What ``--model llava`` cannot run with, refused before anything is trained."""
    if config.objective.loss == "squint":
        raise CLIError("--loss squint aligns region attention, which --model llava does not "
                       "have (its regions are tokens)")
    if config.run.compile or config.run.cuda_graphs:
        raise CLIError("--compile and --cuda-graphs do not run --model llava yet (torch.compile "
                       "fails inside AOTAutograd on the transformers decoder; docs/vlm.md)")


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
    for folder in HF_OUTPUTS:  # written by the trainer alone
        shutil.rmtree(out / folder, ignore_errors=True)


@contextlib.contextmanager
def _run_folder(config: TrainConfig, ctx: DistContext) -> Iterator[Path]:
    """Checks ``--out`` against ``--resume``/``--overwrite`` and, on rank 0, holds the folder's
    lock for the block, removes temporary files of processes that died while writing and, for
    a fresh start, the earlier run's outputs."""
    out, resume = Path(config.run.out), config.run.resume
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not (resume or config.run.overwrite):
        raise CLIError(f"{ckpt_path} exists: pass --resume to continue that run, --overwrite "
                       "to start afresh, or another --out")
    if resume and not ckpt_path.exists():
        raise CLIError(f"--resume: {ckpt_path} does not exist")
    if not ctx.is_main:
        yield out
        return
    out.mkdir(parents=True, exist_ok=True)
    with lock_run_dir(out):
        remove_stale_temp_files(out)
        if not resume:
            _remove_run(out)
        yield out


@dataclasses.dataclass
class _Run:
    """A run being trained: its configuration, process, folder, data, state and the pieces
    the loop calls; ``saved_step`` is the step of the checkpoint on disk (``None``: none yet),
    ``report`` a finished run's complete report (kept instead of evaluating again)."""

    config: TrainConfig
    ctx: DistContext
    out: Path
    data: Datasets
    state: TrainState
    objective: Objective
    total: int
    fingerprint: Dict[str, str]
    hat_maps: Any
    saved_step: Optional[int]
    report: Optional[Dict[str, Any]]

    @property
    def method(self) -> str:
        return method_name(self.config.objective.loss, self.config.model.model)

    def kept(self) -> str:
        return (f"the checkpoint of step {self.saved_step} is kept"
                if self.saved_step is not None else "no checkpoint was written")


def _finite_weights(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one host sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _save(run: _Run) -> None:
    """Writes the checkpoint of ``run.state`` (rank 0; every rank takes part in gathering the
    random-number states). Non-finite weights are refused on every rank (they hold the same
    weights)."""
    state = run.state
    if not _finite_weights(state.model):
        raise CLIError(f"the weights are not finite after step {state.step} (a non-finite "
                       f"gradient); {run.kept()}; try a lower --lr")
    rngs = gather_objects(rng_state(), run.ctx)  # collective: every rank takes part
    if run.ctx.is_main:
        write_run_checkpoint({
            **state.state_dict(), "rng": rngs, "config": run.config.flags(),
            "model_kind": model_kind(state.model.config),
            "model_config": dataclasses.asdict(state.model.config),
            "vocab": run.data.vocab.tokens, "answer_vocab": run.data.answer_vocab.tokens,
            "source": run.data.source, "method": run.method,
            "data_fingerprint": run.fingerprint}, run.out / CHECKPOINT)
    run.saved_step = state.step


def _resume_state(out: Path, config: TrainConfig
                  ) -> Tuple[Optional[Dict[str, Any]], TrainConfig]:
    """For ``--resume``: the checkpoint and the configuration it continues with."""
    if not config.run.resume:
        return None, config
    resume = load_checkpoint(out / CHECKPOINT, TRAINING_KEYS)
    return resume, resumed_config(config, resume["config"])


def _start(config: TrainConfig, ctx: DistContext, out: Path) -> _Run:
    """Reads the checkpoint to resume, seeds, data and model; builds the training state."""
    log = _logger_for(out, ctx)
    resume, config = _resume_state(out, config)
    if ctx.is_main:
        atomic_write(out / CONFIG_FILE, lambda f: f.write(config.to_yaml().encode()))
    _check_cuda_graphs(config, ctx)
    check_model_flags(config.model)
    if config.model.model == "llava":
        _check_llava_run(config)
    seed = config.run.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    data = load_train_data(config.data)
    assert data.train is not None
    fingerprint = data_fingerprint(config.data, data)
    if resume is not None:
        if "data_fingerprint" in resume:
            check_fingerprint(resume["data_fingerprint"], fingerprint, out / CHECKPOINT)
        else:
            log.warning("%s has no data fingerprint (written by an older version): this run's "
                        "data is not compared with the data it was trained on",
                        out / CHECKPOINT)
    hat_maps = load_hat(config.data.hat_dir, data.val) if ctx.is_main else None
    order = DataOrder(len(data.train), config.optim.batch_groups, seed)
    if order.batch_groups < ctx.world_size:
        raise CLIError(f"--batch-groups {order.batch_groups} is smaller than the "
                       f"{ctx.world_size} processes")
    optim = config.optim
    total = optim.max_steps or optim.epochs * order.steps_per_epoch
    model = _build_model(config, data, resume, out).to(ctx.device)
    capturable = config.run.cuda_graphs and CAPTURE_GRAPHS
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters
    optimizer = make_optimizer(trainable, optim.lr, capturable=capturable)
    state = TrainState(model, optimizer,
                       torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(optim.warmup_steps)),
                       torch.amp.GradScaler(ctx.device.type, enabled=config.run.amp == "fp16"),
                       order)
    obj = config.objective
    objective = Objective(obj.loss, lambda_reasoning=obj.lambda_reasoning,
                          lambda_sub=obj.lambda_sub, lambda_irrelevant=obj.lambda_irrelevant,
                          margin=obj.margin, lambda_attention=obj.lambda_attention,
                          naive=obj.autograd_reference)
    log.info("%s on %d train / %d val groups (%s data, loaded in %.1fs); %d parameters (%d "
             "trained); device %s x%d; %d steps of %d groups (%d per epoch)",
             method_name(obj.loss, config.model.model),
             len(data.train), len(data.val), data.source["kind"], time.perf_counter() - t0,
             sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable),
             ctx.device, ctx.world_size, total,
             order.batch_groups, order.steps_per_epoch)
    run = _Run(config, ctx, out, data, state, objective, total, fingerprint, hat_maps,
               saved_step=None, report=None)
    if resume is not None:
        _continue(run, resume)
    return run


def _logger_for(out: Path, ctx: DistContext) -> logging.Logger:
    """The ``sort_fast`` logger of a run: ``train.log`` in ``out`` on rank 0."""
    return setup_logging(out / "train.log" if ctx.is_main else None, quiet=not ctx.is_main)


def _continue(run: _Run, resume: Dict[str, Any]) -> None:
    """Restores ``run`` from the checkpoint ``resume``: the training state, this process's
    random-number state, and the log truncated to the checkpoint's step; a finished run keeps
    its complete report."""
    ctx = run.ctx
    if len(resume["rng"]) != ctx.world_size:
        raise CLIError(f"cannot resume: the checkpoint was written by {len(resume['rng'])} "
                       f"process(es), this run has {ctx.world_size}")
    run.state.load_state_dict(resume)
    set_rng_state(resume["rng"][ctx.rank])
    step = run.saved_step = run.state.step
    finished = step >= run.total
    # a finished run whose report is partial (killed while writing it) evaluates again
    if finished and ctx.is_main:
        run.report = _finished_report(run.out, step, run.config.run.plots)
    if ctx.is_main:
        JsonLog(run.out / "log.jsonl").truncate_after(
            step, drop_eval_at_step=finished and run.report is None)
    logging.getLogger("sort_fast").info("resumed from %s at step %d", run.out / CHECKPOINT,
                                        step)


def _evaluate(run: _Run):
    return evaluate(run.state.model, run.data.val, batch_groups=run.config.optim.batch_groups,
                    device=run.ctx.device, naive=run.config.objective.autograd_reference,
                    answer_vocab=run.data.answer_vocab, hat_maps=run.hat_maps,
                    templates=getattr(run.data.val, "templates", None))


def _step_function(config: TrainConfig, objective: Objective) -> Callable:
    """What computes a step's loss: the objective, compiled (``--compile``), or compiled for
    CUDA graphs (``--cuda-graphs``)."""
    if config.run.cuda_graphs and CAPTURE_GRAPHS:
        return cuda_graph_step(objective)
    return compile_objective(objective) if config.run.compile else objective


def _train_step(run: _Run, train_model: torch.nn.Module, batch: PackedBatch,
                loss_fn: Callable, autocast: ContextManager) -> Dict[str, torch.Tensor]:
    """One optimizer step of ``run`` on ``batch`` and the schedule's step; returns the loss
    parts (device tensors, not read)."""
    state = run.state
    train_model.train()
    # DDP averages the gradients over the processes in the step's backward
    _, parts = train_step(train_model, batch, run.objective, state.optimizer,
                          grad_clip=run.config.optim.grad_clip, scaler=state.scaler,
                          autocast=autocast, loss_fn=loss_fn)
    state.scheduler.step()
    state.step += 1
    return parts


def _stop_signal(caught: List[int], ctx: DistContext, sync_point: bool) -> int:
    """The signal to stop on after this step (0: none). Processes agree on it at
    ``sync_point`` steps (one collective), so that every rank stops at the same step."""
    if not ctx.distributed:
        return caught[0] if caught else 0
    return max(gather_objects(caught[0] if caught else 0, ctx)) if sync_point else 0


def _after_step(run: _Run, steps: StepLog, caught: List[int]) -> None:
    """What follows a step: reading its loss parts when due, evaluating, saving, and on a
    signal saving and raising :class:`Interrupted`."""
    step, every, ctx = run.state.step, run.config.run, run.ctx
    eval_due = every_n_steps(step, every.eval_every) and step < run.total
    save_now = every_n_steps(step, every.save_every) or step == run.total
    stop = _stop_signal(caught, ctx, every_n_steps(step, every.log_every) or save_now)
    if every_n_steps(step, every.log_every) or eval_due or save_now or stop:
        # before a save: a non-finite loss never reaches a checkpoint
        steps.flush(check_gradient=not run.state.scaler.is_enabled(), kept=run.kept())
    if eval_due and ctx.is_main:
        metrics = _evaluate(run).metrics
        steps.jsonl.write({"event": "eval", "step": step, **metrics})
        logging.getLogger("sort_fast").info(
            "step %d: consistency %.2f%%, reasoning acc %.2f%%, MP@1 %.2f, MRR %.2f", step,
            100 * metrics["consistency"], 100 * metrics["reasoning_accuracy"],
            100 * metrics["mp1"], 100 * metrics["mrr"])
    if save_now or stop:
        _save(run)
    if stop:
        steps.bar.close()
        prog = (PROG if not ctx.distributed else
                f"torchrun --nproc_per_node={ctx.world_size} -m sort_fast.train")
        raise Interrupted(stop, step, command_line(
            prog, build_train_parser(), run.config.flags(), resume=True, overwrite=False))


def _loop(run: _Run) -> int:
    """Trains ``run`` from its state's step to ``run.total``; returns the steps trained."""
    config, ctx, state = run.config, run.ctx, run.state
    bar = tqdm(total=run.total, initial=state.step, desc=run.method, unit="step",
               dynamic_ncols=True, disable=None if ctx.is_main else True, file=sys.stderr)
    steps = StepLog(JsonLog(run.out / "log.jsonl"), bar, ctx)
    loss_fn = _step_function(config, run.objective)
    amp = config.run.amp
    autocast = (torch.autocast(ctx.device.type, dtype=AMP_DTYPES[amp]) if amp != "none"
                else contextlib.nullcontext())
    train_model = wrap_model(state.model, ctx)
    buckets = ShapeBuckets() if config.run.cuda_graphs else None
    batches = iter(make_loader(
        run.data.train, StepBatchSampler(state.order, state.step, run.total, ctx.rank,
                                         ctx.world_size),
        workers=config.run.workers, pin_memory=ctx.device.type == "cuda" and buckets is None))
    start, t_train = state.step, time.perf_counter()
    with _catch_signals() as caught:
        while state.step < run.total:
            batch = _to_device(next(batches), ctx.device, buckets)
            lr = config.optim.lr * _warmup(config.optim.warmup_steps)(state.step)
            epoch = state.order.epoch(state.step)
            parts = _train_step(run, train_model, batch, loss_fn, autocast)
            groups_per_s = ((state.step - start) * state.order.batch_groups
                            / (time.perf_counter() - t_train))
            steps.add({"event": "train", "step": state.step, "epoch": epoch, "lr": lr,
                       "groups_per_s": groups_per_s}, parts)
            _after_step(run, steps, caught)
    bar.close()
    if ctx.is_main and state.step > start:
        logging.getLogger("sort_fast").info("trained %d steps in %.1fs", state.step - start,
                                            time.perf_counter() - t_train)
    return state.step - start


def _finish(run: _Run) -> TrainResult:
    """The final evaluation and report (rank 0), or a finished run's kept report."""
    model, step, log = run.state.model, run.state.step, logging.getLogger("sort_fast")
    if not run.ctx.is_main:
        return TrainResult(model, None)
    if run.report is not None:
        log.info("the run in %s had already finished (step %d); its report is kept", run.out,
                 step)
        print(format_table(run.report["metrics"], run.report["method"]), flush=True)
        return TrainResult(model, run.report["metrics"])
    result = _evaluate(run)
    JsonLog(run.out / "log.jsonl").write({"event": "eval", "step": step, **result.metrics})
    table = write_report(result, run.out, method=run.method, extra={"step": step},
                         plots=run.config.run.plots)
    log.info("wrote %s, %s%s to %s", CHECKPOINT, "metrics.json",
             " and plots" if run.config.run.plots else "", run.out)
    if isinstance(model, LlavaVQA):
        log.info("wrote %s", ", ".join(model.save_pretrained(str(run.out))))
    print(table, flush=True)
    return TrainResult(model, result.metrics)


def train(config: Union[TrainConfig, argparse.Namespace]) -> TrainResult:
    """Trains as ``config`` says (a :class:`~sort_fast.training.TrainConfig`, or the flags
    :func:`~sort_fast.training.config.build_train_parser` parsed)."""
    if isinstance(config, argparse.Namespace):
        config = TrainConfig.from_namespace(config)
    ctx = init_distributed(config.run.device, config.run.threads)
    try:
        with _run_folder(config, ctx) as out:
            run = _start(config, ctx, out)
            _loop(run)
            return _finish(run)
    finally:
        close_distributed(ctx)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code."""
    config, print_only = parse_train_args(argv)
    if print_only:
        print(config.to_yaml(), end="")
        return 0
    return run_command(PROG, train, config)


if __name__ == "__main__":
    sys.exit(main())
