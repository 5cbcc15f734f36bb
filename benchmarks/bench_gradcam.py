"""Closed-form head Grad-CAM (SPEC §4) against autograd with ``create_graph=True``.

Run (benchmark-only; nothing here is a plain test)::

    python -m pytest benchmarks/bench_gradcam.py --benchmark-only \
        --benchmark-columns=min,median,mean,rounds -q

or, without pytest (e.g. on a GPU machine; prints one table)::

    python benchmarks/bench_gradcam.py [--device cuda] [--rounds 10]

Heads (float32, train mode, dropout 0.5, T = 640 rows in 64 groups of 1 reasoning + 3 sub +
6 irrelevant questions, classes uniform over 3129 answers):

* ``mlp``: ``Linear(2048, 2048) -> ReLU -> Dropout -> Linear(2048, 3129)``.
* ``pythia``: Pythia's logit classifier on a 5000-d joint embedding, two weight-normalised
  branches with hidden 5000 each (the released model uses 300 for text and 5000 for image;
  both at 5000 is the heavier case).

Paths: ``closed`` (``head_gradcam(..., times_input=True)``), ``autograd_onehot`` (the authors'
way: ``autograd.grad(scores, h, grad_outputs=one_hot, create_graph=True)``) and
``autograd_gather`` (``autograd.grad(scores.gather(1, c).sum(), h, create_graph=True)``).
Groups ``<phase>-<head>-<device>``: ``forward`` (scores and G = g * h), ``backward``
(``loss.backward()`` of a SOrT-like loss on G and the scores, the forward in untimed setup)
and ``full`` (both). The summary printed at the end gives the speed-up of ``closed`` over each
autograd path (ratio of medians in this run) and the peak memory of one full step above the
memory held before it: on CPU the peak-RSS increase of a step (after a warm-up step) in a fresh
subprocess started with ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed tensors leave the RSS
(VmHWM reset through ``/proc/self/clear_refs``; page granularity); on CUDA
``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` before the step.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from sort_fast.heads import mlp_head, pythia_classifier
from sort_fast.ops.head_gradcam import head_gradcam

ROWS, GROUP, NUM_SUB, ANSWERS = 640, 10, 3, 3129
HEADS: Dict[str, Tuple[Callable[[], torch.nn.Module], int]] = {
    "mlp": (lambda: mlp_head(2048, 2048, ANSWERS, dropout=0.5), 2048),
    "pythia": (lambda: pythia_classifier(5000, 5000, 5000, ANSWERS, dropout=0.5), 5000),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gradcam_closed(head, h, classes):
    return head_gradcam(head, h, classes, times_input=True)


def gradcam_onehot(head, h, classes):
    scores = head(h)
    one_hot = F.one_hot(classes, scores.shape[1]).to(scores.dtype)
    (g,) = torch.autograd.grad(scores, h, grad_outputs=one_hot, create_graph=True)
    return scores, g * h


def gradcam_gather(head, h, classes):
    scores = head(h)
    (g,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), h, create_graph=True)
    return scores, g * h


PATHS = {"closed": gradcam_closed, "autograd_onehot": gradcam_onehot, "autograd_gather": gradcam_gather}


def sort_loss(scores: torch.Tensor, G: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Contrastive gradient loss (SPEC §3, equal-size groups) plus BCE on the scores."""
    g = G.view(-1, GROUP, G.shape[1])
    cos = F.cosine_similarity(g[:, 1:], g[:, :1], dim=2)  # [N, GROUP - 1]
    sub, irr = cos[:, :NUM_SUB], cos[:, NUM_SUB:]
    hinge = (irr[:, None, :] - sub[:, :, None]).clamp_min(0).mean((1, 2)).mean()
    return hinge + 2.27 * F.binary_cross_entropy_with_logits(scores, targets)


@functools.lru_cache(maxsize=None)
def setup(head_name: str, device: str):
    """Head, hidden activations ``h`` (a leaf requiring grad), classes and soft targets."""
    torch.manual_seed(0)
    make, dim = HEADS[head_name]
    head = make().to(device).train()
    h = torch.randn(ROWS, dim, device=device).relu_().requires_grad_()
    classes = torch.randint(0, ANSWERS, (ROWS,), device=device)
    targets = torch.zeros(ROWS, ANSWERS, device=device).scatter_(1, classes[:, None], 1.0)
    return head, h, classes, targets


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward_step(path: str, head, h, classes, targets):
    scores, G = PATHS[path](head, h, classes)
    return sort_loss(scores, G, targets)


def full_step(path: str, head, h, classes, targets) -> None:
    head.zero_grad(set_to_none=True)
    h.grad = None
    forward_step(path, head, h, classes, targets).backward()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _step_peak_rss_mib(path: str, head_name: str) -> float:
    """Peak-RSS increase of one full step on CPU, in this process (after a warm-up step)."""
    args = setup(head_name, "cpu")
    full_step(path, *args)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    full_step(path, *args)
    return (_rss_kib("VmHWM") - base) / 1024


