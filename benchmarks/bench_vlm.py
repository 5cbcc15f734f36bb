"""One SOrT training step of the LLaVA-style decoder (:class:`~sort_fast.models.LlavaVQA`):
the closed-form Grad-CAM of the answer-token head against autograd and against what a user of
plain ``transformers`` writes (the SOrT authors' way, as they did with Pythia).

Run::

    python -m pytest benchmarks/bench_vlm.py --benchmark-only -q \\
        --benchmark-columns=min,median,max,rounds --benchmark-json vlm.json
    python benchmarks/summarize.py vlm.json

Sizes (``width``): a decoder width users train. ``2048``: TinyLlama-like (intermediate 5632,
32 heads, 4 key/value heads); ``4096`` (``--benchmark-full`` only): Llama-2-7B/Vicuna-like
(intermediate 11008, 32 heads, 32 key/value heads). Both with a 32000-token vocabulary, 3129
answers (VQAv2's answer vocabulary, each its own token), 2048-d region features and ONE decoder
layer: the decoder layers cost the same in every path (Grad-CAM is taken after the last one), the
part that differs is the head on top (final norm and LM head), so one layer keeps a step at a few
seconds on a 2-core CPU while keeping the head at full size. Data: the first
:data:`NUM_GROUPS` groups of the embedded synthetic benchmark (``SyntheticIntrospect(seed=0)``,
32 questions for 3 groups), each image 36 random non-negative 2048-d regions, each question
lengthened with random words of the benchmark's vocabulary to 16..24 tokens (mean 20), its
answers spread over the 3129 classes; every sequence is 36 region tokens, the question and one
answer prompt token.

Every path does the same work: forward, the Grad-CAM gradient ``d y_c / d joint`` at the
decoder's hidden state at the answer prompt after the last layer (before the final norm), the
full SOrT loss (contrastive term over every ``(sub, irrelevant)`` pair, margin 0, and the BCE
terms, ``λ = 2.27, 2.27, 3e-4``: :func:`bench_step.make_objective`'s
:class:`~sort_fast.SOrTLoss`, the same object in every path) and backward to every trainable
parameter; no optimizer step. Gradients are set to ``None`` before each round, outside the timed
call, so every round (and the peak memory) includes allocating the parameter gradients.

Group ``vlm-step-<width>``:

* ``closed_form``: the trainer's path, :class:`~sort_fast.training.Objective` ``("sort")``:
  ``model(batch, scores=False)``, then
  :func:`~sort_fast.ops.head_gradcam.head_gradcam` of ``model.classifier`` (the answer rows of
  the LM head only, no double backward) through
  :func:`~sort_fast.training.gradcam_gradient` ``(naive=False)``.
* ``closed_form_per_question``: the same with ``model(batch, share_images=False)``: every
  question's whole sequence through the decoder, its image's region tokens included (the
  default runs them once per image and the questions attend to their cached keys and values).
* ``autograd``: ``model(batch)`` (answer-token scores from the answer rows of the LM head), then
  ``torch.autograd.grad(scores[c].sum(), joint, create_graph=True)``
  (``gradcam_gradient(naive=True)``).
* ``authors_three_passes``: the ``transformers`` model's own forward,
  ``model.llava(inputs_embeds=..., attention_mask=..., logits_to_keep=0)``, full-vocabulary
  logits at every position; the answer tokens' logits gathered at the answer position; the
  pre-norm hidden state of the last layer (a forward hook: ``output_hidden_states`` gives the
  normed one) is what ``torch.autograd.grad(..., create_graph=True)`` differentiates; then
  ``loss.backward()``: three passes through the full LM head. The decoder inputs are
  :meth:`LlavaVQA.decoder_inputs <sort_fast.models.LlavaVQA.decoder_inputs>`.

Group ``vlm-head-<width>``: the head alone, what the closed form changes. ``joint [T, D]`` (the
model's, detached, requiring grad) through the scores, the Grad-CAM gradient, the SOrT loss and
backward to ``joint`` and the head's parameters (final norm, LM head): ``head_closed_form``
(``head_gradcam``) against ``head_autograd`` (``model.classifier(joint)`` then
``autograd.grad(create_graph=True)``).

``extra_info``: ``peak_mb`` (:func:`common.peak_memory_bytes` of the first call, gradients
``None`` before it), ``questions_per_s`` (questions / median), ``closed_form`` (whether
:func:`~sort_fast.ops.head_structure.closed_form_terms` has a closed form for
``model.classifier``: ``head_gradcam`` falls back to autograd otherwise, and
``closed_form_reason`` says why) and the sizes. Before timing, each width's losses of all three
step paths (and of both head paths) are computed once and must agree (``rtol=1e-4``, float32),
and every benchmark's first call must give that loss.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, NamedTuple, Tuple

import numpy as np
import pytest
import torch

from bench_step import make_objective
from common import DEVICE, peak_memory_bytes, synchronize
from sort_fast.data import PackedBatch, SyntheticIntrospect, collate_groups
from sort_fast.models import LlavaVQA, LlavaVQAConfig
from sort_fast.models.llava import LlavaOutput
from sort_fast.ops.head_gradcam import head_gradcam
from sort_fast.ops.head_structure import closed_form_terms
from sort_fast.training import Objective, gradcam_gradient

WIDTHS = (2048, 4096)
#: decoder sizes per width (the smoke sizes replace them with a tiny decoder)
DECODER: Dict[int, Dict[str, int]] = {
    2048: dict(hidden_size=2048, intermediate_size=5632, num_heads=32, num_kv_heads=4),
    4096: dict(hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32),
}
NUM_LAYERS = 1
TEXT_VOCAB = 32000
NUM_ANSWERS = 3129
FEATURE_DIM = 2048
REGIONS = 36
QUESTION_TOKENS = (16, 24)  # each question lengthened to a length in this range (inclusive)
NUM_GROUPS = 3
ROUNDS = 3
STEP_VARIANTS = ("closed_form", "closed_form_per_question", "autograd", "authors_three_passes")
HEAD_VARIANTS = ("head_closed_form", "head_autograd")


class Setup(NamedTuple):
    model: LlavaVQA
    batch: PackedBatch
    joint: torch.Tensor  # the model's joint [T, D], detached (the head case's input)


def _vlm_groups(groups, vocab_size: int):
    """The groups with LLaVA-shaped inputs: :data:`REGIONS` random non-negative
    :data:`FEATURE_DIM`-d regions per image, questions lengthened with random words to
    :data:`QUESTION_TOKENS`, answers spread over :data:`NUM_ANSWERS` distinct classes."""
    rng = np.random.default_rng(0)
    answers = rng.permutation(NUM_ANSWERS)
    boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (REGIONS, 1))
    low, high = QUESTION_TOKENS
    out = []
    for g in groups:
        feats = np.random.default_rng(g.image_id).random((REGIONS, FEATURE_DIM), np.float32)
        tokens = [list(t) + rng.integers(1, vocab_size, max(0, int(rng.integers(low, high + 1))
                                                          - len(t))).tolist()
                  for t in g.question_tokens]
        targets = [{int(answers[a % NUM_ANSWERS]): s for a, s in t.items()} for t in g.targets]
        out.append(dataclasses.replace(g, features=feats, boxes=boxes, grounding=None,
                                       question_tokens=tokens, targets=targets,
                                       num_answers=NUM_ANSWERS))
    return out


@functools.lru_cache(maxsize=None)
def setup(width: int) -> Setup:
    ds = SyntheticIntrospect(seed=0, split="train", num_groups=NUM_GROUPS)
    batch = collate_groups(_vlm_groups(list(ds), len(ds.vocab))).to(DEVICE)
    cfg = LlavaVQAConfig(vocab_size=len(ds.vocab), num_answers=NUM_ANSWERS,
                         feature_dim=FEATURE_DIM, num_layers=NUM_LAYERS,
                         text_vocab_size=TEXT_VOCAB, **DECODER[width])
    torch.manual_seed(0)
    model = cfg.build().to(DEVICE).train()
    with torch.no_grad():
        joint = model(batch, scores=False).joint.detach()
    return Setup(model, batch, joint)


# --------------------------------------------------------------------------- the losses


def _sort_total(objective: Objective, scores, grad, joint, batch: PackedBatch) -> torch.Tensor:
    return objective.sort_loss(scores, batch.targets, grad, joint, batch.offsets, batch.num_sub,
                               group_mask=batch.group_valid).total


def authors_loss(model: LlavaVQA, batch: PackedBatch, objective: Objective) -> torch.Tensor:
    """The plain-``transformers`` step: full-vocabulary logits at every position, answer logits
    gathered at the answer prompt, Grad-CAM by ``autograd.grad(create_graph=True)`` at the last
    layer's (pre-norm) output."""
    embeds, mask, positions, rows, position = model.decoder_inputs(batch, share_images=False)[:5]
    captured = []

    def keep_output(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = model.llava.model.language_model.layers[-1].register_forward_hook(keep_output)
    try:
        logits = model.llava(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             use_cache=False, logits_to_keep=0).logits     # [T, S, V]
    finally:
        handle.remove()
    hidden = captured[0]                                                           # [T, S, D]
    scores = logits[rows, position][:, model.answer_head.answer_tokens]            # [T, A]
    y = scores.gather(1, batch.classes[:, None]).sum()
    (grad,) = torch.autograd.grad(y, hidden, create_graph=True)
    return _sort_total(objective, scores, grad[rows, position], hidden[rows, position], batch)


def step_loss(variant: str, model: LlavaVQA, batch: PackedBatch,
              objective: Objective) -> torch.Tensor:
    if variant == "closed_form":
        return objective(model, batch)[0]
    if variant == "closed_form_per_question":
        out = model(batch, scores=False, share_images=False)
        scores, grad = gradcam_gradient(model, out, batch.classes, naive=False)
        return _sort_total(objective, scores, grad, out.joint, batch)
    if variant == "autograd":
        out = model(batch)
        scores, grad = gradcam_gradient(model, out, batch.classes, naive=True)
        return _sort_total(objective, scores, grad, out.joint, batch)
    if variant == "authors_three_passes":
        return authors_loss(model, batch, objective)
    raise ValueError(variant)


def head_loss(variant: str, model: LlavaVQA, batch: PackedBatch, joint: torch.Tensor,
              objective: Objective) -> torch.Tensor:
    head = model.classifier
    if variant == "head_closed_form":
        scores, grad = head_gradcam(head, joint, batch.classes)
    elif variant == "head_autograd":
        out = LlavaOutput(scores=head(joint), joint=joint, region_tokens=None)
        scores, grad = gradcam_gradient(model, out, batch.classes, naive=True)
    else:
        raise ValueError(variant)
    return _sort_total(objective, scores, grad, joint, batch)


# --------------------------------------------------------------------------- correctness


@functools.lru_cache(maxsize=None)
def reference(width: int, case: str) -> Dict[str, float]:
    """The loss of every variant of ``case`` (``"step"`` or ``"head"``) at ``width``, which
    must agree (rtol 1e-4)."""
    s = setup(width)
    objective = make_objective()
    if case == "step":
        losses = {v: float(step_loss(v, s.model, s.batch, objective).detach())
                  for v in STEP_VARIANTS}
    else:
        joint = s.joint.clone().requires_grad_()
        losses = {v: float(head_loss(v, s.model, s.batch, joint, objective).detach())
                  for v in HEAD_VARIANTS}
    first, want = next(iter(losses.items()))
    for name, value in losses.items():
        np.testing.assert_allclose(value, want, rtol=1e-4,
                                   err_msg=f"width {width}: {name} loss vs {first}: {losses}")
    return losses


# --------------------------------------------------------------------------- benchmarks


def make_step(width: int, variant: str
              ) -> Tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """``(step, clear)``: one step of ``variant`` (forward, Grad-CAM, SOrT loss, backward;
    returns the loss) and what runs before it (parameter gradients, and the head case's
    ``joint.grad``, set to ``None``)."""
    s = setup(width)
    objective = make_objective()
    joint = s.joint.clone().requires_grad_()

    def clear() -> None:
        s.model.zero_grad(set_to_none=True)
        joint.grad = None

    def step() -> torch.Tensor:
        if variant in HEAD_VARIANTS:
            loss = head_loss(variant, s.model, s.batch, joint, objective)
        else:
            loss = step_loss(variant, s.model, s.batch, objective)
        loss.backward()
        synchronize()
        return loss.detach()

    return step, clear


def _bench(benchmark, width: int, variant: str, case: str) -> None:
    losses = reference(width, case)
    s = setup(width)
    benchmark.group = f"vlm-{case}-{width}"
    step, clear = make_step(width, variant)
    clear()
    result = []
    benchmark.extra_info["peak_mb"] = peak_memory_bytes(lambda: result.append(step())) / 2**20
    np.testing.assert_allclose(float(result[0]), losses[variant], rtol=1e-4,
                               err_msg=f"{variant} ({width}): first call's loss")
    terms = closed_form_terms(s.model.classifier)
    cfg = s.model.config
    benchmark.extra_info.update(
        closed_form=not isinstance(terms, str),
        closed_form_reason=terms if isinstance(terms, str) else "",
        questions=s.batch.classes.numel(), groups=s.batch.num_groups,
        sequence=REGIONS + s.batch.question_tokens.shape[1] + 1, hidden=cfg.hidden_size,
        layers=cfg.num_layers, vocab=s.model.llava.lm_head.out_features, answers=NUM_ANSWERS,
        threads=torch.get_num_threads())
    benchmark.pedantic(step, setup=clear, rounds=ROUNDS, warmup_rounds=0)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["questions_per_s"] = (
            s.batch.classes.numel() / benchmark.stats.stats.median)


widths = pytest.mark.parametrize("width", WIDTHS)


@widths
@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_vlm_step(benchmark, width, variant):
    _bench(benchmark, width, variant, "step")


@widths
@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_vlm_head(benchmark, width, variant):
    _bench(benchmark, width, variant, "head")
