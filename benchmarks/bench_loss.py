"""Contrastive gradient loss: the fused op against the naive paths (a per-triple Python loop,
plain vectorised autograd, and ``torch.compile`` of it).

Run::

    python -m pytest benchmarks/bench_loss.py --benchmark-only \\
        --benchmark-columns=min,median,mean,rounds --benchmark-group-by=group -q

Inputs: ``grad`` and ``act`` ``[T, D]`` float32 leaves at Pythia width (D = 5000), 64 groups of
~10.5 questions (``pythia``) and 512 groups (``pythia_x8``); layout from
:func:`common.packed_layout`. Paths:

* ``fused``: :func:`sort_fast.contrastive_gradient_loss` (Triton on CUDA, the torch backend on
  CPU), hand-written backward.
* ``vectorized``: packed layout, ``F.cosine_similarity`` and a dense padded pairwise hinge in
  plain PyTorch, autograd backward.
* ``compiled``: ``torch.compile`` of ``vectorized``.
* ``loop``: :func:`triple_loop_loss`, the tests' reference loss
  (:func:`sort_fast.reference.reference_loss`, the mean over a group's pairs, then over
  groups) computed one ``(R, S, I)`` triple at a time in a Python loop, in float32.

Groups ``loss-{forward,backward,full}-{size}`` time the forward (building the graph), the
backward alone (forward done in untimed setup) and both. Every path's loss and gradients are
checked against the fused op once per size before timing; the full-pass benchmarks store peak
memory (MB, :func:`common.peak_memory_bytes`) in ``extra_info``.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F

from common import DEVICE, packed_layout, peak_memory_bytes, synchronize
from sort_fast import contrastive_gradient_loss
from sort_fast.reference import reference_loss

DIM = 5000
SIZES = {"pythia": 64, "pythia_x8": 512}


def fused_loss(grad, act, offsets, num_sub):
    return contrastive_gradient_loss(grad, act, offsets, num_sub)


def vectorized_loss(grad, act, offsets, num_sub, eps=1e-8):
    """The vectorised autograd path: packed rows, cosine_similarity, dense pairwise hinge."""
    return vectorized_hinge(grad * act, offsets, num_sub, eps)


def vectorized_hinge(G, offsets, num_sub, eps=1e-8):
    """The contrastive loss of packed Grad-CAM vectors ``G [T, D]`` in plain autograd."""
    start, sizes = offsets[:-1], offsets[1:] - offsets[:-1]
    num_groups, num_rows = sizes.numel(), G.shape[0]
    gid = torch.repeat_interleave(torch.arange(num_groups, device=G.device), sizes,
                                  output_size=num_rows)
    cos = F.cosine_similarity(G, G[start][gid], dim=1, eps=eps)
    pos = torch.arange(num_rows, device=G.device) - start[gid]
    width = int(sizes.max())
    padded = torch.zeros(num_groups, width, dtype=cos.dtype, device=G.device)
    padded = padded.index_put((gid, pos), cos)
    slot = torch.arange(width, device=G.device)[None, :]
    is_sub = (slot >= 1) & (slot <= num_sub[:, None])
    is_irr = (slot > num_sub[:, None]) & (slot < sizes[:, None])
    hinge = F.relu(padded[:, None, :] - padded[:, :, None])  # [N, sub k, irrelevant m]
    pair = is_sub[:, :, None] & is_irr[:, None, :]
    num_irr = sizes - 1 - num_sub
    per_group = (hinge * pair).sum((1, 2)) / (num_sub * num_irr).clamp_min(1)
    return per_group[num_irr > 0].mean()


def triple_loop_loss(grad, act, offsets, num_sub):
    """:func:`sort_fast.reference.reference_loss` in the inputs' dtype: one hinge per
    (reasoning, sub, irrelevant) triple in a Python loop, the mean over a group's pairs, then
    over the groups that have a pair."""
    return reference_loss(grad, act, offsets, num_sub, dtype=None)


@functools.lru_cache(maxsize=None)
def compiled_loss() -> Callable:
    return torch.compile(vectorized_loss)


PATHS: Dict[str, Callable] = {
    "fused": fused_loss,
    "vectorized": vectorized_loss,
    "compiled": lambda *a: compiled_loss()(*a),
    "loop": triple_loop_loss,
}


@functools.lru_cache(maxsize=None)
def inputs(size: str):
    offsets, num_sub = packed_layout(SIZES[size], seed=1)
    gen = torch.Generator().manual_seed(2)
    rows = int(offsets[-1])
    grad = torch.randn(rows, DIM, generator=gen).to(DEVICE).requires_grad_()
    act = torch.rand(rows, DIM, generator=gen).to(DEVICE).requires_grad_()
    return grad, act, offsets, num_sub


def run_full(path: str, size: str):
    grad, act, offsets, num_sub = inputs(size)
    loss = PATHS[path](grad, act, offsets, num_sub)
    dgrad, dact = torch.autograd.grad(loss, (grad, act))
    synchronize()
    return loss, dgrad, dact


@functools.lru_cache(maxsize=None)
def checked(path: str, size: str) -> None:
    """Fails the benchmark (or skips compile where it cannot) unless values and grads agree."""
    try:
        got = run_full(path, size)
    except Exception as e:  # torch.compile without a working toolchain
        if path == "compiled":
            pytest.skip(f"torch.compile failed: {type(e).__name__}: {e}")
        raise
    want = run_full("fused", size)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def _params(paths=PATHS):
    return [pytest.param(p, s, id=f"{p}-{s}") for s in SIZES for p in paths
            if not (p == "loop" and s != "pythia")]


@pytest.mark.parametrize("path, size", _params())
def test_forward(benchmark, path, size):
    checked(path, size)
    grad, act, offsets, num_sub = inputs(size)
    benchmark.group = f"loss-forward-{size}"

    def forward():
        out = PATHS[path](grad, act, offsets, num_sub)
        synchronize()
        return out

    benchmark.pedantic(forward, rounds=3 if path == "loop" else 15, warmup_rounds=1)


@pytest.mark.parametrize("path, size", _params())
def test_backward(benchmark, path, size):
    checked(path, size)
    grad, act, offsets, num_sub = inputs(size)
    benchmark.group = f"loss-backward-{size}"

    def setup():
        return (PATHS[path](grad, act, offsets, num_sub),), {}

    def backward(loss):
        torch.autograd.grad(loss, (grad, act))
        synchronize()

    benchmark.pedantic(backward, setup=setup, rounds=3 if path == "loop" else 15,
                       warmup_rounds=1)


@pytest.mark.parametrize("path, size", _params())
def test_full(benchmark, path, size):
    checked(path, size)
    benchmark.group = f"loss-full-{size}"
    benchmark.extra_info["peak_mb"] = peak_memory_bytes(lambda: run_full(path, size)) / 2**20
    benchmark.pedantic(run_full, args=(path, size), rounds=3 if path == "loop" else 15,
                       warmup_rounds=1)


def _copy_bandwidth(nbytes: int, repeats: int = 20) -> float:
    """Device copy bandwidth in bytes/s (bytes read + written), median of ``repeats`` copies."""
    src = torch.empty(nbytes // 8, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        synchronize()
        start = torch.cuda.Event(enable_timing=True) if DEVICE.type == "cuda" else None
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


@pytest.mark.parametrize("size", list(SIZES))
def test_bandwidth_floor(benchmark, size):
    """The fused full pass against the memory-bandwidth floor: forward and backward must read
    ``grad`` and ``act`` once each and write ``dgrad`` and ``dact``: 6·T·D·bytes, moved at the
    measured copy bandwidth. ``extra_info["floor_fraction"]`` = floor time / median time."""
    checked("fused", size)
    grad, _, _, _ = inputs(size)
    must_move = 6 * grad.numel() * grad.element_size()
    bandwidth = _copy_bandwidth(must_move)
    benchmark.group = f"loss-floor-{size}"
    benchmark.pedantic(run_full, args=("fused", size), rounds=15, warmup_rounds=1)
    floor = must_move / bandwidth
    benchmark.extra_info["copy_gb_per_s"] = bandwidth / 1e9
    benchmark.extra_info["floor_ms"] = floor * 1e3
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["floor_fraction"] = floor / benchmark.stats.stats.median
