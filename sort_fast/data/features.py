"""Bottom-up-attention region features (docs/data_formats.md): a directory of per-image
``.npy`` files (with optional ``_info.npy``) or the original TSV. Both index the files once,
check every image before training and read one image on demand."""
from __future__ import annotations

import base64
import binascii
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, Optional, Tuple

import numpy as np

__all__ = ["RegionFeatures", "open_region_features", "save_region_info"]

_NPY_NAME = re.compile(r"(\d+)\.npy$")
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
# the fields of the 0-d structured array in an ``_info.npy`` (docs/data_formats.md): the
# dtype kinds allowed and what they mean
_INFO_FIELDS = {"bbox": ("iuf", "a [num_boxes, 4] number array"),
                "num_boxes": ("iu", "an integer"), "image_width": ("iuf", "a number"),
                "image_height": ("iuf", "a number")}


class RegionFeatures(ABC):
    """``reader[image_id] -> (features [R, F] float32, boxes [R, 4] float32)`` with boxes as
    fractions of the image size (zeros when the size or the boxes are unknown). Every image
    must have the feature width ``F > 0`` of the first one read (``ValueError`` naming the
    file)."""

    _width: Optional[int] = None

    @abstractmethod
    def __contains__(self, image_id: int) -> bool: ...

    @abstractmethod
    def __getitem__(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]: ...

    def check_images(self, image_ids: Iterable[int]) -> None:
        """Reads and checks every image of ``image_ids`` as ``reader[image_id]`` does (finite
        values, the box count, the image size, one feature width), so that bad data is refused
        with a ``ValueError`` naming the file and image before training reads them."""
        for image_id in image_ids:
            self[image_id]

    @property
    def feature_dim(self) -> int:
        """The feature width ``F`` of the images checked or read so far."""
        if self._width is None:
            raise ValueError("no image has been read yet")
        return self._width

    def _same_width(self, path: Path, image_id: int, width: int) -> None:
        if self._width is None:
            self._width = width
        elif width != self._width:
            raise ValueError(f"{path}: image {image_id} has {width}-d region features, the "
                             f"images before it {self._width}-d")


def _check_finite(path: Path, image_id: int, what: str, values: np.ndarray) -> None:
    finite = np.isfinite(values)
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    raise ValueError(f"{path}: image {image_id} has {bad.size} NaN/inf {what} value(s), e.g. "
                     f"{values.flat[bad[0]]} at flat index {bad[0]}")


def _normalised_boxes(path: Path, image_id: int, boxes: np.ndarray, n: int, width: float,
                      height: float) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size != n * 4:
        raise ValueError(f"{path}: image {image_id} has {n} regions, so its boxes must be "
                         f"[{n}, 4], got {boxes.shape}")
    boxes = boxes.reshape(n, 4)
    _check_finite(path, image_id, "box", boxes)
    if not (0 < width < np.inf and 0 < height < np.inf):
        raise ValueError(f"{path}: image {image_id}: image size must be positive and finite, "
                         f"got {width}x{height}")
    return boxes / np.array([width, height, width, height], dtype=np.float32)


def _checked_features(path: Path, image_id: int, features: np.ndarray) -> np.ndarray:
    if features.ndim != 2 or 0 in features.shape or features.dtype.kind != "f":
        raise ValueError(f"{path}: image {image_id}: features must be a 2-D float array with at "
                         f"least one region and one column, got {features.dtype} "
                         f"{features.shape}")
    features = features.astype(np.float32, copy=False)
    _check_finite(path, image_id, "feature", features)
    return features


