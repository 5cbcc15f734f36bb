"""One ``<image, reasoning question>`` group and the packed batch built from several
(docs/ops.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..layout import check_layout, class_range, copy_validation

__all__ = ["Group", "PackedBatch", "collate_groups", "distinct_questions", "image_slots",
           "lstm_packing"]


@dataclass
class Group:
    """An image, its reasoning question, ``num_sub`` sub-questions and irrelevant questions.

    Per-question lists (length ``Q = 1 + num_sub + #irrelevant``, reasoning first):
    ``question_ids``, ``questions`` (text), ``question_tokens`` (vocabulary indices),
    ``answers`` (ground-truth answer string) and ``targets`` (sparse VQA soft scores:
    answer index -> score in ``[0, 1]`` over ``num_answers`` answers).
    Image: ``features [R, F]`` float32, ``boxes [R, 4]`` float32 (x1, y1, x2, y2 as fractions of
    the image size). ``grounding [R]``: which regions a person looks at for the reasoning
    question (non-negative, sums to 1), ``None`` when unknown.
    """

    image_id: int
    question_ids: List[str]
    questions: List[str]
    question_tokens: List[List[int]]
    answers: List[str]
    targets: List[Dict[int, float]]
    num_answers: int
    num_sub: int
    features: np.ndarray
    boxes: np.ndarray
    grounding: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        q = len(self.questions)
        for name in ("question_ids", "question_tokens", "answers", "targets"):
            if len(getattr(self, name)) != q:
                raise ValueError(f"group of image {self.image_id}: {name} has "
                                 f"{len(getattr(self, name))} entries for {q} questions")
        if not 1 <= self.num_sub <= q - 1:
            raise ValueError(f"group of image {self.image_id}: num_sub={self.num_sub} must be in "
                             f"1..{q - 1} for {q} questions")
        if any(len(t) == 0 for t in self.question_tokens):
            raise ValueError(f"group of image {self.image_id}: a question has no tokens")
        if self.features.ndim != 2 or self.features.shape[0] == 0:
            raise ValueError(f"group of image {self.image_id}: features must be [R>0, F], got "
                             f"{self.features.shape}")
        r = self.features.shape[0]
        if self.boxes.shape != (r, 4):
            raise ValueError(f"group of image {self.image_id}: boxes must be [{r}, 4], got "
                             f"{self.boxes.shape}")
        if self.grounding is not None and self.grounding.shape != (r,):
            raise ValueError(f"group of image {self.image_id}: grounding must be [{r}], got "
                             f"{self.grounding.shape}")

    @property
    def num_irrelevant(self) -> int:
        return len(self.questions) - 1 - self.num_sub


@dataclass
class PackedBatch:
    """Groups packed in the layout of docs/ops.md; every image appears once.

    ``question_tokens [T, L]`` int64 (0-padded), ``question_lengths [T]`` int64,
    ``image_features [I, R, F]`` float32, ``image_boxes [I, R, 4]``, ``image_mask [I, R]`` bool
    (real regions), ``image_index [T]`` int64 (row of ``image_features`` of each question),
    ``offsets [N+1]`` int64, ``num_sub [N]`` int64, ``targets [T, A]`` float32 soft scores,
    ``classes [T]`` int64 (argmax of ``targets``: the ground-truth class; 0 for an all-zero row),
    ``grounding [N, R]`` float32 (zeros where unknown), ``has_grounding [N]`` bool,
    ``image_ids`` (``I`` ints) and ``question_ids`` (``T`` strings).

    What the model would otherwise find on the device (with host syncs) in every forward,
    :func:`collate_groups` also records: ``question_first [U]`` (first row of each distinct
    ``(tokens, length)`` question, ordered by length then tokens), ``question_inverse [T]``
    (the distinct question of every row), the LSTM's packing of the distinct questions
    (:func:`lstm_packing`: ``lstm_rows [P]``, a tensor that travels with the batch, and
    ``lstm_batch_sizes``, ``L`` host ints), ``image_slot [T]``
    (position of each question among its image's questions) and ``max_per_image``. ``None``
    where unknown: the model then computes them itself (reading the lengths back from the
    device). They are derived from ``question_tokens``, ``question_lengths`` and
    ``image_index``: change those with :meth:`replace`, which drops what they invalidate
    (``dataclasses.replace`` keeps stale values; a row count that no longer matches raises
    ``ValueError``).

    A batch padded to a static shape (:func:`~sort_fast.data.buckets.pad_to_shape`) has
    ``static_shape=True`` and ``group_valid [N]`` bool (False for the padding groups, which
    the losses leave out); ``group_valid=None``: every group is real.
    """

    question_tokens: torch.Tensor
    question_lengths: torch.Tensor
    image_features: torch.Tensor
    image_boxes: torch.Tensor
    image_mask: torch.Tensor
    image_index: torch.Tensor
    offsets: torch.Tensor
    num_sub: torch.Tensor
    targets: torch.Tensor
    classes: torch.Tensor
    grounding: torch.Tensor
    has_grounding: torch.Tensor
    image_ids: List[int]
    question_ids: List[str]
    question_first: Optional[torch.Tensor] = None
    question_inverse: Optional[torch.Tensor] = None
    lstm_rows: Optional[torch.Tensor] = None
    lstm_batch_sizes: Optional[List[int]] = None
    image_slot: Optional[torch.Tensor] = None
    max_per_image: Optional[int] = None
    group_valid: Optional[torch.Tensor] = None
    static_shape: bool = False

    def __post_init__(self) -> None:
        rows = self.question_tokens.shape[0]
        for name in ("question_inverse", "image_slot"):
            value = getattr(self, name)
            if value is not None and value.shape != (rows,):
                raise ValueError(f"PackedBatch.{name} has shape {tuple(value.shape)} for {rows} "
                                 "question rows: it is stale (use PackedBatch.replace)")
        if self.group_valid is not None and self.group_valid.shape != self.num_sub.shape:
            raise ValueError(f"PackedBatch.group_valid has shape {tuple(self.group_valid.shape)}"
                             f" for {self.num_sub.numel()} groups")
        if (self.lstm_rows is None) != (self.lstm_batch_sizes is None) or (
                self.lstm_rows is not None
                and (self.lstm_rows.shape != (sum(self.lstm_batch_sizes),)
                     or len(self.lstm_batch_sizes) > self.question_tokens.shape[1])):
            raise ValueError("PackedBatch.lstm_rows and lstm_batch_sizes do not describe one "
                             "packing of the question tokens: they are stale (use "
                             "PackedBatch.replace)")

    def replace(self, **changes) -> "PackedBatch":
        """A copy with ``changes``; the derived question and image-slot fields are dropped
        when a field they derive from changes."""
        if {"question_tokens", "question_lengths"} & changes.keys():
            changes = {"question_first": None, "question_inverse": None,
                       "lstm_rows": None, "lstm_batch_sizes": None,
                       **changes}
        if "image_index" in changes:
            changes = {"image_slot": None, "max_per_image": None, **changes}
        return dataclasses.replace(self, **changes)

    @property
    def num_groups(self) -> int:
        return self.num_sub.numel()

    @property
    def num_questions(self) -> int:
        return self.question_tokens.shape[0]

    def _map(self, fn) -> "PackedBatch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v
                              for k, v in values.items()})

    def _map_validated(self, fn) -> "PackedBatch":
        """``_map``, keeping what was validated about the layout and classes (no new sync).
        A CPU batch is (re)validated first, where that costs no device sync: a batch packed
        in a ``DataLoader`` worker reaches this process as new tensor objects."""
        if self.offsets.device.type == "cpu":
            check_layout(self.offsets, self.num_sub, self.num_questions)
            class_range(self.classes)
        out = self._map(fn)
        copy_validation((self.offsets, self.num_sub, self.classes),
                        (out.offsets, out.num_sub, out.classes))
        return out

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "PackedBatch":
        """The same batch with every tensor on ``device`` (from a pinned batch with
        ``non_blocking=True``: an asynchronous copy, no stream sync)."""
        return self._map_validated(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """Pinned copy (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map_validated(lambda t: t.pin_memory())


def collate_groups(groups: Sequence[Group]) -> PackedBatch:
    """Packs groups (a ``DataLoader`` ``collate_fn``). Groups of the same ``image_id`` share one
    row of ``image_features``; regions are zero-padded to the batch's largest image."""
    if not groups:
        raise ValueError("collate_groups needs at least one group")
    num_answers = groups[0].num_answers
    image_row: Dict[int, int] = {}
    images: List[Group] = []
    tokens: List[List[int]] = []
    image_index: List[int] = []
    target_rows: List[int] = []
    target_cols: List[int] = []
    target_vals: List[float] = []
    question_ids: List[str] = []
    for g in groups:
        if g.num_answers != num_answers:
            raise ValueError(f"group of image {g.image_id} has {g.num_answers} answers, the first "
                             f"group {num_answers}")
        row = image_row.get(g.image_id)
        if row is None:
            row = image_row[g.image_id] = len(images)
            images.append(g)
        for q, target in enumerate(g.targets):
            target_rows.extend([len(tokens) + q] * len(target))
            target_cols.extend(target)
            target_vals.extend(target.values())
        tokens.extend(g.question_tokens)
        image_index.extend([row] * len(g.targets))
        question_ids.extend(g.question_ids)

    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.int64)
    question_tokens = torch.zeros(len(tokens), int(lengths.max()), dtype=torch.int64)
    for i, t in enumerate(tokens):
        question_tokens[i, : len(t)] = torch.as_tensor(t)

    num_regions = max(g.features.shape[0] for g in images)
    feat_dims = {g.features.shape[1] for g in images}
    if len(feat_dims) != 1:
        raise ValueError(f"images of one batch have different feature sizes {sorted(feat_dims)}")
    features = torch.zeros(len(images), num_regions, feat_dims.pop())
    boxes = torch.zeros(len(images), num_regions, 4)
    mask = torch.zeros(len(images), num_regions, dtype=torch.bool)
    for i, g in enumerate(images):
        r = g.features.shape[0]
        features[i, :r] = torch.from_numpy(np.asarray(g.features, dtype=np.float32))
        boxes[i, :r] = torch.from_numpy(np.asarray(g.boxes, dtype=np.float32))
        mask[i, :r] = True

    grounding = torch.zeros(len(groups), num_regions)
    has_grounding = torch.zeros(len(groups), dtype=torch.bool)
    for n, g in enumerate(groups):
        if g.grounding is not None:
            grounding[n, : g.grounding.shape[0]] = torch.from_numpy(
                np.asarray(g.grounding, dtype=np.float32))
            has_grounding[n] = True

    targets = torch.zeros(len(tokens), num_answers)
    if target_rows:
        if max(target_cols) >= num_answers or min(target_cols) < 0:
            raise ValueError(f"a target answer index is outside 0..{num_answers - 1}")
        targets[target_rows, target_cols] = torch.tensor(target_vals, dtype=torch.float32)

    sizes = torch.tensor([len(g.targets) for g in groups], dtype=torch.int64)
    offsets = torch.zeros(len(groups) + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=offsets[1:])
    num_sub = torch.tensor([g.num_sub for g in groups], dtype=torch.int64)
    # validated here, on the CPU, once: the training step then checks without a host sync
    check_layout(offsets, num_sub, len(tokens))
    classes = targets.argmax(1)
    class_range(classes)
    first, inverse, distinct_lengths = distinct_questions(tokens)
    lstm_rows, lstm_batch_sizes = lstm_packing(distinct_lengths, question_tokens.shape[1])
    slot, max_per_image = image_slots(image_index)
    return PackedBatch(
        question_tokens=question_tokens,
        question_lengths=lengths,
        image_features=features,
        image_boxes=boxes,
        image_mask=mask,
        image_index=torch.tensor(image_index, dtype=torch.int64),
        offsets=offsets,
        num_sub=num_sub,
        targets=targets,
        classes=classes,
        grounding=grounding,
        has_grounding=has_grounding,
        image_ids=[g.image_id for g in images],
        question_ids=question_ids,
        question_first=torch.tensor(first, dtype=torch.int64),
        question_inverse=torch.tensor(inverse, dtype=torch.int64),
        lstm_rows=torch.tensor(lstm_rows, dtype=torch.int64),
        lstm_batch_sizes=lstm_batch_sizes,
        image_slot=torch.tensor(slot, dtype=torch.int64),
        max_per_image=max_per_image,
    )


def distinct_questions(tokens: Sequence[Sequence[int]]) -> Tuple[List[int], List[int], List[int]]:
    """``(first [U], inverse [T], lengths [U])`` of the questions ``tokens`` (``T`` token
    lists): the first row of each distinct question, in order of (length, tokens), the distinct
    question of every row, and each distinct question's length."""
    keys = [(len(t), *t) for t in tokens]
    order = sorted(set(keys))
    rank = {key: u for u, key in enumerate(order)}
    inverse = [rank[key] for key in keys]
    first = [-1] * len(order)
    for row, u in enumerate(inverse):
        if first[u] < 0:
            first[u] = row
    return first, inverse, [key[0] for key in order]


def lstm_packing(lengths: Sequence[int], width: int) -> Tuple[List[int], List[int]]:
    """How ``torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
    enforce_sorted=False)`` packs ``x [B, width, ...]``, found on the host: ``rows [P]``, the
    flat index ``b * width + t`` into ``x.flatten(0, 1)`` of every packed element (time step by
    time step, sequences in the order of ``torch.sort(lengths, descending=True)``, as PyTorch
    sorts them), and ``batch_sizes [max(lengths)]`` (sequences still running at each step).
    Packing ``x`` is then ``x.flatten(0, 1)[rows]``, with no device read."""
    if any(n < 1 or n > width for n in lengths):
        raise ValueError(f"sequence lengths must be in 1..{width}, got {list(lengths)}")
    order = torch.sort(torch.as_tensor(lengths, dtype=torch.int64), descending=True)[1].tolist()
    batch_sizes = [sum(1 for n in lengths if n > t) for t in range(max(lengths, default=0))]
    rows = [order[b] * width + t for t, size in enumerate(batch_sizes) for b in range(size)]
    return rows, batch_sizes


def image_slots(image_index: Sequence[int]) -> Tuple[List[int], int]:
    """Position of every question among the questions of its image (in row order), and the
    largest number of questions on one image."""
    counts: Dict[int, int] = {}
    slot = []
    for image in image_index:
        slot.append(counts.get(image, 0))
        counts[image] = slot[-1] + 1
    return slot, max(counts.values(), default=0)
