"""The LLaVA-style decoder (sort_fast/models/llava.py): the closed-form SOrT path against
autograd in float64, masking and causality, Grad-CAM at an inner layer (finite differences),
LoRA, ``save_pretrained`` folders, and the trainer and evaluator with ``--model llava``
(tiny random decoders: 16 wide, 1-2 layers, nothing downloaded)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from sort_fast.data import PackedBatch, SyntheticIntrospect, collate_groups
from sort_fast.models import LlavaVQA, LlavaVQAConfig
from sort_fast.models.llava import closed_form_norm, load_hf_config
from sort_fast.train import main
from sort_fast.training import Objective
from sort_fast.training import checkpoint as ckpt
from sort_fast.training.objective import gradcam_gradient

# until head_gradcam has its closed form for AnswerTokenHead it warns and takes autograd: the
# values tested here are the same either way
pytestmark = pytest.mark.filterwarnings("ignore:head_gradcam. no closed form:UserWarning")

FEATURES = 8
LOSS_WEIGHTS = dict(lambda_reasoning=1.0, lambda_sub=1.0, lambda_irrelevant=0.5, margin=0.0,
                    lambda_attention=1.0)


def _config(ds, **kw) -> LlavaVQAConfig:
    sizes = dict(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                 num_kv_heads=1)
    return LlavaVQAConfig(len(ds.vocab), ds.num_answers, ds.feature_dim, **{**sizes, **kw})


def _model(ds, seed: int = 0, **kw) -> LlavaVQA:
    torch.manual_seed(seed)
    return _config(ds, **kw).build().eval()


def _float64(model: LlavaVQA) -> LlavaVQA:
    """``model`` in float64 throughout: transformers' ``LlamaRMSNorm`` computes in float32
    whatever its input (its output is float32-rounded in a float64 model, noise that finite
    differences divide by eps), so the decoder layers' norms become ``nn.RMSNorm`` of the same
    weights (:func:`closed_form_norm`, as the final norm already is)."""
    model = model.double()
    for layer in model.llava.model.language_model.layers:
        layer.input_layernorm = closed_form_norm(layer.input_layernorm)
        layer.post_attention_layernorm = closed_form_norm(layer.post_attention_layernorm)
    return model


def _double(batch: PackedBatch) -> PackedBatch:
    return batch.replace(image_features=batch.image_features.double(),
                         targets=batch.targets.double())


def _dataset(seed: int, groups: int) -> SyntheticIntrospect:
    return SyntheticIntrospect(seed=seed, split="val", num_groups=groups, feature_dim=FEATURES)


def _ragged(ds, seed: int) -> Tuple[PackedBatch, PackedBatch]:
    """Two float64 batches of ``ds``'s groups (questions of several lengths, images of several
    region counts, zero-padded by collate) with some real regions also masked off, the first
    region of one image included (its sequence then starts with a region no query may
    attend); they differ only in the features of the masked regions (random in both)."""
    batch = _double(collate_groups(list(ds)))
    assert len(set(batch.question_lengths.tolist())) > 1
    assert len(set(batch.image_mask.sum(1).tolist())) > 1
    gen = torch.Generator().manual_seed(seed)
    mask = batch.image_mask.clone()
    mask[0, 0] = False
    for i in range(mask.shape[0]):
        real = int(mask[i].sum())
        mask[i, torch.randperm(real, generator=gen)[:2] + (1 if i == 0 else 0)] = False
    assert bool(mask.any(1).all()) and not bool(mask[0, 0])
    versions = []
    for _ in range(2):
        noise = torch.randn(batch.image_features.shape, generator=gen, dtype=torch.float64)
        feats = torch.where(mask[..., None], batch.image_features, 3 * noise)
        versions.append(batch.replace(image_mask=mask, image_features=feats))
    return versions[0], versions[1]


def _trainable(model) -> List[Tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _loss_and_grads(model, batch, kind: str, naive: bool
                    ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    loss, _ = Objective(kind, naive=naive, **LOSS_WEIGHTS)(model, batch)
    params = [p for _, p in _trainable(model)]
    return loss.detach(), list(torch.autograd.grad(loss, params, allow_unused=True))


def _close(a, b, tol: float, msg: str = "") -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=msg or None)


# ------------------------------------------------------------------------------------------
# 1. closed form = autograd (float64), padded regions masked out


@pytest.mark.parametrize("kind, seed", [("sort", 0), ("sort-sq", 1)])
def test_closed_form_loss_and_every_gradient_equal_autograd(kind, seed):
    ds = _dataset(seed, 3)
    model = _model(ds, seed).double()
    batch, other_padding = _ragged(ds, seed)
    fast_loss, fast = _loss_and_grads(model, batch, kind, naive=False)
    ref_loss, ref = _loss_and_grads(model, batch, kind, naive=True)
    assert math.isfinite(float(fast_loss)) and float(fast_loss) > 0
    _close(fast_loss, ref_loss, 1e-9)
    names = [n for n, _ in _trainable(model)]
    for name, a, b in zip(names, fast, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            _close(a, b, 1e-9, name)
    # everything the forward runs is trained: the decoder, its embeddings, the projector and
    # the LM head (the vision tower is kept but not run)
    reached = {n for n, g in zip(names, fast) if g is not None and bool(g.abs().sum() > 0)}
    for name in names:
        if "vision_tower" not in name:
            assert name in reached, name
    # the features of masked regions change nothing: outputs, loss, gradients
    out, out2 = model(batch), model(other_padding)
    _close(out.scores, out2.scores, 1e-12)
    _close(out.joint, out2.joint, 1e-12)
    loss2, grads2 = _loss_and_grads(model, other_padding, kind, naive=False)
    _close(loss2, fast_loss, 1e-12)
    for name, a, b in zip(names, fast, grads2):
        if a is not None:
            _close(a, b, 1e-12, name)


def test_forward_shapes_and_scores_are_the_head_of_joint():
    ds = _dataset(0, 3)
    model = _model(ds)
    batch, _ = _ragged(ds, 0)
    batch = batch.replace(image_features=batch.image_features.float())
    out = model(batch)
    t, r = batch.num_questions, batch.image_features.shape[1]
    assert out.scores.shape == (t, ds.num_answers) and out.joint.shape == (t, 16)
    assert out.region_tokens.shape == (len(batch.image_ids), r, 16) and out.attention is None
    assert model(batch, share_images=False).region_tokens.shape == (t, r, 16)
    torch.testing.assert_close(out.scores, model.classifier(out.joint))
    assert model(batch, scores=False).scores is None


def test_shared_images_give_the_per_question_values_and_gradients():
    """The image prefix run once per image (the default) against every question's whole
    sequence: scores, joint and the closed-form SOrT loss's gradients, float64, both Grad-CAM
    layers."""
    ds = _dataset(2, 4)
    for layer in (-1, 0):
        model = _float64(_model(ds, gradcam_layer=layer))
        batch, _ = _ragged(ds, 2)
        results = []
        for share in (True, False):
            model.zero_grad()
            out = model(batch, share_images=share)
            scores, grad = gradcam_gradient(model, out, batch.classes, naive=False)
            (scores.sum() + (grad * out.joint).pow(2).sum()).backward()
            results.append((scores.detach(), out.joint.detach(),
                            [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (s1, j1, g1), (s2, j2, g2) = results
        _close(s1, s2, 1e-10)
        _close(j1, j2, 1e-10)
        assert len(g1) == len(g2) > 0
        for a, b in zip(g1, g2):
            _close(a, b, 1e-9)


def test_region_gradcam_is_zero_on_masked_regions():
    """Of a LoRA model too, whose region tokens need no gradient for training."""
    ds = _dataset(0, 3)
    batch, _ = _ragged(ds, 0)
    model = _model(ds, lora_rank=2).double()
    cam = model.region_gradcam(batch)
    mask = batch.image_mask[batch.image_index]
    assert cam.shape == mask.shape and not cam.requires_grad
    assert bool((cam[~mask] == 0).all()) and bool((cam[mask] != 0).all())
    # d y_c / d token_r . token_r, by autograd on the region tokens
    out = model(batch, share_images=False, track_regions=True)
    y = out.scores.gather(1, batch.classes[:, None]).sum()
    (grad,) = torch.autograd.grad(y, out.region_tokens)
    _close(cam, (grad * out.region_tokens).sum(-1).detach() * mask, 1e-12)


# ------------------------------------------------------------------------------------------
# 2. masking and causality


def _trimmed(group, regions: int):
    """``group`` with its image cut to its first ``regions`` regions."""
    grounding = None if group.grounding is None else group.grounding[:regions]
    return dataclasses.replace(group, features=group.features[:regions],
                               boxes=group.boxes[:regions], grounding=grounding)


def _alone_vs_together(model, groups) -> float:
    """The largest difference of any question's scores or joint between the batch of all
    ``groups`` and each group's batch alone."""
    with torch.no_grad():
        return _largest_difference(model, groups)


