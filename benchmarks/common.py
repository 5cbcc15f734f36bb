"""Shared pieces of the benchmark suites: synthetic packed batches, peak-memory measurement, the
quick/full/smoke size tables and the one-line-per-measurement result files."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Mapping, Tuple

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def packed_layout(num_groups: int, seed: int = 0,
                  device: torch.device = DEVICE) -> Tuple[torch.Tensor, torch.Tensor]:
    """A layout shaped like the paper's data (docs/synthetic_benchmark.md): 1..4 sub-questions
    (mean 2.5) and 6..8 irrelevant questions per reasoning question. Returns ``offsets [N+1]``,
    ``num_sub [N]``."""
    gen = torch.Generator().manual_seed(seed)
    num_sub = torch.randint(1, 5, (num_groups,), generator=gen)
    num_irr = torch.randint(6, 9, (num_groups,), generator=gen)
    sizes = 1 + num_sub + num_irr
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    return offsets.to(device), num_sub.to(device)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device = DEVICE) -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above what was allocated before.

    CUDA: the caching allocator's peak counter. CPU: the allocation/free events that
    ``torch.profiler`` records (``profile_memory=True``), replayed in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# Quick vs full sizes: parameter values that only `pytest --benchmark-only --benchmark-full`
# runs, per suite and parameter name (benchmarks/conftest.py deselects them otherwise). Every
# other case, every suite's smaller sizes, runs in the quick default.
FULL_ONLY: Dict[str, Dict[str, Tuple[object, ...]]] = {
    "bench_loss.py": {"size": ("pythia_x8",)},
    "bench_gradcam.py": {"head_name": ("pythia",)},
    "bench_step.py": {"size": ("pythia",)},
    "bench_ranking.py": {"num_groups": (100_000,), "pairwise_groups": (100_000, 1_000_000)},
    "bench_loader.py": {"mode": ("train",)},
    "bench_vlm.py": {"width": (4096,)},
}


def full_only(suite: str, params: Mapping[str, object]) -> bool:
    """True if the case of ``suite`` (a file name) with parametrization ``params`` belongs to
    the full sizes only."""
    return any(params.get(name) in values for name, values in FULL_ONLY.get(suite, {}).items())


# Smoke sizes (``SORT_BENCH_SMOKE=1``, set by ``gpu.sh --dry-run``): module attributes that
# benchmarks/conftest.py overrides per suite, and the most rounds any benchmark runs. They check
# that a suite still runs on the CPU in seconds; the numbers they give mean nothing.
SMOKE_ENV = "SORT_BENCH_SMOKE"
_TINY_DECODER = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
SMOKE_SIZES: Dict[str, Dict[str, object]] = {
    "bench_step.py": {"NUM_GROUPS": 2},
    "bench_vlm.py": {"DECODER": {2048: _TINY_DECODER, 4096: _TINY_DECODER}, "TEXT_VOCAB": 500,
                     "NUM_ANSWERS": 100, "FEATURE_DIM": 64, "NUM_GROUPS": 2},
}
SMOKE_ROUNDS = 1


def smoke() -> bool:
    """Whether the benchmarks run at the smoke sizes."""
    return os.environ.get(SMOKE_ENV) == "1"


def append_jsonl(path: str, record: Mapping[str, object]) -> None:
    """Appends ``record`` as one JSON line to ``path`` and closes the file: a run cut short by a
    time limit keeps every measurement it finished."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
