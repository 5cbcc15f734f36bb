"""VQA-HAT human attention maps (docs/data_formats.md) and region weights painted onto the same
grid."""
from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Collection, Dict, List, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["load_hat_maps", "regions_to_map"]

_HAT_NAME = re.compile(r"^(\d+)_(\d+)\.png$")
# Pillow opens 16-bit grey PNGs as "I;16" (older versions as "I"); PNG samples have <= 16 bits
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
# the largest map decoded (VQA-HAT maps are image-sized, well below this); a header claiming
# more is refused before any pixel is decoded
MAX_HAT_PIXELS = 4096 * 4096


def _grey(img: Image.Image, size: int) -> np.ndarray:
    """``img`` as ``[size, size]`` float32 in [0, 1], scaled by its bit depth."""
    if img.mode in _SIXTEEN_BIT:
        wide = Image.fromarray(np.asarray(img, dtype=np.float32))
        return np.asarray(wide.resize((size, size), Image.BILINEAR)) / np.float32(65535.0)
    small = img.convert("L").resize((size, size), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


def load_hat_maps(directory: "os.PathLike[str] | str", size: int = 14,
                  question_ids: Optional[Collection[int]] = None) -> Dict[int, np.ndarray]:
    """``{question_id: [size, size] float32 in [0, 1]}``: every ``{question_id}_{k}.png`` of
    ``directory`` (8- or 16-bit, scaled by its bit depth) resized (bilinear) to ``size x size``,
    then averaged over ``k``.
    ``question_ids`` restricts the questions read. An unreadable PNG, or one whose header claims
    more than ``MAX_HAT_PIXELS`` pixels, is a ``ValueError`` naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: VQA-HAT maps must be a directory of PNGs")
    files: Dict[int, List[Path]] = defaultdict(list)
    for entry in sorted(os.listdir(directory)):
        m = _HAT_NAME.match(entry)
        if m and (question_ids is None or int(m.group(1)) in question_ids):
            files[int(m.group(1))].append(directory / entry)
    maps = {}
    for qid, paths in files.items():
        total = np.zeros((size, size), dtype=np.float32)
        for path in paths:
            try:
                with warnings.catch_warnings():  # Pillow warns past its own limit; we refuse
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img = Image.open(path)  # reads the header only
                with img:
                    if img.width * img.height > MAX_HAT_PIXELS:
                        raise ValueError(f"{path}: its header claims {img.width}x{img.height} "
                                         f"pixels, more than the {MAX_HAT_PIXELS} read for an "
                                         "attention map")
                    total += _grey(img, size)
            except Image.DecompressionBombError as e:
                raise ValueError(f"{path}: its header claims too many pixels ({e})") from None
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"{path}: not a readable PNG ({e})") from None
        maps[qid] = total / len(paths)
    return maps


def regions_to_map(weights: np.ndarray, boxes: np.ndarray, size: int = 14) -> np.ndarray:
    """Paints region weights ``[R]`` onto a ``[size, size]`` grid: each cell gets the sum of
    the weights of the boxes ``[R, 4]`` (x1, y1, x2, y2 as fractions) covering its centre."""
    weights, boxes = np.asarray(weights, dtype=np.float32), np.asarray(boxes, dtype=np.float32)
    if weights.ndim != 1 or boxes.shape != (weights.shape[0], 4):
        raise ValueError(f"weights must be [R] and boxes [R, 4], got {weights.shape} and "
                         f"{boxes.shape}")
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    in_x = (boxes[:, 0, None] <= centres) & (centres <= boxes[:, 2, None])     # [R, size]
    in_y = (boxes[:, 1, None] <= centres) & (centres <= boxes[:, 3, None])
    return np.einsum("r,ry,rx->yx", weights, in_y.astype(np.float32), in_x.astype(np.float32))
