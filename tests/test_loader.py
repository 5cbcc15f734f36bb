"""The training input pipeline: a DataLoader over a step-indexed batch sampler."""
import torch

from sort_fast.data import SyntheticIntrospect, collate_groups
from sort_fast.layout import recall
from sort_fast.training.data import DataOrder, StepBatchSampler, make_loader


def test_loader_batches_are_the_data_order_whatever_the_workers():
    groups = SyntheticIntrospect(seed=0, split="val", num_groups=40)
    order = DataOrder(len(groups), batch_groups=8, seed=3)
    want = [collate_groups([groups[i] for i in order.indices(step)]) for step in range(7, 12)]
    for workers in (0, 2):
        loader = make_loader(groups, StepBatchSampler(order, 7, 12), workers=workers,
                             pin_memory=False)
        got = list(loader)
        assert len(got) == len(want) == len(loader)
        for a, b in zip(got, want):
            assert torch.equal(a.question_tokens, b.question_tokens)
            assert torch.equal(a.image_features, b.image_features)
            assert a.question_ids == b.question_ids


def test_batches_from_workers_move_validated():
    """A batch packed in a worker arrives as new tensors; moving it validates it on the CPU
    (no device sync) and the copy carries the result, so the step does not validate again."""
    groups = SyntheticIntrospect(seed=0, split="val", num_groups=16)
    order = DataOrder(len(groups), batch_groups=8, seed=0)
    (batch,) = list(make_loader(groups, StepBatchSampler(order, 0, 1), workers=1,
                                pin_memory=False))
    moved = batch.to("meta")
    assert recall(moved.offsets, "layout", moved.num_sub) is not None
    assert recall(moved.classes, "class_range") is not None


def test_sampler_shards_each_step_across_processes():
    order = DataOrder(30, batch_groups=6, seed=1)
    parts = [list(StepBatchSampler(order, 2, 4, rank, 3)) for rank in range(3)]
    for step in range(2):
        merged = sorted(i for rank in range(3) for i in parts[rank][step])
        assert merged == sorted(order.indices(step + 2))
