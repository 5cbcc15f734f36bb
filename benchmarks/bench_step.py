"""One SOrT training step of the Pythia-style model: the fused path against the naive paths
(the authors' per-triple training and plain vectorised autograd).

Run::

    python -m pytest benchmarks/bench_step.py --benchmark-only -q --benchmark-json step.json
    python benchmarks/summarize.py step.json
    python benchmarks/bench_step.py        # the fused step's time split, printed

Data: the first 64 groups of the embedded synthetic benchmark (``SyntheticIntrospect(seed=0)``,
679 questions on 45 images, 1138 ``(reasoning, sub, irrelevant)`` triples). Sizes:

* ``small``: the synthetic benchmark's model (:class:`~sort_fast.models.PythiaConfig`
  defaults: 64-d regions, 256-d joint embedding, 10 answers, dropout 0.1).
* ``pythia``: :func:`~sort_fast.models.pythia_sizes` (300-d words, 1024-d LSTM, 5000-d
  attention and joint spaces, 3129 answers, no dropout) on the same questions, with random
  non-negative 2048-d features for 36 regions per image and the answers spread over 3129 classes.

Every path does the same training work: the loss of every ``(sub, irrelevant)`` pair of every
group (SOrT hinge, margin 0) plus the BCE terms (``λ = 2.27, 2.27, 3e-4``), backward and one
``Adamax`` step:

* ``original``: the authors' way. Samples are triples; a batch of the reasoning questions, one of
  the sub-questions and one of the irrelevant questions (one row per triple, each with its own
  copy of the image's regions and its own question encoding, as a standard VQA model sees a
  batch) go through three forward passes and three ``autograd.grad(scores, joint,
  grad_outputs=one_hot, create_graph=True)`` calls; cosines in a Python loop over the triples;
  hinge and BCE averaged over triples.
* ``vectorized``: the packed layout with the same per-row inputs (every question row its own
  image copy and question encoding), one forward, one ``autograd.grad(scores.gather(1, c).sum(),
  joint, create_graph=True)``, :func:`bench_loss.vectorized_loss` and the per-role BCE.
* ``vectorized_shared``: the vectorised autograd path on the shared-input forward the fused path
  uses (image side once per image, question side once per distinct question): what is left of
  the fused path's gain once the inputs are shared, i.e. the closed form and the fused loss.
* ``fused``: :class:`sort_fast.training.Objective` ``("sort")``: image side once per image,
  question side once per distinct question (167 of the 679 rows),
  closed-form :func:`~sort_fast.ops.head_gradcam.head_gradcam`, :class:`~sort_fast.SOrTLoss`.
* ``fused_compiled``: the same objective under ``torch.compile`` (the trainer's
  ``--compile``: one graph, no break), compiled in the untimed warm-up step.
* ``fused_cuda_graph`` (GPU only): the fused step on the batch padded to a static shape,
  compiled with ``mode="reduce-overhead"`` and replayed as a CUDA graph
  (:func:`make_cuda_graph_step`).

Group ``step-<size>``; ``extra_info``: ``triples_per_s`` (triples / median step time) and
``peak_mb`` (one step after a warm-up step, so without the optimizer state's first allocation,
:func:`common.peak_memory_bytes`). Before timing, each size is checked
once on fresh copies of the model in eval mode (no dropout): the contrastive term per group and
the parameter gradients of the contrastive term alone must agree across the four paths (the
original path averages its total loss over triples, the others over groups and roles, so the
totals differ by definition); the vectorised and fused totals and all their gradients must agree.
Tolerances: per-group loss ``rtol=1e-4, atol=1e-6``; every gradient entry
``|a - b| <= 1e-3 · |b| + 1e-4 · s``, ``s`` the largest gradient entry of all parameters (some
gradients, e.g. of the bias before a softmax, are 0 up to rounding). Group
``step-breakdown-<size>`` times the fused step in stages (:func:`step_breakdown`) and stores each
stage's fraction of the step in ``extra_info``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Callable, Dict, List, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench_loss import vectorized_loss
from common import DEVICE, peak_memory_bytes, smoke, synchronize
from sort_fast import contrastive_gradient_loss
from sort_fast.data import PackedBatch, SyntheticIntrospect, collate_groups
from sort_fast.data.buckets import ShapeBuckets, pad_to_bucket
from sort_fast.losses import role_bce
from sort_fast.models import PythiaConfig, PythiaVQA, pythia_sizes
from sort_fast.training import Objective, gradcam_gradient
from sort_fast.training.static_step import (
    compile_objective,
    compile_static_step,
    make_optimizer,
    train_step,
)

NUM_GROUPS = 64
LAMBDAS = (2.27, 2.27, 3e-4)
PYTHIA_REGIONS, PYTHIA_ANSWERS = 36, 3129
SIZES = ("small", "pythia")
PATHS = ("original", "vectorized", "vectorized_shared", "fused", "fused_compiled")
ROUNDS = {"small": {"original": 3, "vectorized": 30, "vectorized_shared": 30, "fused": 30,
                    "fused_compiled": 30},
          "pythia": {"original": 1, "vectorized": 2, "vectorized_shared": 2, "fused": 2,
                     "fused_compiled": 2}}


class Setup(NamedTuple):
    model: PythiaVQA          # the initial weights; every path trains its own copy
    batch: PackedBatch        # the 64 groups packed (docs/ops.md)
    per_row: PackedBatch      # the same, every question row with its own image copy
    triples: List[PackedBatch]  # the original path's reasoning, sub and irrelevant batches
    triple_group: torch.Tensor  # group of each triple [P]


def _pythia_groups(groups):
    """The groups with Pythia-shaped images (36 random 2048-d regions, one set per image id) and
    their answers mapped to distinct classes out of 3129."""
    answers = np.random.default_rng(0).permutation(PYTHIA_ANSWERS)
    boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (PYTHIA_REGIONS, 1))
    out = []
    for g in groups:
        feats = np.random.default_rng(g.image_id).random((PYTHIA_REGIONS, 2048), np.float32)
        targets = [{int(answers[a]): s for a, s in t.items()} for t in g.targets]
        out.append(dataclasses.replace(g, features=feats, boxes=boxes, grounding=None,
                                       targets=targets, num_answers=PYTHIA_ANSWERS))
    return out


def _own_images(batch: PackedBatch) -> PackedBatch:
    """``batch`` with its own copy of the image for every question row (as the authors'
    dataloader yields samples)."""
    image = batch.image_index
    return batch.replace(
        image_features=batch.image_features[image], image_boxes=batch.image_boxes[image],
        image_mask=batch.image_mask[image],
        image_index=torch.arange(image.numel(), device=image.device),
        image_ids=[batch.image_ids[i] for i in image.tolist()])


def _question_batch(batch: PackedBatch, rows: torch.Tensor) -> PackedBatch:
    """The questions ``rows`` of ``batch``, one sample each with its own copy of its image. The
    layout fields are not read by the model; they describe the rows as a single group."""
    return _own_images(batch.replace(
        question_tokens=batch.question_tokens[rows],
        question_lengths=batch.question_lengths[rows], image_index=batch.image_index[rows],
        offsets=torch.tensor([0, rows.numel()], device=rows.device),
        num_sub=torch.tensor([rows.numel() - 1], device=rows.device),
        targets=batch.targets[rows], classes=batch.classes[rows],
        grounding=batch.grounding[:0], has_grounding=batch.has_grounding[:0],
        question_ids=[batch.question_ids[i] for i in rows.tolist()]))


@functools.lru_cache(maxsize=None)
def setup(size: str) -> Setup:
    ds = SyntheticIntrospect(seed=0, split="train", num_groups=NUM_GROUPS)
    groups = list(ds)
    if size == "pythia":
        groups, cfg = _pythia_groups(groups), pythia_sizes(len(ds.vocab), PYTHIA_ANSWERS)
    else:
        cfg = PythiaConfig(len(ds.vocab), ds.num_answers)
    torch.manual_seed(0)
    model = PythiaVQA(cfg).to(DEVICE)
    batch = collate_groups(groups).to(DEVICE)
    rows: List[List[int]] = [[], [], []]
    group_of: List[int] = []
    for g in range(batch.num_groups):
        a, b, k = int(batch.offsets[g]), int(batch.offsets[g + 1]), int(batch.num_sub[g])
        for s in range(a + 1, a + 1 + k):
            for i in range(a + 1 + k, b):
                for role, row in enumerate((a, s, i)):
                    rows[role].append(row)
                group_of.append(g)
    triples = [_question_batch(batch, torch.tensor(r, device=DEVICE)) for r in rows]
    return Setup(model, batch, _own_images(batch), triples, torch.tensor(group_of, device=DEVICE))


# --------------------------------------------------------------------------- the losses


def original_terms(model: PythiaVQA, triples: List[PackedBatch]):
    """The authors' loss terms: per-triple hinge ``[P]`` and the BCE of the reasoning, sub and
    irrelevant batches (summed over answers, averaged over triples)."""
    cams, bce = [], []
    for part in triples:
        out = model(part, share_questions=False)
        one_hot = F.one_hot(part.classes, out.scores.shape[1]).to(out.scores.dtype)
        (g,) = torch.autograd.grad(out.scores, out.joint, grad_outputs=one_hot, create_graph=True)
        cams.append(g * out.joint)
        bce.append(F.binary_cross_entropy_with_logits(out.scores, part.targets,
                                                      reduction="none").sum(1).mean())
    r, s, i = cams
    hinge = []
    for t in range(r.shape[0]):
        sim_s = F.cosine_similarity(r[t:t + 1], s[t:t + 1])
        sim_i = F.cosine_similarity(r[t:t + 1], i[t:t + 1])
        hinge.append(F.relu(sim_i - sim_s))
    return torch.cat(hinge), bce


def original_loss(model, setup_: Setup) -> torch.Tensor:
    hinge, bce = original_terms(model, setup_.triples)
    return hinge.mean() + sum(lam * b for lam, b in zip(LAMBDAS, bce))


def vectorized_parts(model, s: Setup, path: str):
    """``(grad, joint, contrastive, total)`` of the vectorised autograd path: on
    per-row inputs (``path="vectorized"``) or on shared ones (``"vectorized_shared"``)."""
    shared = path == "vectorized_shared"
    batch = s.batch if shared else s.per_row
    out = model(batch, share_questions=shared)
    y = out.scores.gather(1, batch.classes[:, None]).sum()
    (grad,) = torch.autograd.grad(y, out.joint, create_graph=True)
    contrastive = vectorized_loss(grad, out.joint, batch.offsets, batch.num_sub)
    bce = role_bce(out.scores, batch.targets, batch.offsets, batch.num_sub)
    return grad, out.joint, contrastive, contrastive + sum(lam * b for lam, b in zip(LAMBDAS, bce))


def make_objective() -> Objective:
    lr, ls, li = LAMBDAS
    return Objective("sort", lambda_reasoning=lr, lambda_sub=ls, lambda_irrelevant=li,
                     margin=0.0, lambda_attention=0.0, naive=False)


def fused_parts(model, batch: PackedBatch, sort_loss, mark: Callable[[], None] = lambda: None):
    """``Objective("sort")``'s computation stage by stage (``mark()`` after each stage):
    forward to the joint embedding, closed-form Grad-CAM with the classifier's scores, SOrT
    loss. Returns ``(grad, joint, SOrTLossOutput)``."""
    out = model(batch, scores=False)
    mark()
    scores, grad = gradcam_gradient(model, out, batch.classes, naive=False)
    mark()
    parts = sort_loss(scores, batch.targets, grad, out.joint, batch.offsets, batch.num_sub)
    mark()
    return grad, out.joint, parts


@functools.lru_cache(maxsize=None)
def compiled_objective():
    """The trainer's ``--compile`` step: ``Objective("sort")`` under ``torch.compile``."""
    return compile_objective(make_objective())