def _largest_difference(model, groups) -> float:
    together = model(_double(collate_groups(groups)))
    worst, start = 0.0, 0
    for g in groups:
        alone = model(_double(collate_groups([g])))
        n = alone.scores.shape[0]
        for a, b in ((alone.scores, together.scores), (alone.joint, together.joint)):
            worst = max(worst, float((a - b[start:start + n]).abs().max()))
        start += n
    return worst


def test_questions_do_not_see_other_groups_of_the_same_width():
    """Groups of two images of the same region count, batched or alone: each question's
    sequence is its own (float64)."""
    ds = _dataset(3, 8)
    groups = list(ds)
    first = groups[0]
    other = next(g for g in groups if g.image_id != first.image_id)
    regions = min(first.features.shape[0], other.features.shape[0])
    model = _model(ds).double()
    assert _alone_vs_together(model, [_trimmed(first, regions),
                                      _trimmed(other, regions)]) < 1e-10


def test_questions_do_not_see_other_groups_of_another_width():
    """Groups whose images have different region counts, batched or alone (float64)."""
    ds = _dataset(3, 8)
    groups = list(ds)
    first = groups[0]
    other = next(g for g in groups if g.features.shape[0] != first.features.shape[0])
    model = _model(ds).double()
    assert _alone_vs_together(model, [first, other]) < 1e-10


