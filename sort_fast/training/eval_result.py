"""What an evaluation returns (:func:`sort_fast.training.evaluation.evaluate`), read by the
report writer and the plots."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["Example", "EvalResult"]


@dataclass
class Example:
    """One validation group for the plots: its ``questions [Q]`` (reasoning first), ``roles
    [Q]``, Grad-CAM ``similarity [Q]`` with the reasoning question, ``predicted [Q]`` answers
    and whether they are ``correct [Q]``, the reasoning question's region Grad-CAM ``cam [R]``,
    region ``boxes [R, 4]`` and ``grounding [R]`` truth (``None`` if unknown)."""

    questions: List[str]
    roles: np.ndarray
    similarity: np.ndarray
    predicted: List[str]
    correct: np.ndarray
    cam: np.ndarray
    boxes: np.ndarray
    grounding: Optional[np.ndarray]


@dataclass
class EvalResult:
    """``metrics`` (JSON-ready), Grad-CAM ``similarity [T]`` and ``roles [T]`` of every
    validation question, and a few :class:`Example` groups."""

    metrics: Dict[str, Any]
    similarity: np.ndarray
    roles: np.ndarray
    examples: List[Example] = field(default_factory=list)