LOSSES: Dict[str, Callable[[PythiaVQA, Setup], torch.Tensor]] = {
    "original": original_loss,
    "vectorized": lambda model, s: vectorized_parts(model, s, "vectorized")[3],
    "vectorized_shared": lambda model, s: vectorized_parts(model, s, "vectorized_shared")[3],
    "fused": lambda model, s: make_objective()(model, s.batch)[0],
    "fused_compiled": lambda model, s: compiled_objective()(model, s.batch)[0],
}


# --------------------------------------------------------------------------- correctness


def _check_terms(path: str, model: PythiaVQA, s: Setup):
    """Per-group contrastive loss ``[N]`` (0 for a group without irrelevant questions), the
    contrastive term (mean over groups with irrelevant questions, docs/math.md) and, for the packed
    paths, the total loss, from one forward."""
    batch = s.batch
    if path == "original":
        hinge, _ = original_terms(model, s.triples)
        sizes = batch.offsets[1:] - batch.offsets[:-1]
        pairs = batch.num_sub * (sizes - 1 - batch.num_sub)
        per_group = torch.zeros(batch.num_groups, dtype=hinge.dtype, device=hinge.device)
        per_group = per_group.index_add(0, s.triple_group, hinge) / pairs.clamp_min(1)
        return per_group, per_group[pairs > 0].mean(), None
    if path.startswith("vectorized"):
        grad, joint, contrastive, total = vectorized_parts(model, s, path)
    else:
        grad, joint, parts = fused_parts(model, batch, make_objective().sort_loss)
        contrastive, total = parts.contrastive, parts.total
    per_group = contrastive_gradient_loss(grad.detach(), joint.detach(), batch.offsets,
                                          batch.num_sub, reduction="none")
    return per_group, contrastive, total


