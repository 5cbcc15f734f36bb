"""Batches padded to static shapes (docs/ops.md, "Static shapes and CUDA graphs"): the padded
step computes the unpadded step's losses and gradients, 100 steps of the synthetic benchmark
see a few shapes, and ``torch.compile(dynamic=False)`` compiles once per shape."""
import copy
import functools

import pytest
import torch

from sort_fast.data import SyntheticIntrospect, collate_groups
from sort_fast.data.buckets import (
    ShapeBuckets,
    StaticShape,
    batch_shape,
    pad_to_bucket,
    pad_to_shape,
)
from sort_fast.models import PythiaConfig, PythiaVQA
from sort_fast.training import Objective
from sort_fast.training.data import DataOrder
from sort_fast.training.static_step import compile_static_step, make_optimizer, train_step

LOSSES = ["sort", "sort-sq", "squint", "role-bce", "bce"]


def _objective(loss: str) -> Objective:
    return Objective(loss, lambda_reasoning=2.27, lambda_sub=2.27, lambda_irrelevant=3e-4,
                     margin=0.1, lambda_attention=0.5, naive=False)


def _tiny_model(ds, dtype=torch.float32) -> PythiaVQA:
    torch.manual_seed(0)
    cfg = PythiaConfig(len(ds.vocab), ds.num_answers, feature_dim=ds.feature_dim, embed_dim=8,
                       text_hidden=8, attention_hidden=8, joint_dim=16,
                       classifier_text_hidden=8, classifier_image_hidden=8,
                       classifier_dropout=0.0, joint_dropout=0.0)
    return PythiaVQA(cfg).to(dtype).train()


@functools.lru_cache(maxsize=None)
def _train_batches(steps: int, batch_groups: int = 64):
    """The trainer's first ``steps`` batches of the synthetic benchmark."""
    ds = SyntheticIntrospect(seed=0, split="train")
    order = DataOrder(len(ds), batch_groups, seed=0)
    return ds, [collate_groups([ds[i] for i in order.indices(step)]) for step in range(steps)]


def _double(batch):
    return batch.replace(image_features=batch.image_features.double(),
                         image_boxes=batch.image_boxes.double(),
                         targets=batch.targets.double(), grounding=batch.grounding.double())


def _loss_and_grads(model, batch, loss):
    total, parts = _objective(loss)(model, batch)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return parts, {n: torch.zeros_like(p) if g is None else g
                   for n, p, g in zip(names, params, grads)}