def _info_boxes(info_path: Path, features_path: Path, image_id: int, n: int) -> np.ndarray:
    """The boxes ``[n, 4]`` of an ``_info.npy`` (:func:`save_region_info`) as fractions of the image
    size. Pickled files are refused without being unpickled (unpickling can run code)."""
    try:
        info = np.load(info_path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"{info_path}: a pickled info file, which sort_fast does not read "
                             "(unpickling a file can run code); convert it to the structured "
                             "array of docs/data_formats.md") from None
        raise ValueError(f"{info_path}: not a readable info array ({e})") from None
    except (OSError, EOFError, MemoryError) as e:
        raise ValueError(f"{info_path}: not a readable info array ({e})") from None
    names = info.dtype.names or ()
    missing = [name for name in _INFO_FIELDS if name not in names]
    if info.ndim != 0 or missing:
        raise ValueError(f"{info_path}: must be a 0-d structured array with the fields "
                         f"{', '.join(_INFO_FIELDS)}; got shape {info.shape}, missing "
                         f"{', '.join(missing) or 'none'}")
    for name, (kinds, what) in _INFO_FIELDS.items():
        value = info[name]
        if value.dtype.kind not in kinds or (name != "bbox" and value.ndim != 0):
            raise ValueError(f"{info_path}: {name} must be {what}, got {value.dtype} of shape "
                             f"{value.shape}")
    if int(info["num_boxes"]) != n:
        raise ValueError(f"{info_path}: num_boxes={int(info['num_boxes'])} but "
                         f"{features_path.name} (image {image_id}) has {n} regions")
    return _normalised_boxes(info_path, image_id, info["bbox"], n, float(info["image_width"]),
                             float(info["image_height"]))


def save_region_info(path: "os.PathLike[str] | str", boxes: np.ndarray, image_width: float,
                     image_height: float) -> None:
    """Writes an ``_info.npy`` as :class:`NpyFeatures` reads it: a 0-d structured array with
    ``bbox`` ``[R, 4]`` float32 (x1, y1, x2, y2 in pixels), ``num_boxes`` = R and the image
    size ``image_width``/``image_height`` (float64). No pickle."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{path}: boxes must be [R, 4], got {boxes.shape}")
    info = np.zeros((), np.dtype([("bbox", np.float32, boxes.shape), ("num_boxes", np.int64),
                                  ("image_width", np.float64), ("image_height", np.float64)]))
    info["bbox"], info["num_boxes"] = boxes, boxes.shape[0]
    info["image_width"], info["image_height"] = image_width, image_height
    with open(path, "wb") as f:  # a file object: np.save would append .npy to other names
        np.save(f, info, allow_pickle=False)


class NpyFeatures(RegionFeatures):
    """One ``<name><image_id>.npy`` per image (e.g. ``COCO_val2014_000000000042.npy``) with an
    optional ``<same name>_info.npy`` (:func:`save_region_info`). Two files for one image id
    raise ``ValueError``."""

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

    def __getitem__(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]:
        path = self._files[image_id]
        try:
            raw = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError, MemoryError) as e:  # a header claiming too much
            raise ValueError(f"{path}: not a readable feature array ({e})") from None
        features = _checked_features(path, image_id, raw)
        self._same_width(path, image_id, features.shape[1])
        n = features.shape[0]
        info_path = path.with_name(path.stem + "_info.npy")
        if not info_path.exists():
            return features, np.zeros((n, 4), dtype=np.float32)
        return features, _info_boxes(info_path, path, image_id, n)


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

    def _read(self, f: BinaryIO, image_id: int) -> Tuple[np.ndarray, np.ndarray]:
        """The row of ``image_id`` from the open TSV ``f``."""
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

    def check_images(self, image_ids: Iterable[int]) -> None:
        """As :meth:`RegionFeatures.check_images`, reading the rows in file order."""
        try:
            with open(self.path, "rb") as f:
                for image_id in sorted(image_ids, key=self._offsets.__getitem__):
                    self._read(f, image_id)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read the feature TSV ({e})") from None

    def __getitem__(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]:
        with open(self.path, "rb") as f:
            return self._read(f, image_id)


def open_region_features(source: "os.PathLike[str] | str") -> RegionFeatures:
    """A directory of ``.npy`` files or a ``.tsv`` file."""
    path = Path(source)
    if path.is_dir():
        return NpyFeatures(path)
    if path.is_file():
        return TsvFeatures(path)
    raise ValueError(f"{path}: region features must be a directory of .npy files or a .tsv file "
                     "and this path does not exist")