def _grads(model: PythiaVQA, loss: torch.Tensor, retain: bool = False) -> Dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def _assert_grads_close(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], what: str):
    scale = max(float(w.abs().max()) for w in want.values())  # the largest gradient entry
    for name, w in want.items():
        err = (got[name] - w).abs()
        assert bool((err <= 1e-3 * w.abs() + 1e-4 * scale).all()), (
            f"{what}: gradient of {name} differs (max |err| {float(err.max()):.3g}, "
            f"max |grad| {float(w.abs().max()):.3g}, of all parameters {scale:.3g})")


@functools.lru_cache(maxsize=None)
def reference(path: str, size: str):
    """Eval-mode (deterministic) per-group contrastive loss, contrastive-only gradients and,
    for the packed paths, the total loss and its gradients, of a fresh copy of the model."""
    s = setup(size)
    model = copy.deepcopy(s.model).eval()
    per_group, contrastive, total = _check_terms(path, model, s)
    result = {"per_group": per_group.detach(),
              "contrastive": _grads(model, contrastive, retain=total is not None)}
    if total is not None:
        result["total"], result["grads"] = total.detach(), _grads(model, total)
    if path == "fused":  # the staged computation is the trainer's objective
        torch.testing.assert_close(LOSSES["fused"](model, s).detach(), result["total"])
    return result


