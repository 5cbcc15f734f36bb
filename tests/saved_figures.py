"""Test helper: the matplotlib figures that code under test saves, to check what they show."""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import pytest
from matplotlib.figure import Figure


@contextlib.contextmanager
def saved_figures() -> Iterator[List[Figure]]:
    """Within the block every ``Figure.savefig`` still writes its file and appends its figure
    to the yielded list (a closed figure keeps its axes and artists)."""
    figures: List[Figure] = []
    savefig = Figure.savefig

    def recording(self: Figure, *args, **kwargs):
        figures.append(self)
        return savefig(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", recording)
        yield figures


def markers(ax, marker: str) -> list:
    """The lines of ``ax`` drawn with ``marker`` only (no line between the points)."""
    return [line for line in ax.lines if line.get_marker() == marker]


def suptitle(figure: Figure) -> str:
    """The text of the figure's title above its axes (its only figure-level text)."""
    (text,) = figure.texts
    return text.get_text()
