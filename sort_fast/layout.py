"""The packed group layout shared by kernels, losses, the trainer and metrics (docs/ops.md).

All questions of a batch are rows of one ``[T, D]`` matrix. Group ``g`` owns rows
``offsets[g]:offsets[g+1]``: first its reasoning question, then ``num_sub[g]`` sub-questions,
then its irrelevant questions.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Layout", "check_layout", "validate_layout", "group_ids", "row_roles",
           "candidate_layout", "copy_validation", "class_range", "remember", "recall"]

ROLE_REASONING, ROLE_SUB, ROLE_IRRELEVANT = 0, 1, 2


# Host-side facts of tensors checked earlier (a validated layout, a class range), so that a batch
# validated once where it is built (on the CPU) is not validated again, with a device sync,
# on the training step's hot path (docs/ops.md, "Validation without host syncs").
_facts: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _stamp(t: torch.Tensor) -> Any:
    """What :func:`recall` compares to see that ``t`` still holds the values a fact was found
    for. A CPU tensor: a private copy of its values (writes through numpy, which shares the
    memory, or through ``.data`` do not move the version counter; comparing costs no device
    sync). Any other device: the version counter (reading the values back would be a sync).
    ``None``: nothing reliable (an inference tensor), so nothing is remembered."""
    if t.is_inference():
        return None
    return t.detach().clone() if t.device.type == "cpu" else t._version


def _unchanged(t: torch.Tensor, stamp: Any) -> bool:
    if isinstance(stamp, torch.Tensor):
        return (stamp.dtype == t.dtype and stamp.shape == t.shape
                and t.device.type == "cpu" and torch.equal(stamp, t))
    return not t.is_inference() and t.device.type != "cpu" and stamp == t._version


def remember(t: torch.Tensor, name: str, fact: Any, *companions: torch.Tensor) -> None:
    """Records ``fact`` about ``t`` (and the ``companions`` it was checked with); it stays valid
    while none of these tensors changes value (CPU) or is modified in place (other devices)."""
    stamps = [_stamp(x) for x in (t, *companions)]
    if any(stamp is None for stamp in stamps):
        return
    deps = [(weakref.ref(c), stamp) for c, stamp in zip(companions, stamps[1:])]
    _facts.setdefault(t, {})[name] = (stamps[0], deps, fact)


def recall(t: torch.Tensor, name: str, *companions: torch.Tensor) -> Any:
    """The fact :func:`remember` recorded about ``t`` with the same ``companions``, or None."""
    entry: Optional[Dict[str, Any]] = _facts.get(t)
    if entry is None or name not in entry:
        return None
    stamp, deps, fact = entry[name]
    if len(deps) != len(companions) or not _unchanged(t, stamp):
        return None
    for (ref, dep_stamp), c in zip(deps, companions):
        if ref() is not c or not _unchanged(c, dep_stamp):
            return None
    return fact


def copy_validation(source: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    target: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """What was validated about ``(offsets, num_sub, classes)`` of a batch holds for a copy with
    the same values (``target``, e.g. the batch moved to a GPU): recorded for it too. The
    copy's group sizes are computed from its own offsets, on its device (nothing is copied
    between devices here)."""
    (offsets, num_sub, classes), (new_offsets, new_num_sub, new_classes) = source, target
    known = recall(offsets, "layout", num_sub)
    if known is not None and new_offsets is not offsets:
        num_rows, layout = known
        moved = Layout(new_offsets[1:] - new_offsets[:-1], layout.max_group,
                       layout.num_with_irrelevant, layout.num_sub_rows)
        remember(new_offsets, "layout", (num_rows, moved), new_num_sub)
    known = recall(classes, "class_range")
    if known is not None and new_classes is not classes:
        remember(new_classes, "class_range", known)


def class_range(classes: torch.Tensor) -> Tuple[int, int]:
    """``(min, max)`` of an integer tensor: one host sync the first time, remembered for this
    tensor until it changes (a batch built on the CPU records it for free)."""
    known = recall(classes, "class_range")
    if known is None:
        known = tuple(torch.stack([classes.min(), classes.max()]).tolist())
        remember(classes, "class_range", known)
    return known


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


@dataclass(frozen=True)
class Layout:
    """A validated packed layout: group ``sizes [N]`` (int64, on the layout's device), the
    largest group size, the number of groups with at least one irrelevant question and the
    number of sub-question rows (0 when checked without ``num_sub``)."""

    sizes: torch.Tensor
    max_group: int
    num_with_irrelevant: int
    num_sub_rows: int = 0


def check_layout(
    offsets: torch.Tensor,
    num_sub: Optional[torch.Tensor],
    num_rows: Optional[int],
    device: Optional[torch.device] = None,
) -> Layout:
    """Validates a packed layout (docs/ops.md) with a single device-to-host copy, or none
    when these very tensors were validated before and have not changed since (on the CPU:
    the same values, compared with a copy made at validation; elsewhere: not modified in
    place).

    Raises ``TypeError`` when ``offsets``/``num_sub`` are not tensors and ``ValueError`` naming
    the first offending group for a wrong dtype, shape, device, non-monotone offsets, a row count
    that does not match ``num_rows`` or a ``num_sub`` outside ``1..size-1``.
    ``num_sub=None`` checks the offsets alone; ``num_rows=None`` skips the row-count check.
    """
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise ValueError(f"offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(
            f"offsets must be 1-D with N+1 >= 2 entries, got shape {tuple(offsets.shape)}"
        )
    if device is not None and offsets.device != device:
        raise ValueError(f"offsets is on {offsets.device} but the data is on {device}")
    companions = () if num_sub is None else (num_sub,)
    known = recall(offsets, "layout", *companions)
    if known is not None and (num_rows is None or known[0] == num_rows):
        return known[1]
    layout = _check_layout_values(offsets, num_sub, num_rows)
    remember(offsets, "layout", (int(offsets[-1]) if num_rows is None else num_rows, layout),
             *companions)
    return layout


def validate_layout(offsets: torch.Tensor, num_sub: Optional[torch.Tensor], num_rows: int,
                    device: Optional[torch.device] = None) -> None:
    """:func:`check_layout` outside ``torch.compile``; inside a compiled region the values are
    not looked at (that would need a host sync and break the graph)."""
    if not torch.compiler.is_compiling():
        check_layout(offsets, num_sub, num_rows, device)


def _check_layout_values(offsets: torch.Tensor, num_sub: Optional[torch.Tensor],
                         num_rows: Optional[int]) -> Layout:
    sizes = offsets[1:] - offsets[:-1]
    stats = [offsets[0], offsets[-1], sizes.min(), sizes.max()]
    if num_sub is not None:
        if not isinstance(num_sub, torch.Tensor):
            raise TypeError(f"num_sub must be a torch.Tensor, got {type(num_sub).__name__}")
        if num_sub.dtype != torch.int64:
            raise ValueError(f"num_sub must be int64, got {num_sub.dtype}")
        if num_sub.shape != sizes.shape:
            raise ValueError(
                f"num_sub must have shape [{sizes.numel()}] (one entry per group), "
                f"got {tuple(num_sub.shape)}"
            )
        if num_sub.device != offsets.device:
            raise ValueError(f"num_sub is on {num_sub.device} but offsets is on {offsets.device}")
        num_irrelevant = sizes - 1 - num_sub
        stats += [num_sub.min(), num_irrelevant.min(), (num_irrelevant > 0).sum(), num_sub.sum()]
    first, last, min_size, max_size, *sub_stats = torch.stack(stats).tolist()

    if first != 0:
        raise ValueError(f"offsets[0] must be 0, got {first}")
    if min_size <= 0:
        g = _first(sizes <= 0)
        raise ValueError(
            f"offsets must be strictly increasing: group {g} has offsets[{g}]={int(offsets[g])}"
            f" and offsets[{g + 1}]={int(offsets[g + 1])}"
        )
    if num_rows is not None and last != num_rows:
        raise ValueError(f"offsets[-1]={last} does not match the {num_rows} rows of the data")
    if num_sub is None:
        return Layout(sizes, max_size, 0)
    min_sub, min_irrelevant, num_with_irrelevant, num_sub_rows = sub_stats
    if min_sub < 1:
        g = _first(num_sub < 1)
        raise ValueError(f"group {g} has num_sub={int(num_sub[g])}; every group needs >= 1")
    if min_irrelevant < 0:
        g = _first(num_sub > sizes - 1)
        raise ValueError(
            f"group {g} has num_sub={int(num_sub[g])} but only {int(sizes[g]) - 1} rows "
            "after its reasoning row"
        )
    return Layout(sizes, max_size, num_with_irrelevant, num_sub_rows)


def group_ids(sizes: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Group index of every row, ``[T]`` int64, from the group sizes ``[N]``."""
    return torch.repeat_interleave(
        torch.arange(sizes.numel(), device=sizes.device), sizes, output_size=num_rows
    )


def row_roles(offsets: torch.Tensor, num_sub: torch.Tensor, sizes: torch.Tensor,
              gid: Optional[torch.Tensor] = None, num_rows: Optional[int] = None) -> torch.Tensor:
    """Role of every row, ``[T]`` int64: 0 reasoning, 1 sub-question, 2 irrelevant.
    ``gid``: the rows' group ids (:func:`group_ids`), when the caller has them already;
    ``num_rows``: ``T`` when the caller knows it (else read from ``offsets``: a host sync)."""
    if num_rows is None:
        num_rows = gid.numel() if gid is not None else int(offsets[-1])
    if gid is None:
        gid = group_ids(sizes, num_rows)
    pos = torch.arange(num_rows, device=offsets.device) - offsets[:-1][gid]
    roles = torch.where(pos <= num_sub[gid], ROLE_SUB, ROLE_IRRELEVANT)
    return torch.where(pos == 0, ROLE_REASONING, roles)


def candidate_layout(
    offsets: torch.Tensor, num_sub: torch.Tensor, num_rows: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate view of a validated packed layout (``num_rows`` as in :func:`check_layout`)
    for the ranking metrics (docs/ops.md).

    Returns ``(rows [C], relevant [C] bool, candidate_offsets [N+1])``: the packed row of every
    candidate (all rows but the reasoning rows), whether it is a sub-question, and the
    candidate offsets (``offsets[g] - g``).
    """
    sizes = check_layout(offsets, num_sub, num_rows).sizes
    roles = row_roles(offsets, num_sub, sizes)
    rows = (roles != ROLE_REASONING).nonzero().squeeze(1)
    relevant = roles[rows] == ROLE_SUB
    candidate_offsets = offsets - torch.arange(offsets.numel(), device=offsets.device)
    return rows, relevant, candidate_offsets