@pytest.mark.parametrize("loss", LOSSES)
def test_padded_step_equals_unpadded_step_float64(loss):
    """Every loss part and every parameter gradient of the padded batch equal the unpadded
    batch's (float64; ragged groups of fresh synthetic data, extra rows, groups, questions,
    images, slots, token columns and regions)."""
    ds = SyntheticIntrospect(seed=5, split="val", num_groups=9)
    batch = _double(collate_groups(list(ds)))
    need = batch_shape(batch)
    shape = StaticShape(rows=need.rows + 13, groups=need.groups + 4,
                        questions=need.questions + 3, images=need.images + 2,
                        slots=max(need.slots, 7), tokens=need.tokens + 3,
                        regions=need.regions + 5)
    padded = pad_to_shape(batch, shape)
    assert batch_shape(padded) == shape and padded.static_shape
    assert int(padded.group_valid.sum()) == need.groups
    model = _tiny_model(ds, torch.float64)
    want_parts, want_grads = _loss_and_grads(model, batch, loss)
    got_parts, got_grads = _loss_and_grads(copy.deepcopy(model), padded, loss)
    assert got_parts.keys() == want_parts.keys()
    for name, value in want_parts.items():
        torch.testing.assert_close(got_parts[name], value, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{loss}: {name}: {m}")
    assert any(bool(g.abs().max() > 0) for g in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{loss}: gradient of {name}: {m}")


def test_padding_that_does_not_fit_is_refused():
    ds = SyntheticIntrospect(seed=5, split="val", num_groups=4)
    batch = collate_groups(list(ds))
    need = batch_shape(batch)
    for bad in (dict(rows=need.rows - 1), dict(rows=need.rows + 4),  # rows but no extra group
                dict(rows=need.rows + 1, groups=need.groups + 1),     # one row for a group
                dict(rows=need.rows + 4, groups=need.groups + 1)):    # no extra image
        shape = StaticShape(**{**vars(need), **bad})
        with pytest.raises(ValueError, match="does not pad to"):
            pad_to_shape(batch, shape)
    with pytest.raises(ValueError, match="collate_groups records"):
        pad_to_shape(batch.replace(question_tokens=batch.question_tokens), need)
    with pytest.raises(ValueError, match="growth"):
        ShapeBuckets(growth=0.5)


def test_synthetic_benchmark_pads_to_few_shapes():
    """100 training steps of the synthetic benchmark (64 groups each): at most 3 static
    shapes, every padded batch exactly one of them, less than 40 % extra rows."""
    _, batches = _train_batches(100)
    buckets = ShapeBuckets()
    shapes = [batch_shape(pad_to_bucket(b, buckets)) for b in batches]
    assert set(shapes) == set(buckets.shapes) and len(buckets.shapes) <= 3
    distinct_unpadded = {batch_shape(b) for b in batches}
    assert len(distinct_unpadded) > 50  # what the compiler would see without padding
    rows = sum(b.num_questions for b in batches)
    assert sum(s.rows for s in shapes) < 1.4 * rows


def test_compiled_static_step_compiles_once_per_shape():
    """``torch.compile(dynamic=False, fullgraph=True)`` of the trainer's objective (backward
    through AOTAutograd, ``aot_eager`` backend: Dynamo's guards and recompiles are the same as
    with Inductor) over the first training steps of the synthetic benchmark padded by one
    ladder: no more graphs than shapes, and the loss matches the eager padded step. (Each
    compilation takes ~20 s on the CPU; the 100-step run is recorded in docs/ops.md.)"""
    from torch._dynamo.utils import counters

    ds, batches = _train_batches(100)
    buckets = ShapeBuckets()
    padded = [pad_to_bucket(b, buckets) for b in batches[:6]]
    torch._dynamo.reset()
    counters.clear()
    objective = _objective("sort")
    step = compile_static_step(objective, backend="aot_eager", fullgraph=True)
    model = _tiny_model(ds)
    eager_model = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters(), 1e-3)
    for batch in padded:
        loss, _ = train_step(model, batch, objective, optimizer, grad_clip=0.25, loss_fn=step)
    assert counters["stats"]["unique_graphs"] <= len(buckets.shapes)
    assert torch.isfinite(loss)
    with torch.no_grad():
        torch.testing.assert_close(step(eager_model, padded[0])[0],
                                   objective(eager_model, padded[0])[0], rtol=1e-5, atol=1e-6)


TRAIN_FLAGS = ["--synthetic-train-groups", "40", "--synthetic-val-groups", "20",
               "--hidden-dim", "16", "--joint-dim", "32", "--batch-groups", "8",
               "--warmup-steps", "2", "--device", "cpu", "--max-steps", "4",
               "--eval-every", "0", "--no-plots", "--dropout", "0"]


def _train_losses(out, *flags: str):
    import json

    from sort_fast.train import main

    assert main(["--out", str(out), *TRAIN_FLAGS, *flags]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"], r["lr"]) for r in records if r["event"] == "train"]


@pytest.mark.parametrize("loss", ["sort", "squint"])
def test_cuda_graph_trainer_pads_to_the_unpadded_losses(loss, tmp_path, monkeypatch):
    """``--cuda-graphs`` minus the capture (on the CPU): every batch padded to a bucket of a
    ShapeBuckets ladder gives the unpadded trainer's losses, gradient norms and learning
    rates over 4 steps within float32 rounding."""
    import sort_fast.train as trainer

    plain = _train_losses(tmp_path / "plain", "--loss", loss)
    monkeypatch.setattr(trainer, "CAPTURE_GRAPHS", False)
    padded_batches = []
    monkeypatch.setattr(trainer, "pad_to_bucket", lambda batch, buckets: padded_batches.append(
        batch.num_groups) or pad_to_bucket(batch, buckets))
    padded = _train_losses(tmp_path / "padded", "--loss", loss, "--cuda-graphs")
    assert padded_batches == [8] * 4  # every step's batch went through the padding
    torch.testing.assert_close(torch.tensor(padded), torch.tensor(plain), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    ([], "--cuda-graphs needs a CUDA device (this run's is cpu)"),
    (["--compile"], "--cuda-graphs cannot run with --compile"),
    (["--amp", "fp16"], "--cuda-graphs cannot run with --amp fp16"),
])
def test_cuda_graphs_refuses_what_it_cannot_do_in_one_line(flags, message, tmp_path, capsys):
    from sort_fast.train import main

    assert main(["--out", str(tmp_path), *TRAIN_FLAGS, "--cuda-graphs", *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m sort_fast.train: error: {message}\n"
    assert not (tmp_path / "checkpoint.pt").exists()
