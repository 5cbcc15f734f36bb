"""Packed batches padded to a few static shapes, for ``torch.compile(dynamic=False)`` and CUDA
graphs (docs/ops.md, "Static shapes and CUDA graphs").

A batch's shape is its rows ``T``, groups ``N``, distinct questions ``U``, images ``I``,
question slots per image ``S``, token width ``L`` and regions ``R``; each changes from batch
to batch. :func:`pad_to_bucket` pads a batch to the smallest shape of a
:class:`ShapeBuckets` ladder that holds it, and adds a larger shape to the ladder when none
does, so a run sees a handful of shapes. The padding is built so that the padded batch's loss,
every gradient and every logged loss part equal the unpadded batch's (up to float rounding):

- extra rows form extra groups (a reasoning row and sub-questions, no irrelevant question)
  that ``group_valid`` marks as padding; the losses leave them out;
- their questions are one token 0 (the embedding's padding index), on extra images (zero
  features, one unmasked region so that their attention is finite), each in its own slot;
- extra regions are masked, extra token columns lie after every question's end, extra
  distinct questions are read by no row.
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import List

import torch

from ..layout import check_layout, class_range
from .group import PackedBatch

__all__ = ["StaticShape", "ShapeBuckets", "batch_shape", "pad_to_shape", "pad_to_bucket"]

PAD_QUESTION_ID = "<pad>"
PAD_IMAGE_ID = -1


@dataclass(frozen=True)
class StaticShape:
    """The sizes that fix every tensor shape of a step (see the module doc)."""

    rows: int
    groups: int
    questions: int
    images: int
    slots: int
    tokens: int
    regions: int

    def holds(self, need: "StaticShape") -> bool:
        """Whether a batch of shape ``need`` pads to this shape: every size at least the
        batch's, and room for the padding rows (two per extra group, each extra group needs
        rows, and every extra row its own slot on an extra image)."""
        if any(have < want for have, want in zip(astuple(self), astuple(need))):
            return False
        extra_rows = self.rows - need.rows
        extra_groups = self.groups - need.groups
        extra_images = self.images - need.images
        if extra_rows == 0:
            return extra_groups == 0
        return (extra_groups >= 1 and extra_rows >= 2 * extra_groups and extra_images >= 1
                and math.ceil(extra_rows / extra_images) <= self.slots)


def batch_shape(batch: PackedBatch) -> StaticShape:
    """The shape of ``batch`` itself (it must carry collate's distinct questions and slots)."""
    if batch.question_first is None or batch.image_slot is None:
        raise ValueError("padding needs the distinct questions and image slots that "
                         "collate_groups records (PackedBatch.question_first, image_slot)")
    return StaticShape(rows=batch.num_questions, groups=batch.num_groups,
                       questions=batch.question_first.numel(),
                       images=batch.image_features.shape[0], slots=batch.max_per_image,
                       tokens=batch.question_tokens.shape[1],
                       regions=batch.image_features.shape[1])


class ShapeBuckets:
    """A ladder of static shapes. :meth:`shape_for` returns the first that holds a batch, or
    appends one ``growth`` times the batch's sizes (and no smaller than the largest so far),
    so that batches a little larger than the first find room without a new shape."""

    def __init__(self, growth: float = 1.25) -> None:
        if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth >= 1):
            raise ValueError(f"growth must be a finite number >= 1, got {growth!r}")
        self.growth = float(growth)
        self.shapes: List[StaticShape] = []

    def shape_for(self, batch: PackedBatch) -> StaticShape:
        need = batch_shape(batch)
        for shape in self.shapes:
            if shape.holds(need):
                return shape
        last = self.shapes[-1] if self.shapes else need

        def grow(value: int, floor: int) -> int:
            return max(math.ceil(value * self.growth), floor)

        groups = grow(need.groups + 1, last.groups)
        rows = max(grow(need.rows, last.rows), need.rows + 2 * (groups - need.groups))
        images = grow(need.images + 1, last.images)
        slots = max(grow(need.slots, last.slots),
                    math.ceil((rows - need.rows) / (images - need.images)))
        shape = StaticShape(rows=rows, groups=groups,
                            questions=grow(need.questions + 1, last.questions),
                            images=images, slots=slots, tokens=grow(need.tokens, last.tokens),
                            regions=grow(need.regions, last.regions))
        assert shape.holds(need)
        self.shapes.append(shape)
        return shape


