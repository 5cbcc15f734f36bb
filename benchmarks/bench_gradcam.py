"""Closed-form head Grad-CAM (docs/math.md) against autograd with ``create_graph=True``.

Run (benchmark-only; nothing here is a plain test)::

    python -m pytest benchmarks/bench_gradcam.py --benchmark-only -q --benchmark-json gc.json
    python benchmarks/summarize.py gc.json --reference closed

Heads (float32, train mode, dropout 0.5, T = 640 rows in 64 groups of 1 reasoning + 3 sub +
6 irrelevant questions, classes uniform over 3129 answers):

* ``mlp``: ``Linear(2048, 2048) -> ReLU -> Dropout -> Linear(2048, 3129)``.
* ``pythia``: Pythia's logit classifier on a 5000-d joint embedding, two weight-normalised
  branches with hidden 5000 each (the released model uses 300 for text and 5000 for image;
  both at 5000 is the heavier case).
* ``vilt``: ViLT's VQA answer head, ``Linear(768, 1536) -> LayerNorm -> GELU ->
  Linear(1536, 3129)`` (closed form through the LayerNorm Jacobian and GELU's derivative).

Paths: ``closed`` (``head_gradcam(..., times_input=True)``), ``autograd_onehot`` (the authors'
way: ``autograd.grad(scores, h, grad_outputs=one_hot, create_graph=True)``) and
``autograd_gather`` (``autograd.grad(scores.gather(1, c).sum(), h, create_graph=True)``).
Groups ``<phase>-<head>-<device>``: ``forward`` (scores and G = g * h), ``backward``
(``loss.backward()`` of a SOrT-like loss on G and the scores, the forward in untimed setup)
and ``full`` (both), on CPU and, where there is one, on CUDA. Each path's scores and G are
checked against ``autograd_gather`` once before timing; ``full`` stores the peak memory of one
step (MB, :func:`common.peak_memory_bytes`) in ``extra_info``.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from bench_loss import vectorized_hinge
from common import peak_memory_bytes, synchronize
from sort_fast.heads import mlp_head, pythia_classifier
from sort_fast.ops.head_gradcam import head_gradcam

ROWS, GROUP, NUM_SUB, ANSWERS = 640, 10, 3, 3129
HEADS: Dict[str, Tuple[Callable[[], torch.nn.Module], int]] = {
    "mlp": (lambda: mlp_head(2048, 2048, ANSWERS, dropout=0.5), 2048),
    "pythia": (lambda: pythia_classifier(5000, 5000, 5000, ANSWERS, dropout=0.5), 5000),
    # ViLT-B/32's VQA head: Linear -> LayerNorm -> GELU -> Linear (no dropout)
    "vilt": (lambda: torch.nn.Sequential(torch.nn.Linear(768, 1536), torch.nn.LayerNorm(1536),
                                         torch.nn.GELU(), torch.nn.Linear(1536, ANSWERS)), 768),
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


PATHS = {"closed": gradcam_closed, "autograd_onehot": gradcam_onehot,
         "autograd_gather": gradcam_gather}


def sort_loss(scores: torch.Tensor, G: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Contrastive gradient loss (docs/math.md) of the equal-size groups plus BCE on the scores."""
    offsets = torch.arange(0, ROWS + 1, GROUP, device=G.device)
    num_sub = torch.full((ROWS // GROUP,), NUM_SUB, device=G.device)
    return (vectorized_hinge(G, offsets, num_sub)
            + 2.27 * F.binary_cross_entropy_with_logits(scores, targets))


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


def forward_step(path: str, head, h, classes, targets):
    scores, G = PATHS[path](head, h, classes)
    return sort_loss(scores, G, targets)


def full_step(path: str, head, h, classes, targets) -> None:
    head.zero_grad(set_to_none=True)
    h.grad = None
    forward_step(path, head, h, classes, targets).backward()


@functools.lru_cache(maxsize=None)
def checked(path: str, head_name: str, device: str) -> None:
    """Fails the benchmark unless ``path`` gives the scores and G of ``autograd_gather``."""
    head, h, classes, _ = setup(head_name, device)
    results = []
    for p in (path, "autograd_gather"):
        torch.manual_seed(1)  # the same dropout mask for both paths
        results.append(PATHS[p](head, h, classes))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


params = pytest.mark.parametrize("path", list(PATHS))
heads = pytest.mark.parametrize("head_name", list(HEADS))
devices = pytest.mark.parametrize("device", DEVICES)
ROUNDS = {"mlp": 5, "pythia": 3, "vilt": 10}


@devices
@heads
@params
def test_forward(benchmark, path, head_name, device):
    benchmark.group = f"forward-{head_name}-{device}"
    args = setup(head_name, device)

    def run():
        with torch.enable_grad():
            PATHS[path](*args[:3])
        synchronize()

    checked(path, head_name, device)
    benchmark.pedantic(run, rounds=ROUNDS[head_name], iterations=1, warmup_rounds=1)


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
        synchronize()
        return (loss,), {}

    def run(loss):
        loss.backward()
        synchronize()

    checked(path, head_name, device)
    benchmark.pedantic(run, setup=make_loss, rounds=ROUNDS[head_name], iterations=1,
                       warmup_rounds=1)


@devices
@heads
@params
def test_full(benchmark, path, head_name, device):
    benchmark.group = f"full-{head_name}-{device}"
    args = setup(head_name, device)

    def run():
        full_step(path, *args)
        synchronize()

    checked(path, head_name, device)
    benchmark.extra_info["peak_mb"] = peak_memory_bytes(run, torch.device(device)) / 2**20
    benchmark.pedantic(run, rounds=ROUNDS[head_name], iterations=1, warmup_rounds=1)
