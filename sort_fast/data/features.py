"""Bottom-up-attention region features (docs/data_formats.md): a directory of per-image
``.npy`` files (with optional ``_info.npy``) or the original TSV. Both index the files once and
read one image on demand."""
from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from abc import ABC, abstractmethod
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

__all__ = ["RegionFeatures", "open_region_features"]

_NPY_NAME = re.compile(r"(\d+)\.npy$")
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


class RegionFeatures(ABC):
    """``reader[image_id] -> (features [R, F] float32, boxes [R, 4] float32)`` with boxes as
    fractions of the image size (zeros when the size or the boxes are unknown). Every image
    must have the feature width ``F`` of the first one read (``ValueError`` naming the file)."""

    _width: Optional[int] = None

    @abstractmethod
    def __contains__(self, image_id: int) -> bool: ...

    @abstractmethod
    def __getitem__(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]: ...

    def check_images(self, image_ids: Iterable[int]) -> None:
        """Checks what can be checked cheaply for every image before training reads them one
        by one (a ``.npy`` header: its shape and dtype); the full check runs on each read."""

    def _same_width(self, path: Path, image_id: int, width: int) -> None:
        if self._width is None:
            self._width = width
        elif width != self._width:
            raise ValueError(f"{path}: image {image_id} has {width}-d region features, the "
                             f"images before it {self._width}-d")


def _check_finite(path: Path, image_id: int, what: str, values: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"{path}: image {image_id} has {bad.size} NaN/inf {what} value(s), e.g. "
                         f"{values.flat[bad[0]]} at flat index {bad[0]}")


def _normalised_boxes(path: Path, image_id: int, boxes: np.ndarray, n: int, width: float,
                      height: float) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size != n * 4:
        raise ValueError(f"{path}: boxes must be [{n}, 4] for {n} regions, got {boxes.shape}")
    boxes = boxes.reshape(n, 4)
    _check_finite(path, image_id, "box", boxes)
    if not (0 < width < np.inf and 0 < height < np.inf):
        raise ValueError(f"{path}: image size must be positive and finite, got {width}x{height}")
    return boxes / np.array([width, height, width, height], dtype=np.float32)


def _check_shape(path: Path, features: np.ndarray) -> None:
    if features.ndim != 2 or features.shape[0] == 0 or features.dtype.kind != "f":
        raise ValueError(f"{path}: features must be a non-empty 2-D float array, got "
                         f"{features.dtype} {features.shape}")


def _checked_features(path: Path, image_id: int, features: np.ndarray) -> np.ndarray:
    _check_shape(path, features)
    features = features.astype(np.float32, copy=False)
    _check_finite(path, image_id, "feature", features)
    return features