def test_question_padding_width_and_tokens_after_the_answer_change_nothing():
    """Causality: extra columns of ``question_tokens``, whatever their tokens, come after the
    answer prompt and change no score or joint (float64)."""
    ds = _dataset(0, 3)
    model = _model(ds).double()
    batch, _ = _ragged(ds, 0)
    out = model(batch)
    tokens, lengths = batch.question_tokens, batch.question_lengths
    gen = torch.Generator().manual_seed(0)
    for extra in (0, 5):
        wide = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], extra)], 1)
        junk = torch.randint(1, len(ds.vocab), wide.shape, generator=gen)
        after = torch.arange(wide.shape[1])[None] >= lengths[:, None]
        for padded in (wide, torch.where(after, junk, wide)):
            got = model(batch.replace(question_tokens=padded, question_lengths=lengths))
            _close(got.scores, out.scores, 1e-10)
            _close(got.joint, out.joint, 1e-10)


# ------------------------------------------------------------------------------------------
# 3. Grad-CAM at an inner layer


def _perturbed_scores(model: LlavaVQA, batch: PackedBatch, delta: torch.Tensor
                      ) -> torch.Tensor:
    """The class scores ``[T]`` with ``delta [T, D]`` added to layer 0's output at each
    question's answer position (a hook of this test's own, not the model's splice), every
    question's whole sequence run on its own (the model's default shares the images)."""
    rows = torch.arange(batch.num_questions)
    position = batch.image_features.shape[1] + batch.question_lengths

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_put((rows, position), hidden[rows, position] + delta)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    layer = model.llava.model.language_model.layers[0]
    handle = layer.register_forward_hook(add)
    try:
        with torch.no_grad():
            return model(batch, share_images=False).scores.gather(1, batch.classes[:, None])[:, 0]
    finally:
        handle.remove()


