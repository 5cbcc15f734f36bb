"""The training input pipeline on real-format data: DataLoader workers 0 against 2.

Run::

    python -m pytest benchmarks/bench_loader.py --benchmark-only -q --benchmark-json loader.json
    python benchmarks/summarize.py loader.json --reference workers0

The fixture is written once per run in the real formats (docs/data_formats.md): 1,700 images
with one ``.npy`` of 36 x 2048 float32 region features each (about 500 MB), VQAv2 questions
and annotations (11 questions per image), and VQA-Introspect with 3 reasoning questions per
image and 2-3 sub-questions each: 5,100 groups of 13-14 questions. Groups ``loader-<mode>``:

* ``load``: the first 40 batches of 64 groups of an epoch, read from disk (``.npy`` parsing),
  packed and validated (``collate_groups``), moved to the training device;
* ``train``: the same batches each followed by one training step of the trainer's default
  model (``Objective("sort")``, Adamax): what the workers can hide behind the step.

Paths ``workers0`` (the main process reads and packs) and ``workers2`` (two loader processes,
prefetching). Each round builds a fresh loader, so worker start-up is included. Batches are
checked equal across the paths before timing.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import DEVICE, synchronize
from sort_fast.data import IntrospectDataset
from sort_fast.models import PythiaVQA
from sort_fast.training import Objective
from sort_fast.training.data import DataOrder, StepBatchSampler, make_loader

IMAGES, REASONING, OTHERS, REGIONS, FEATURES = 1700, 3, 8, 36, 2048
STEPS, BATCH_GROUPS = 40, 64
OBJECTS = ["dog", "cat", "bus", "car", "man", "woman", "tree", "sky", "light", "table", "cup",
           "ball", "horse", "train", "boat", "bird", "kite", "plate", "chair", "sign"]
ATTRIBUTES = ["red", "green", "big", "small", "wet", "bright", "open", "old", "moving", "empty"]


def write_fixture(root: Path) -> dict:
    """The files of the real formats under ``root``; returns their paths."""
    rng = np.random.default_rng(0)
    features = root / "features"
    features.mkdir()
    questions, annotations, introspect = [], [], {}
    qid = 1
    for image in range(1, IMAGES + 1):
        np.save(features / f"{image}.npy",
                rng.random((REGIONS, FEATURES), dtype=np.float32))
        pairs = rng.choice(len(OBJECTS) * len(ATTRIBUTES), REASONING * 4 + OTHERS,
                           replace=False)
        texts = [f"is the {OBJECTS[p // len(ATTRIBUTES)]} {ATTRIBUTES[p % len(ATTRIBUTES)]}?"
                 for p in pairs]
        for k in range(REASONING + OTHERS):
            answer = ["yes", "no"][int(rng.integers(2))]
            questions.append({"question_id": qid, "image_id": image,
                              "question": ("why " if k < REASONING else "") + texts[k]})
            annotations.append({
                "question_id": qid, "image_id": image, "question_type": "is",
                "answer_type": "yes/no", "multiple_choice_answer": answer,
                "answers": [{"answer_id": j + 1, "answer": answer, "answer_confidence": "yes"}
                            for j in range(10)]})
            if k < REASONING:
                subs = texts[REASONING + OTHERS + 3 * k:][:2 + k % 2]
                introspect[str(qid)] = {
                    "reasoning_question": "why " + texts[k], "image_id": image,
                    "reasoning_answer_most_common": answer,
                    "introspect": [{"pred_q_type": "reasoning", "sub_qa": [
                        {"sub_question": s, "sub_answer": "yes"} for s in subs]}]}
            qid += 1
    paths = {"introspect": root / "introspect.json", "questions": root / "questions.json",
             "annotations": root / "annotations.json", "features": features}
    paths["introspect"].write_text(json.dumps(introspect))
    paths["questions"].write_text(json.dumps({"questions": questions}))
    paths["annotations"].write_text(json.dumps({"annotations": annotations}))
    return paths


@functools.lru_cache(maxsize=None)
def dataset(root: str) -> IntrospectDataset:
    paths = write_fixture(Path(root))
    return IntrospectDataset(paths["introspect"], paths["questions"], paths["annotations"],
                             paths["features"])


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> IntrospectDataset:
    data = dataset(str(tmp_path_factory.mktemp("real_format")))
    assert len(data) == IMAGES * REASONING
    return data


def batches(groups, workers: int):
    order = DataOrder(len(groups), BATCH_GROUPS, seed=0)
    loader = make_loader(groups, StepBatchSampler(order, 0, STEPS), workers=workers,
                         pin_memory=DEVICE.type == "cuda")
    for batch in loader:
        yield batch.to(DEVICE, non_blocking=True)


@functools.lru_cache(maxsize=None)
def model_and_objective(num_answers: int, vocab: int):
    from sort_fast.models import PythiaConfig

    model = PythiaVQA(PythiaConfig(vocab, num_answers, feature_dim=FEATURES)).to(DEVICE)
    objective = Objective("sort", lambda_reasoning=2.27, lambda_sub=2.27,
                          lambda_irrelevant=3e-4, margin=0.0, lambda_attention=0.0, naive=False)
    return model, objective, torch.optim.Adamax(model.parameters(), lr=1e-3)


def consume(groups, workers: int, train: bool) -> int:
    count = 0
    model, objective, optimizer = model_and_objective(groups.num_answers, len(groups.vocab))
    for batch in batches(groups, workers):
        if train:
            optimizer.zero_grad(set_to_none=True)
            objective(model, batch)[0].backward()
            optimizer.step()
        count += 1
    synchronize()
    return count


def test_workers_give_the_same_batches(groups):
    first = [b.image_features[:2].clone() for _, b in zip(range(3), batches(groups, 0))]
    second = [b.image_features[:2].clone() for _, b in zip(range(3), batches(groups, 2))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("mode", ["load", "train"])
@pytest.mark.parametrize("workers", [0, 2], ids=["workers0", "workers2"])
def test_loader(benchmark, groups, workers, mode):
    benchmark.group = f"loader-{mode}"
    count = benchmark.pedantic(consume, args=(groups, workers, mode == "train"), rounds=3,
                               warmup_rounds=1)
    assert count == STEPS
    if benchmark.stats:
        benchmark.extra_info["batches_per_s"] = STEPS / benchmark.stats.stats.median