class NpyFeatures(RegionFeatures):
    """One ``<name><image_id>.npy`` per image (e.g. ``COCO_val2014_000000000042.npy``) with an
    optional ``<same name>_info.npy`` (0-d object array of a dict: ``bbox`` ``[R, 4]`` x1 y1 x2
    y2 in pixels, ``num_boxes``, ``image_width``/``image_height`` or ``image_w``/``image_h``).
    Two files for one image id raise ``ValueError``."""

    def __init__(self, directory: "os.PathLike[str] | str") -> None:
        self.directory = Path(directory)
        self._files: Dict[int, Path] = {}
        with os.scandir(self.directory) as it:
            for entry in it:
                m = _NPY_NAME.search(entry.name)
                if m and not entry.name.endswith("_info.npy"):
                    image_id = int(m.group(1))
                    if image_id in self._files:
                        raise ValueError(f"{self.directory}: image {image_id} has two feature "
                                         f"files, {self._files[image_id].name} and {entry.name}")
                    self._files[image_id] = Path(entry.path)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._files

    def check_images(self, image_ids: Iterable[int]) -> None:
        for image_id in image_ids:
            path = self._files[image_id]
            try:
                header = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, EOFError, ValueError) as e:
                raise ValueError(f"{path}: not a readable feature array ({e})") from None
            _check_shape(path, header)
            self._same_width(path, image_id, header.shape[1])

    def __getitem__(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]:
        path = self._files[image_id]
        try:
            raw = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a readable feature array ({e})") from None
        features = _checked_features(path, image_id, raw)
        self._same_width(path, image_id, features.shape[1])
        n = features.shape[0]
        info_path = path.with_name(path.stem + "_info.npy")
        if not info_path.exists():
            return features, np.zeros((n, 4), dtype=np.float32)
        try:
            info = np.load(info_path, allow_pickle=True)[()]
        except (OSError, EOFError, ValueError, IndexError) as e:
            raise ValueError(f"{info_path}: not a readable info array ({e})") from None
        if not isinstance(info, dict) or "bbox" not in info:
            raise ValueError(f"{info_path}: must hold a dict with 'bbox', got {type(info).__name__}")
        num_boxes = info.get("num_boxes", n)
        try:
            whole = int(num_boxes) == num_boxes
        except (TypeError, ValueError):
            whole = False
        if not whole or int(num_boxes) != n:
            raise ValueError(f"{info_path}: num_boxes={num_boxes!r} but {path.name} has "
                             f"{n} regions")
        width = info.get("image_width", info.get("image_w"))
        height = info.get("image_height", info.get("image_h"))
        if width is None or height is None:
            raise ValueError(f"{info_path}: needs image_width/image_height (or image_w/image_h)")
        return features, _normalised_boxes(info_path, image_id, info["bbox"], n, float(width),
                                           float(height))


class TsvFeatures(RegionFeatures):
    """The bottom-up-attention TSV (``image_id, image_w, image_h, num_boxes, boxes, features``,
    the last two base64 float32). Indexes the byte offset of every image once; an image id on
    two rows raises ``ValueError``."""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = Path(path)
        self._offsets: Dict[int, int] = {}
        try:
            with open(self.path, "rb") as f:
                offset = 0
                for lineno, line in enumerate(f, 1):
                    head = line.split(b"\t", 1)[0]
                    if line.strip():
                        if line.count(b"\t") != len(TSV_FIELDS) - 1 or not head.isdigit():
                            raise ValueError(f"{self.path}: line {lineno} must have the "
                                             f"{len(TSV_FIELDS)} tab-separated fields {TSV_FIELDS}")
                        if int(head) in self._offsets:
                            raise ValueError(f"{self.path}: line {lineno} repeats image "
                                             f"{int(head)}")
                        self._offsets[int(head)] = offset
                    offset += len(line)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read the feature TSV ({e})") from None

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._offsets

    def __getitem__(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[image_id])
            fields = f.readline().rstrip(b"\r\n").split(b"\t")
        try:
            width, height, n = float(fields[1]), float(fields[2]), int(fields[3])
            boxes = np.frombuffer(base64.b64decode(fields[4], validate=True), dtype=np.float32)
            features = np.frombuffer(base64.b64decode(fields[5], validate=True),
                                     dtype=np.float32)
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{self.path}: malformed row for image {image_id} ({e})") from None
        if n <= 0 or features.size % n:
            raise ValueError(f"{self.path}: image {image_id} has {features.size} feature values "
                             f"for num_boxes={n}")
        features = _checked_features(self.path, image_id, features.reshape(n, -1))
        self._same_width(self.path, image_id, features.shape[1])
        return features, _normalised_boxes(self.path, image_id, boxes, n, width, height)


def open_region_features(source: "os.PathLike[str] | str") -> RegionFeatures:
    """A directory of ``.npy`` files or a ``.tsv`` file."""
    path = Path(source)
    if path.is_dir():
        return NpyFeatures(path)
    if path.is_file():
        return TsvFeatures(path)
    raise ValueError(f"{path}: region features must be a directory of .npy files or a .tsv file "
                     "and this path does not exist")