def test_inner_layer_gradcam_matches_finite_differences():
    ds = _dataset(1, 3)
    model = _float64(_model(ds, gradcam_layer=0))
    assert model.classifier is None and model.layer == 0
    batch, _ = _ragged(ds, 1)
    out = model(batch)
    scores, grad = gradcam_gradient(model, out, batch.classes, naive=False, create_graph=False)
    assert grad.shape == out.joint.shape and not grad.requires_grad
    # joint is layer 0's output at the answer position, not the final hidden state
    last = _float64(_model(ds))
    last.load_state_dict(model.state_dict())
    reference = last(batch)
    _close(scores, reference.scores, 1e-12)
    assert not torch.allclose(out.joint, reference.joint)
    eps = 1e-5
    gen = torch.Generator().manual_seed(0)
    t, d = out.joint.shape
    directions = [torch.zeros(t, d, dtype=torch.float64) for _ in range(2)]
    directions[0][:, 0] = 1
    directions[1][:, 7] = 1
    directions.append(torch.randn(t, d, generator=gen, dtype=torch.float64))
    for v in directions:
        fd = (_perturbed_scores(model, batch, eps * v)
              - _perturbed_scores(model, batch, -eps * v)) / (2 * eps)
        _close((grad * v).sum(1), fd, 1e-6)
    assert float(grad.abs().max()) > 1e-3