@functools.lru_cache(maxsize=None)
def checked(path: str, size: str) -> None:
    """Fails the benchmark unless ``path`` agrees with the other two paths (see module doc)."""
    mine = reference(path, size)
    for other in PATHS:
        if other == path:
            continue
        theirs = reference(other, size)
        what = f"{path} vs {other} ({size})"
        torch.testing.assert_close(mine["per_group"], theirs["per_group"], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{what}: per-group loss: {m}")
        _assert_grads_close(mine["contrastive"], theirs["contrastive"], what + " contrastive")
        if "total" in mine and "total" in theirs:
            torch.testing.assert_close(mine["total"], theirs["total"], rtol=1e-5, atol=1e-6)
            _assert_grads_close(mine["grads"], theirs["grads"], what + " total")


# --------------------------------------------------------------------------- benchmarks


def make_step(path: str, size: str) -> Callable[[], None]:
    """One training step of ``path`` on its own copy of the model (train mode)."""
    s = setup(size)
    model = copy.deepcopy(s.model).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    loss_fn = LOSSES[path]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, s).backward()
        optimizer.step()
        synchronize()

    return step


def _bench_step(benchmark, path: str, size: str) -> None:
    checked(path, size)
    benchmark.group = f"step-{size}"
    step = make_step(path, size)
    step()  # warm-up; allocates the optimizer state, so peak_mb is one step's working memory
    benchmark.extra_info["peak_mb"] = peak_memory_bytes(step) / 2**20
    benchmark.pedantic(step, rounds=ROUNDS[size][path])
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["triples_per_s"] = (
            setup(size).triple_group.numel() / benchmark.stats.stats.median)


sizes = pytest.mark.parametrize("size", SIZES)


@sizes
def test_step_original(benchmark, size):
    _bench_step(benchmark, "original", size)


@sizes
def test_step_vectorized(benchmark, size):
    _bench_step(benchmark, "vectorized", size)


@sizes
def test_step_vectorized_shared(benchmark, size):
    _bench_step(benchmark, "vectorized_shared", size)


@sizes
def test_step_fused(benchmark, size):
    _bench_step(benchmark, "fused", size)


@sizes
def test_step_fused_compiled(benchmark, size):
    _bench_step(benchmark, "fused_compiled", size)