def _zero_padded(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """``t`` in the leading corner of zeros whose first dimensions are ``sizes`` (the rest as
    in ``t``)."""
    out = t.new_zeros(*sizes, *t.shape[len(sizes):])
    out[tuple(slice(0, n) for n in t.shape[:len(sizes)])] = t
    return out


def pad_to_bucket(batch: PackedBatch, buckets: ShapeBuckets) -> PackedBatch:
    """``batch`` (on the CPU, as collate made it) padded to ``buckets.shape_for(batch)``."""
    return pad_to_shape(batch, buckets.shape_for(batch))


def pad_to_shape(batch: PackedBatch, shape: StaticShape) -> PackedBatch:
    """``batch`` padded to ``shape`` (see the module doc); ``ValueError`` when it does not
    fit. The result has ``static_shape=True`` (the model then runs its LSTM over every token
    column instead of packing the sequences, whose packed length varies) and ``group_valid``
    marking the real groups; its layout is validated here, on the CPU."""
    need = batch_shape(batch)
    if batch.offsets.device.type != "cpu":
        raise ValueError(f"pad batches on the CPU, before moving them; got {batch.offsets.device}")
    if not shape.holds(need):
        raise ValueError(f"a batch of shape {need} does not pad to {shape}")
    check_layout(batch.offsets, batch.num_sub, need.rows)
    class_range(batch.classes)
    extra_rows, extra_groups = shape.rows - need.rows, shape.groups - need.groups
    extra_images = shape.images - need.images
    long = dict(dtype=torch.int64)

    pad_sizes = [2] * max(extra_groups - 1, 0)
    if extra_groups:
        pad_sizes.append(extra_rows - 2 * (extra_groups - 1))
    pad_sizes_t = torch.tensor(pad_sizes, **long)
    offsets = torch.cat([batch.offsets, batch.offsets[-1] + pad_sizes_t.cumsum(0)])
    num_sub = torch.cat([batch.num_sub, pad_sizes_t - 1])
    group_valid = torch.cat([torch.ones(need.groups, dtype=torch.bool),
                             torch.zeros(extra_groups, dtype=torch.bool)])

    tokens = _zero_padded(batch.question_tokens, shape.rows, shape.tokens)
    lengths = torch.cat([batch.question_lengths, torch.ones(extra_rows, **long)])

    mask = _zero_padded(batch.image_mask, shape.images, shape.regions)
    mask[need.images:, 0] = True
    pad_row = torch.arange(extra_rows)
    image_index = torch.cat([batch.image_index, need.images + pad_row % max(extra_images, 1)])
    image_slot = torch.cat([batch.image_slot, pad_row // max(extra_images, 1)])

    # the padding rows ask one question, the first extra distinct question (else any)
    extra_questions = shape.questions - need.questions
    pad_first = need.rows if extra_rows else 0
    first = torch.cat([batch.question_first, torch.full((extra_questions,), pad_first, **long)])
    inverse = torch.cat([batch.question_inverse,
                         torch.full((extra_rows,), need.questions if extra_questions else 0,
                                    **long)])
    padded = PackedBatch(
        question_tokens=tokens, question_lengths=lengths,
        image_features=_zero_padded(batch.image_features, shape.images, shape.regions),
        image_boxes=_zero_padded(batch.image_boxes, shape.images, shape.regions),
        image_mask=mask,
        image_index=image_index, offsets=offsets, num_sub=num_sub,
        targets=_zero_padded(batch.targets, shape.rows),
        classes=torch.cat([batch.classes, torch.zeros(extra_rows, **long)]),
        grounding=_zero_padded(batch.grounding, shape.groups, shape.regions),
        has_grounding=torch.cat([batch.has_grounding,
                                 torch.zeros(extra_groups, dtype=torch.bool)]),
        image_ids=list(batch.image_ids) + [PAD_IMAGE_ID] * extra_images,
        question_ids=list(batch.question_ids) + [PAD_QUESTION_ID] * extra_rows,
        question_first=first, question_inverse=inverse,
        image_slot=image_slot, max_per_image=shape.slots, group_valid=group_valid,
        static_shape=True)
    check_layout(padded.offsets, padded.num_sub, shape.rows)  # remembered for the step
    class_range(padded.classes)
    return padded