def test_inner_layer_sort_loss_has_second_order_gradients_in_every_layer():
    """SOrT at layer 0 of 2: the loss's gradient (autograd through d scores / d joint, which
    runs through layer 1) is finite and reaches both layers; along a random direction it is
    the loss's finite difference (``sort-sq``: no hinge to cross)."""
    ds = _dataset(2, 3)
    model = _float64(_model(ds, gradcam_layer=0))
    batch, _ = _ragged(ds, 2)
    names = [n for n, _ in _trainable(model)]
    loss, grads = _loss_and_grads(model, batch, "sort", naive=False)
    assert math.isfinite(float(loss)) and float(loss) > 0
    for layer in (0, 1):
        in_layer = [(n, g) for n, g in zip(names, grads) if f"layers.{layer}." in n
                    and "language_model" in n]
        assert len(in_layer) == 9
        for name, g in in_layer:
            assert g is not None and bool(torch.isfinite(g).all()), name
            assert float(g.abs().sum()) > 0, name
    loss, grads = _loss_and_grads(model, batch, "sort-sq", naive=False)
    gen = torch.Generator().manual_seed(1)
    params = [p for _, p in _trainable(model)]
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    slope = sum(float((g * v).sum()) for g, v in zip(grads, direction) if g is not None)
    eps, values = 1e-6, []
    objective = Objective("sort-sq", naive=False, **LOSS_WEIGHTS)
    for sign in (1, -1):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(sign * eps * v)
        values.append(float(objective(model, batch)[0].detach()))
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(sign * eps * v)
    assert (values[0] - values[1]) / (2 * eps) == pytest.approx(slope, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------------
# 4. LoRA


def _randomise_lora_b(model: LlavaVQA, seed: int) -> None:
    """peft starts ``lora_B`` at 0 (then ``lora_A`` has no gradient and merging changes
    nothing): random values instead."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_lora_trains_only_adapters_and_closed_form_equals_autograd():
    ds = _dataset(0, 3)
    model = _model(ds, lora_rank=2).double()
    _randomise_lora_b(model, 0)
    batch, _ = _ragged(ds, 0)
    trainable = _trainable(model)
    assert trainable and all("lora_A" in n or "lora_B" in n for n, _ in trainable)
    decoder = [n for n, _ in trainable if "language_model" in n]
    assert len(decoder) == 2 * 4 * 2  # layers x (q, k, v, o) x (A, B)
    results = []
    for naive in (False, True):
        model.zero_grad(set_to_none=True)
        loss, _ = Objective("sort", naive=naive, **LOSS_WEIGHTS)(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for n, p in model.named_parameters()
                              if not p.requires_grad)
    (fast_loss, fast), (ref_loss, ref) = results
    _close(fast_loss, ref_loss, 1e-9)
    for name in decoder:
        assert fast[name] is not None and float(fast[name].abs().sum()) > 0, name
        _close(fast[name], ref[name], 1e-9, name)


def test_lora_adapters_are_only_in_the_decoder():
    ds = _dataset(0, 1)
    model = _model(ds, lora_rank=2)
    assert all("language_model" in n for n, _ in _trainable(model))


def test_lora_save_pretrained_loads_back_in_transformers_and_peft(tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    ds = _dataset(0, 3)
    lora = _model(ds, seed=5, lora_rank=2)
    _randomise_lora_b(lora, 1)
    batch = collate_groups(list(ds))
    written = lora.save_pretrained(str(tmp_path))
    assert sorted(written) == [str(tmp_path / "adapter"), str(tmp_path / "hf_model")]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "hf_model/config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    with torch.no_grad():
        want = lora(batch).scores
        ids = batch.question_tokens[:4]
        want_logits = lora.vlm(input_ids=ids).logits
    # the merged weights, through transformers and into LlavaVQA without LoRA
    folder = str(tmp_path / "hf_model")
    merged = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    plain = LlavaVQA(dataclasses.replace(lora.config, lora_rank=0,
                                         hf_config=load_hf_config(folder)),
                     pretrained=folder).eval()
    assert not [n for n, p in plain.named_parameters() if "lora" in n]
    with torch.no_grad():
        torch.testing.assert_close(plain(batch).scores, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, want_logits,
                                   atol=1e-5, rtol=1e-5)
    # the adapters alone, through peft onto the same random base
    base = _model(ds, seed=5)
    lora_base = {n.replace("base_model.model.", "").replace(".base_layer", ""): t
                 for n, t in lora.vlm.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(lora_base[n], t) for n, t in base.llava.state_dict().items())
    with torch.no_grad():
        assert not torch.allclose(base(batch).scores, want, atol=1e-4)
    peft_model = PeftModel.from_pretrained(base.llava, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want_logits,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(base(batch).scores, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# 5. save_pretrained folders as --hf-model


def test_hf_folder_round_trip(tmp_path):
    ds = _dataset(0, 3)
    model = _model(ds, seed=2)
    model.llava.save_pretrained(str(tmp_path))
    loaded = LlavaVQA(dataclasses.replace(_config(ds, hidden_size=32, num_layers=1),
                                          hf_config=load_hf_config(str(tmp_path))),
                      pretrained=str(tmp_path)).eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    batch = collate_groups(list(ds))
    with torch.no_grad():
        assert torch.equal(loaded(batch).scores, model(batch).scores)


def _saved(folder: Path, ds, **kw) -> str:
    torch.manual_seed(0)
    LlavaVQAConfig(**{**dict(vocab_size=len(ds.vocab), num_answers=ds.num_answers,
                             feature_dim=ds.feature_dim, hidden_size=16, intermediate_size=16,
                             num_layers=1, num_heads=2, num_kv_heads=1), **kw}
                   ).build().llava.save_pretrained(str(folder))
    return str(folder)


def _first_line_error(fn) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_folder_without_a_model_is_refused_naming_it(tmp_path):
    ds = _dataset(0, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _first_line_error(lambda: load_hf_config(str(empty)))
    weights_gone = tmp_path / "config_only"
    weights_gone.mkdir()
    saved = _saved(tmp_path / "saved", ds)
    (weights_gone / "config.json").write_text(Path(saved, "config.json").read_text())
    config = _config(ds, hf_config=load_hf_config(str(weights_gone)))
    assert str(weights_gone) in _first_line_error(
        lambda: LlavaVQA(config, pretrained=str(weights_gone)))


@pytest.mark.parametrize("kind", ["features", "vocabulary"])
def test_folder_that_does_not_fit_the_data_is_refused(kind, tmp_path, capsys):
    """A projector of another feature width, or too small a token vocabulary: ValueError in
    one line naming the folder, from LlavaVQA and from the trainer, and the
    trainer ends in one line naming the folder, exit code 2."""
    ds = _dataset(0, 1)
    other = dict(feature_dim=12) if kind == "features" else dict(vocab_size=3, num_answers=2)
    folder = _saved(tmp_path / kind, ds, **other)
    config = _config(ds, hf_config=load_hf_config(folder))
    message = _first_line_error(lambda: LlavaVQA(config, pretrained=folder))
    assert ("12-d" in message) if kind == "features" else ("tokens" in message)
    # the trainer's data: 64-d features, its own vocabulary
    wrong = _saved(tmp_path / f"{kind}-64", _trainer_data(),
                   **(dict(feature_dim=12) if kind == "features" else
                      dict(vocab_size=3, num_answers=2)))
    capsys.readouterr()
    assert _train(tmp_path / "out", "--hf-model", wrong) == 2
    err = capsys.readouterr().err.strip()
    assert wrong in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["features", "vocabulary"])
def test_llava_vqa_names_the_folder_that_does_not_fit(kind, tmp_path):
    ds = _dataset(0, 1)
    other = dict(feature_dim=12) if kind == "features" else dict(vocab_size=3, num_answers=2)
    folder = _saved(tmp_path / kind, ds, **other)
    config = _config(ds, hf_config=load_hf_config(folder))
    assert folder in _first_line_error(lambda: LlavaVQA(config, pretrained=folder))


# ------------------------------------------------------------------------------------------
# 6. the trainer and the evaluator

TINY = ["--model", "llava", "--synthetic-train-groups", "40", "--synthetic-val-groups", "20",
        "--hidden-dim", "16", "--joint-dim", "32", "--decoder-layers", "1",
        "--decoder-heads", "2", "--batch-groups", "8", "--warmup-steps", "2",
        "--device", "cpu", "--no-plots", "--eval-every", "0"]
PYTHIA = ["--synthetic-train-groups", "40", "--synthetic-val-groups", "20", "--hidden-dim",
          "16", "--joint-dim", "32", "--batch-groups", "8", "--device", "cpu", "--no-plots"]


def _trainer_data() -> SyntheticIntrospect:
    """The trainer's synthetic data (--synthetic-train-groups 40), for its sizes."""
    return SyntheticIntrospect(seed=0, split="train", num_groups=40)


def _train(out: Path, *flags: str) -> int:
    return main(["--out", str(out), *TINY, *flags])


def _params(out: Path) -> Dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(out / "checkpoint.pt")["model"]


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())["metrics"]