def make_cuda_graph_step(size: str) -> Callable[[], None]:
    """The trainer's ``--cuda-graphs`` step (docs/ops.md, "Static shapes and CUDA graphs"): the
    batch padded on the host to a static shape, the objective under
    ``compile_static_step(mode="reduce-overhead")`` (CUDA graphs), Adamax with
    ``capturable=True``, :func:`~sort_fast.training.static_step.train_step`. Under
    ``SORT_BENCH_SMOKE=1`` on the CPU it traces with Dynamo's ``eager`` backend instead (no
    graphs, no Inductor): the code path is exercised, the time means nothing."""
    s = setup(size)
    model = copy.deepcopy(s.model).train()
    batch = pad_to_bucket(s.batch.to("cpu"), ShapeBuckets())
    padded_total = make_objective()(copy.deepcopy(s.model).eval(), batch)[0].detach()
    torch.testing.assert_close(padded_total, reference("fused", size)["total"].cpu(),
                               rtol=1e-5, atol=1e-6, msg=lambda m: f"padded batch ({size}): {m}")
    batch = batch.pin_memory().to(DEVICE, non_blocking=True) if DEVICE.type == "cuda" else batch
    graphs = DEVICE.type == "cuda"
    optimizer = make_optimizer(model.parameters(), 1e-3, capturable=graphs)
    objective = make_objective()
    loss_fn = compile_static_step(objective, **({"mode": "reduce-overhead"} if graphs
                                                else {"backend": "eager"}))

    def step() -> None:
        train_step(model, batch, objective, optimizer, loss_fn=loss_fn)
        synchronize()

    return step


@sizes
def test_step_fused_cuda_graph(benchmark, size):
    """The fused step captured in a CUDA graph (replayed every step after three warm-up steps:
    compilation, recording, capture); the padded batch is first checked against the unpadded
    total in eval mode."""
    if DEVICE.type != "cuda" and not smoke():
        pytest.skip("CUDA graphs need a GPU")
    checked("fused", size)
    benchmark.group = f"step-{size}"
    step = make_cuda_graph_step(size)
    for _ in range(3):
        step()
    benchmark.extra_info["peak_mb"] = peak_memory_bytes(step) / 2**20
    benchmark.pedantic(step, rounds=ROUNDS[size]["fused"])
    if benchmark.stats:
        benchmark.extra_info["triples_per_s"] = (
            setup(size).triple_group.numel() / benchmark.stats.stats.median)


STAGES = ("forward", "gradcam", "loss", "backward", "optimizer")


def step_breakdown(size: str, rounds: int = 2) -> Dict[str, float]:
    """Median seconds of each stage of the fused step (what ``Objective("sort")`` does, stage by
    stage, train mode): model forward (joint embedding), closed-form Grad-CAM (with the
    classifier's scores), SOrT loss, backward, optimizer step. One warm-up step first."""
    s = setup(size)
    model = copy.deepcopy(s.model).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    sort_loss = make_objective().sort_loss
    times: Dict[str, List[float]] = {k: [] for k in STAGES}
    for r in range(rounds + 1):
        marks = [time.perf_counter()]

        def mark():
            synchronize()
            marks.append(time.perf_counter())

        optimizer.zero_grad(set_to_none=True)
        fused_parts(model, s.batch, sort_loss, mark)[2].total.backward()
        mark()
        optimizer.step()
        mark()
        if r:
            for k, a, b in zip(STAGES, marks, marks[1:]):
                times[k].append(b - a)
    return {k: float(np.median(v)) for k, v in times.items()}


@pytest.mark.parametrize("size", SIZES)
def test_step_breakdown(benchmark, size):
    benchmark.group = f"step-breakdown-{size}"
    split = benchmark.pedantic(step_breakdown, args=(size,), rounds=1, iterations=1)
    total = sum(split.values())
    for k, v in split.items():
        benchmark.extra_info[f"frac_{k}"] = v / total
    print(f"\nfused step split ({size}, {total * 1e3:.1f} ms): "
          + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in split.items()))


if __name__ == "__main__":
    for name in SIZES:
        split = step_breakdown(name)
        total = sum(split.values())
        print(f"{name}: {total * 1e3:.1f} ms: "
              + ", ".join(f"{k} {v * 1e3:.1f} ({v / total:.0%})" for k, v in split.items()))