def peak_memory_mib(path: str, head_name: str, device: str) -> Optional[float]:
    """Peak memory of one full step above the memory held before it (see the module doc)."""
    if device == "cuda":
        args = setup(head_name, device)
        full_step(path, *args)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        full_step(path, *args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # a fresh process whose glibc serves every allocation >= 64 KiB by mmap and unmaps it on
    # free, so that the RSS follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, __file__, "--peak-rss", path, head_name],
        env=env, capture_output=True, text=True,
    )
    return float(proc.stdout.split()[-1]) if proc.returncode == 0 else None


# ----------------------------------------------------------------------------- pytest-benchmark

_RESULTS: Dict[Tuple[str, str, str], Dict[str, float]] = {}


def _record(benchmark, phase: str, head_name: str, device: str, path: str) -> None:
    _RESULTS.setdefault((phase, head_name, device), {})[path] = benchmark.stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not _RESULTS:
        return
    memory = {
        (path, head_name, device): peak_memory_mib(path, head_name, device)
        for (phase, head_name, device), times in _RESULTS.items() if phase == "full"
        for path in times
    }
    lines = ["", "head Grad-CAM: median time, speed-up of the closed form, peak memory of a full step"]
    for (phase, head_name, device), times in sorted(_RESULTS.items()):
        base = times.get("closed")
        for path, t in times.items():
            ratio = f"  closed is {t / base:.2f}x faster" if base and path != "closed" else ""
            mem = memory.get((path, head_name, device)) if phase == "full" else None
            mem_s = f"  peak {mem:.0f} MiB" if mem is not None else ""
            lines.append(f"{phase:8s} {head_name:6s} {device:4s} {path:16s} {t * 1e3:9.1f} ms{ratio}{mem_s}")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines), flush=True)


params = pytest.mark.parametrize("path", list(PATHS))
heads = pytest.mark.parametrize("head_name", list(HEADS))
devices = pytest.mark.parametrize("device", DEVICES)
ROUNDS = {"mlp": 5, "pythia": 3}


@devices
@heads
@params
def test_forward(benchmark, path, head_name, device):
    benchmark.group = f"forward-{head_name}-{device}"
    args = setup(head_name, device)

    def run():
        with torch.enable_grad():
            PATHS[path](*args[:3])
        _sync(device)

    benchmark.pedantic(run, rounds=ROUNDS[head_name], iterations=1, warmup_rounds=1)
    _record(benchmark, "forward", head_name, device, path)


@devices
@heads
@params
def test_backward(benchmark, path, head_name, device):
    benchmark.group = f"backward-{head_name}-{device}"
    args = setup(head_name, device)

    def make_loss():
        args[0].zero_grad(set_to_none=True)
        args[1].grad = None
        loss = forward_step(path, *args)
        _sync(device)
        return (loss,), {}

    def run(loss):
        loss.backward()
        _sync(device)

    benchmark.pedantic(run, setup=make_loss, rounds=ROUNDS[head_name], iterations=1, warmup_rounds=1)
    _record(benchmark, "backward", head_name, device, path)


@devices
@heads
@params
def test_full(benchmark, path, head_name, device):
    benchmark.group = f"full-{head_name}-{device}"
    args = setup(head_name, device)

    def run():
        full_step(path, *args)
        _sync(device)

    benchmark.pedantic(run, rounds=ROUNDS[head_name], iterations=1, warmup_rounds=1)
    _record(benchmark, "full", head_name, device, path)


# ----------------------------------------------------------------------------- standalone (GPU)


def run_benchmark(device: str = "cuda", rounds: int = 10, heads_to_run=tuple(HEADS)) -> Dict:
    """Median full-step seconds, forward seconds and peak MiB per (head, path) on ``device``;
    prints a table. Usable without pytest, e.g. on a GPU machine."""
    results = {}
    for head_name in heads_to_run:
        args = setup(head_name, device)
        for path in PATHS:
            times = {"forward": [], "full": []}
            for i in range(rounds + 1):
                _sync(device)
                t0 = time.perf_counter()
                with torch.enable_grad():
                    PATHS[path](*args[:3])
                _sync(device)
                t1 = time.perf_counter()
                full_step(path, *args)
                _sync(device)
                if i:  # the first round warms up
                    times["forward"].append(t1 - t0)
                    times["full"].append(time.perf_counter() - t1)
            results[(head_name, path)] = {
                "forward_s": statistics.median(times["forward"]),
                "full_s": statistics.median(times["full"]),
            }
    for (head_name, path), r in results.items():
        r["peak_mib"] = peak_memory_mib(path, head_name, device)
    for (head_name, path), r in results.items():
        base = results[(head_name, "closed")]["full_s"]
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        print(f"{device} {head_name:6s} {path:16s} forward {r['forward_s'] * 1e3:8.2f} ms  "
              f"full {r['full_s'] * 1e3:8.2f} ms  ({r['full_s'] / base:.2f}x closed)  peak {mem}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--peak-rss", nargs=2, metavar=("PATH", "HEAD"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.peak_rss:
        print(_step_peak_rss_mib(*ns.peak_rss))
    else:
        run_benchmark(ns.device, ns.rounds)