def _assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_finished(out: Path, steps: int) -> dict:
    for name in ("checkpoint.pt", "metrics.json", "hf_model/config.json",
                 "hf_model/model.safetensors"):
        assert (out / name).stat().st_size > 0, name
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == steps and state["model_kind"] == "llava"
    assert state["method"].startswith("LLaVA")
    metrics = _metrics(out / "metrics.json")
    numbers = [v for v in metrics.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert metrics["groups"] == 20
    assert all(bool(torch.isfinite(w).all()) for w in state["model"].values())
    return state


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An uninterrupted --loss sort run of 4 steps."""
    out = tmp_path_factory.mktemp("llava_base")
    assert _train(out, "--max-steps", "4") == 0
    return out


@pytest.mark.parametrize("flags", [
    ["--loss", "bce"],
    ["--lora", "2"],
    ["--decoder-layers", "2", "--gradcam-layer", "0"],
], ids=["bce", "lora", "inner-layer"])
def test_trainer_runs(flags, tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--max-steps", "3", *flags) == 0
    state = _assert_finished(out, 3)
    config = state["model_config"]
    if "--lora" in flags:
        assert config["lora_rank"] == 2
        assert (out / "adapter" / "adapter_config.json").stat().st_size > 0
        assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    if "--gradcam-layer" in flags:
        assert config["gradcam_layer"] == 0 and config["num_layers"] == 2


def _evaluate(run: Path, out: Path, *flags: str) -> dict:
    from sort_fast.evaluate import main as evaluate_main

    assert evaluate_main([str(run / "checkpoint.pt"), "--out", str(out), "--device", "cpu",
                          "--no-plots", *flags]) == 0
    return _metrics(out / "metrics.json")


def test_trainer_sort_run_and_evaluator_agree(base, tmp_path):
    """The evaluator rebuilds the model from the checkpoint (model_kind "llava") and, in
    batches of the trainer's size, gives the trainer's metrics."""
    _assert_finished(base, 4)
    assert _evaluate(base, tmp_path / "eval", "--batch-groups", "8") == _metrics(
        base / "metrics.json")


def test_evaluator_metrics_do_not_depend_on_its_batch_size(base, tmp_path):
    want = _metrics(base / "metrics.json")
    got = _evaluate(base, tmp_path / "eval")
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


def test_trainer_resume_is_bit_identical(base, tmp_path):
    out = tmp_path / "resumed"
    assert _train(out, "--max-steps", "2") == 0
    assert _train(out, "--max-steps", "4", "--resume") == 0
    _assert_same(_params(base), _params(out))
    assert _metrics(base / "metrics.json") == _metrics(out / "metrics.json")


def test_trainer_starts_from_an_hf_folder(base, tmp_path):
    """--hf-model: the folder's configuration and weights (an lr of 1e-12 keeps them)."""
    folder = str(base / "hf_model")
    out = tmp_path / "from_hf"
    assert _train(out, "--hf-model", folder, "--max-steps", "2", "--lr", "1e-12") == 0
    state = _assert_finished(out, 2)
    assert state["model_config"]["hf_config"] == load_hf_config(folder)
    start = LlavaVQA(LlavaVQAConfig(**state["model_config"]), pretrained=folder)
    for name, value in start.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=0, atol=1e-8, msg=name)


@pytest.mark.parametrize("flags, message", [
    (["--hf-model", "{dir}"], "--hf-model"),
    (["--lora", "2"], "--lora"),
    (["--gradcam-layer", "0"], "--gradcam-layer"),
])
def test_llava_flags_with_pythia_end_with_one_line(flags, message, tmp_path, capsys):
    flags = [str(tmp_path) if f == "{dir}" else f for f in flags]
    try:
        code = main(["--out", str(tmp_path / "out"), *PYTHIA, *flags])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err and "Traceback" not in err


def test_init_from_another_model_kind_ends_with_one_line(base, tmp_path, capsys):
    code = main(["--out", str(tmp_path / "out"), *PYTHIA, "--init", str(base / "checkpoint.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--model llava checkpoint" in err and "\n" not in err


def test_hf_model_with_init_ends_with_one_line(base, tmp_path, capsys):
    """Refused before anything is read, though --init alone would build the model."""
    code = _train(tmp_path / "out", "--init", str(base / "checkpoint.pt"), "--hf-model",
                  str(base / "hf_model"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not both" in err and "\n" not in err


@pytest.mark.parametrize("flag", [["--loss", "squint"], ["--compile"]])
def test_what_llava_cannot_run_ends_with_one_line(flag, tmp_path, capsys):
    assert _train(tmp_path / "out", *flag) == 2
    err = capsys.readouterr().err.strip()
    assert flag[-1] in err and "\n" not in err and "Traceback" not in err


def test_hf_model_without_config_ends_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(tmp_path / "out", "--hf-model", str(empty)) == 2
    err = capsys.readouterr().err.strip()
    assert str(empty) in err and "config.json" in err and "\n" not in err


# ------------------------------------------------------------------------------------------
# 7. two processes

WORKER = """
import os, sys, torch
from sort_fast.train import train
from sort_fast.training.config import build_train_parser
result = train(build_train_parser().parse_args(sys.argv[1:]))
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def test_two_process_llava_training_keeps_ranks_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    flags = [*TINY, "--max-steps", "3", "--dropout", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), "--out", str(out), *flags],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    _assert_same(rank0, rank1)
    _assert_same(rank0, _params(out))
    assert len(ckpt.load_checkpoint(out / "checkpoint.pt")["rng"]) == 2  # one per rank
    # the gradients were averaged: close to one process on the whole batch (Adamax steps of
    # about lr, 3e-3, per step), not equal (sort_fast/training/distributed.py says why)
    single = tmp_path / "single"
    assert main(["--out", str(single), *flags]) == 0
    gap = max(float((_params(single)[k] - v).abs().max()) for k, v in rank0.items())
    assert 0 < gap < 3 * 3 * 3e-3
