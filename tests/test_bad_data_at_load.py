"""Bad data files refused when the data set is opened, before the first training step, with one
line naming the file and the item (image, key, question): a ``ValueError`` from the API and a
one-line error (exit 2) from ``python -m sort_fast.train`` and ``sort_fast.evaluate``. Second
fault campaign (issue 23: D3-D6 and the data parts of D12)."""
import base64
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sort_fast.data import load_hat_maps, save_region_info
from sort_fast.evaluate import main as evaluate_main
from sort_fast.train import main
from test_data import _open
from test_data import real as real_files  # noqa: F401  (a fixture, named so below)

TINY = ["--hidden-dim", "16", "--joint-dim", "32", "--batch-groups", "2", "--max-steps", "2",
        "--eval-every", "0", "--no-plots", "--device", "cpu"]


@pytest.fixture()
def real(request):
    """The tiny real-format files of tests/test_data.py."""
    return request.getfixturevalue("real_files")


def _npy(real, image_id):
    return real["npy"] / f"COCO_val2014_{image_id:012d}.npy"


def _info(real, image_id):
    return real["npy"] / f"COCO_val2014_{image_id:012d}_info.npy"


def _data_flags(real, features="npy", val_features=None):
    val_features = real[features] if val_features is None else val_features
    flags = ["--introspect", real["introspect"], "--vqa-questions", real["questions"],
             "--vqa-annotations", real["annotations"], "--features", real[features],
             "--val-introspect", real["introspect"], "--val-vqa-questions", real["questions"],
             "--val-vqa-annotations", real["annotations"], "--val-features", val_features]
    return [str(f) for f in flags]


def _train_error(real, capsys, *flags, features="npy", val_features=None):
    """The one-line error of a training run on ``real`` that must be refused at load."""
    capsys.readouterr()
    code = main(["--out", str(real["tmp"] / "out"), *TINY,
                 *_data_flags(real, features, val_features), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err
    assert not (real["tmp"] / "out" / "log.jsonl").exists()            # refused before step 1
    return err


def _struct_info(path, **fields):
    """An ``_info.npy`` with the given fields (name -> (numpy dtype, value))."""
    dtype = [(name, kind, np.shape(value)) for name, (kind, value) in fields.items()]
    np.save(path, np.array(tuple(v for _, v in fields.values()), dtype=dtype))


def _tsv_row(image_id, feats, *, size=("100", "50"), num_boxes=None, boxes=None):
    boxes = np.tile(np.array([0, 0, 100, 50], np.float32), (len(feats), 1)) if boxes is None \
        else boxes
    return "\t".join([str(image_id), *size, str(len(feats) if num_boxes is None else num_boxes),
                      base64.b64encode(np.asarray(boxes, np.float32).tobytes()).decode(),
                      base64.b64encode(np.asarray(feats, np.float32).tobytes()).decode()])


def _replace_tsv_row(real, image_id, row):
    lines = [row if line.startswith(f"{image_id}\t") else line
             for line in real["tsv"].read_text().splitlines()]
    real["tsv"].write_text("\n".join(lines) + "\n")


# --- D3: every image is checked when the data set is opened --------------------------------
# Image 42 is the last image checked (ids in order), so each case also shows that the check
# covers the whole set, not only the first image.

def _nan_feature(real):
    feats = real["feats"][42].copy()
    feats[3, 5] = np.nan
    np.save(_npy(real, 42), feats)
    return _npy(real, 42).name, "image 42 has 1 NaN/inf feature value"


def _inf_box(real):
    boxes = real["boxes42"].copy()
    boxes[2, 1] = np.inf
    save_region_info(_info(real, 42), boxes, 640, 480)
    return _info(real, 42).name, "image 42 has 1 NaN/inf box value"


def _wrong_num_boxes(real):
    _struct_info(_info(real, 42), bbox=("<f4", real["boxes42"]), num_boxes=("<i8", 5),
                 image_width=("<f8", 640), image_height=("<f8", 480))
    return _info(real, 42).name, "num_boxes=5 but COCO_val2014_000000000042.npy (image 42) has 4"


def _no_image_size(real):
    _struct_info(_info(real, 42), bbox=("<f4", real["boxes42"]), num_boxes=("<i8", 4))
    return _info(real, 42).name, "missing image_width, image_height"


def _zero_image_width(real):
    save_region_info(_info(real, 42), real["boxes42"], 0, 480)
    return _info(real, 42).name, "image 42: image size must be positive and finite, got 0.0x480"


def _fewer_boxes_than_regions(real):
    save_region_info(_info(real, 42), real["boxes42"][:3], 640, 480)
    return _info(real, 42).name, "num_boxes=3 but"


def _huge_header(real):
    """A header claiming 2^40 x 2048 floats (8 PiB) over 64 bytes of data."""
    with open(_npy(real, 42), "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 40, 2048)})
        f.write(bytes(64))
    return _npy(real, 42).name, "not a readable feature array"


NPY_CASES = [_nan_feature, _inf_box, _wrong_num_boxes, _no_image_size, _zero_image_width,
             _fewer_boxes_than_regions, _huge_header]


@pytest.mark.parametrize("spoil", NPY_CASES, ids=lambda f: f.__name__)
def test_bad_npy_image_is_refused_at_open(real, spoil):
    name, message = spoil(real)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        _open(real)                                    # no image read by index
    assert str(err.value).startswith(str(real["npy"] / name))
    assert "\n" not in str(err.value)


def _tsv_nan_feature(real):
    feats = real["feats"][42].copy()
    feats[0, 0] = -np.inf
    _replace_tsv_row(real, 42, _tsv_row(42, feats))
    return "image 42 has 1 NaN/inf feature value"


def _tsv_bad_base64(real):
    row = _tsv_row(42, real["feats"][42])
    _replace_tsv_row(real, 42, row[:-8] + "!!!!" + row[-4:])
    return "malformed row for image 42"


def _tsv_wrong_num_boxes(real):
    _replace_tsv_row(real, 42, _tsv_row(42, real["feats"][42], num_boxes=5))
    return "image 42 has 24 feature values for num_boxes=5"


def _tsv_boxes_for_another_count(real):
    _replace_tsv_row(real, 42, _tsv_row(42, real["feats"][42], num_boxes=3,
                                        boxes=np.zeros((4, 4))))
    return r"image 42 has 3 regions, so its boxes must be \[3, 4\], got \(16,\)"


def _tsv_text_in_a_number(real):
    _replace_tsv_row(real, 42, _tsv_row(42, real["feats"][42], size=("wide", "50")))
    return "malformed row for image 42"


def _tsv_nan_size(real):
    _replace_tsv_row(real, 42, _tsv_row(42, real["feats"][42], size=("nan", "50")))
    return "image 42: image size must be positive and finite"


TSV_CASES = [_tsv_nan_feature, _tsv_bad_base64, _tsv_wrong_num_boxes,
             _tsv_boxes_for_another_count, _tsv_text_in_a_number, _tsv_nan_size]


@pytest.mark.parametrize("spoil", TSV_CASES, ids=lambda f: f.__name__)
def test_bad_tsv_row_is_refused_at_open(real, spoil):
    message = spoil(real)
    with pytest.raises(ValueError, match=message) as err:
        _open(real, "tsv")
    assert str(err.value).startswith(f"{real['tsv']}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("spoil", [_nan_feature, _wrong_num_boxes, _no_image_size],
                         ids=lambda f: f.__name__)
def test_bad_npy_image_from_the_command_line(real, spoil, capsys):
    name, message = spoil(real)
    err = _train_error(real, capsys)
    assert f"{real['npy'] / name}: " in err and message in err


@pytest.mark.parametrize("workers", ["0", "2"])
def test_bad_tsv_row_from_the_command_line(real, capsys, workers):
    message = _tsv_bad_base64(real)
    err = _train_error(real, capsys, "--workers", workers, features="tsv")
    assert f"{real['tsv']}: {message}" in err


def test_good_files_still_open_and_read_the_same(real):
    """The check at open changes nothing that is read: values and boxes as before."""
    for features in ("npy", "tsv"):
        ds = _open(real, features)
        assert ds.feature_dim == 6
        np.testing.assert_array_equal(ds[0].features, real["feats"][42])
        np.testing.assert_array_equal(ds[1].features, real["feats"][7])
    np.testing.assert_allclose(_open(real)[0].boxes, real["boxes42"] / [640, 480, 640, 480])


# --- D12: zero-width features -----------------------------------------------------------------

def test_zero_width_features_are_refused_at_open(real, capsys):
    for image_id in (7, 9, 42):
        np.save(_npy(real, image_id), np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"image 7: features must be a 2-D float array with at "
                                         r"least one region and one column, got float32 \(3, 0\)"):
        _open(real)
    for image_id in (7, 9, 42):
        _replace_tsv_row(real, image_id, _tsv_row(image_id, np.zeros((3, 0))))
    with pytest.raises(ValueError, match=r"feats.tsv: image 42: features must .* \(3, 0\)"):
        _open(real, "tsv")
    err = _train_error(real, capsys)
    assert f"{_npy(real, 7)}: image 7: features must" in err and "(3, 0)" in err


# --- D4: validation features of another width ----------------------------------------------

def _narrow_copy(real):
    """A copy of the .npy features with 5 columns instead of 6."""
    narrow = real["tmp"] / "narrow"
    narrow.mkdir()
    for image_id, feats in real["feats"].items():
        np.save(narrow / _npy(real, image_id).name, feats[:, :5])
    return narrow


def test_validation_features_of_another_width_are_refused(real, capsys):
    narrow = _narrow_copy(real)
    err = _train_error(real, capsys, val_features=narrow)
    assert (f"{narrow}: 5-d region features, but the training features {real['npy']} are 6-d"
            in err)


def test_evaluation_features_of_another_width_than_the_model_are_refused(real, capsys):
    narrow = _narrow_copy(real)
    out = real["tmp"] / "out"
    assert main(["--out", str(out), *TINY, *_data_flags(real)]) == 0
    val = ["--val-introspect", str(real["introspect"]), "--val-vqa-questions",
           str(real["questions"]), "--val-vqa-annotations", str(real["annotations"])]
    capsys.readouterr()
    assert evaluate_main([str(out / "checkpoint.pt"), *val, "--val-features", str(narrow)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"{narrow}: 5-d region features, but the checkpoint's model takes 6-d" in err
    assert evaluate_main([str(out / "checkpoint.pt"), *val, "--val-features",
                          str(real["npy"])]) == 0


# --- D5: _info.npy is never unpickled -------------------------------------------------------

class _CreatesAFile:
    """Unpickling this object opens (creates) ``path``: a stand-in for running a command."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("payload", ["code", "dict"])
def test_pickled_info_file_is_refused_without_running_it(real, capsys, payload):
    marker = real["tmp"] / "payload_ran"
    value = _CreatesAFile(marker) if payload == "code" else {
        "bbox": real["boxes42"], "num_boxes": 4, "image_w": 640, "image_h": 480}
    np.save(_info(real, 42), np.array(value, dtype=object))
    if payload == "code":                        # the payload is real: unpickling runs it
        probe = real["tmp"] / "probe.npy"
        probe.write_bytes(_info(real, 42).read_bytes())
        np.load(probe, allow_pickle=True)
        assert marker.exists()
        marker.unlink()
    message = (f"{_info(real, 42)}: a pickled info file, which sort_fast does not read "
               "(unpickling a file can run code); convert it")
    with pytest.raises(ValueError, match="a pickled info file") as err:
        _open(real)
    assert str(err.value).startswith(message) and "docs/data_formats.md" in str(err.value)
    assert message in _train_error(real, capsys)
    assert not marker.exists()


def test_the_documented_conversion_reads_like_the_old_dict(real, monkeypatch):
    """The converter of docs/data_formats.md, run on a pickled dict of the extraction scripts:
    the same boxes and size, and a file read without pickle."""
    doc = (Path(__file__).parents[1] / "docs" / "data_formats.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", doc, re.S)
                   if "save_region_info" in block)
    np.save(_info(real, 42), np.array({"bbox": real["boxes42"].astype(np.float64),
                                       "num_boxes": 4, "image_w": 640, "image_h": 480},
                                      dtype=object))
    (real["tmp"] / "features").symlink_to(real["npy"])
    monkeypatch.chdir(real["tmp"])
    exec(snippet, {})
    exec(snippet, {})                                             # converted files are kept
    assert np.load(_info(real, 42), allow_pickle=False).dtype.names is not None
    np.testing.assert_allclose(_open(real)[0].boxes, real["boxes42"] / [640, 480, 640, 480])


# --- D6: Introspect keys and repeated JSON keys ---------------------------------------------

def _rename_key(real, old, new):
    data = json.loads(real["introspect"].read_text())
    data[new] = data.pop(old)
    real["introspect"].write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("key", ["0101", "\uff11\uff10\uff11", "\u00b2", "1\u0660", " 101",
                                 "+101", "1e2"])
def test_non_canonical_introspect_key_is_refused(real, key):
    _rename_key(real, "101", key)
    with pytest.raises(ValueError, match="keys must be VQAv2 question ids") as err:
        _open(real)
    assert str(err.value).startswith(f"{real['introspect']}: entry {key!r}: ")


def test_two_spellings_of_one_question_id_are_refused(real, capsys):
    """'0101' next to '101' made both question 101 (their sub-questions mixed)."""
    data = json.loads(real["introspect"].read_text())
    data["0101"] = dict(data["201"], image_id=42)
    real["introspect"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match="entry '0101': keys must be VQAv2 question ids"):
        _open(real)
    assert f"{real['introspect']}: entry '0101': keys must be" in _train_error(real, capsys)


def _repeat_first_key(path):
    """Writes ``path``'s top-level object again with its first key repeated at the end."""
    data = json.loads(path.read_text())
    first = next(iter(data))
    path.write_text(json.dumps(data)[:-1] + f", {json.dumps(first)}: "
                    f"{json.dumps(data[first])}}}")
    return first


@pytest.mark.parametrize("which", ["introspect", "questions", "annotations"])
def test_repeated_json_key_is_refused(real, which):
    first = _repeat_first_key(real[which])
    with pytest.raises(ValueError, match=f"key '{first}' occurs twice in one JSON object") as err:
        _open(real)
    assert str(err.value).startswith(f"{real[which]}: ")


def test_repeated_key_inside_an_entry_is_refused(real, capsys):
    text = real["introspect"].read_text()
    real["introspect"].write_text(text.replace('"image_id": 7,', '"image_id": 42, "image_id": 7,'))
    message = f"{real['introspect']}: key 'image_id' occurs twice in one JSON object"
    with pytest.raises(ValueError, match="key 'image_id' occurs twice"):
        _open(real)
    assert message in _train_error(real, capsys)


# --- D12: empty sub-answers --------------------------------------------------------------------

@pytest.mark.parametrize("answer", ["", "  ", "the", "?"])
def test_empty_sub_answer_is_refused(real, capsys, answer):
    data = json.loads(real["introspect"].read_text())
    data["201"]["introspect"][0]["sub_qa"][0]["sub_answer"] = answer
    real["introspect"].write_text(json.dumps(data))
    message = (f"{real['introspect']}: entry '201': sub-question 'Is it a pizza?' has the "
               f"sub_answer {answer!r}, empty after the VQA answer normalisation")
    with pytest.raises(ValueError, match="empty after the VQA answer normalisation") as err:
        _open(real)
    assert str(err.value) == message
    if answer == "":
        assert message in _train_error(real, capsys)


# --- D12: VQA-HAT PNG headers claiming huge sizes ------------------------------------------

def _png_header(path, width, height):
    """A PNG of only a header (IHDR) claiming ``width x height`` 8-bit grey pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side, message", [
    (40000, "its header claims too many pixels"),          # past Pillow's own bomb limit
    (5000, "its header claims 5000x5000 pixels, more than the 16777216 read"),
])
def test_hat_png_claiming_a_huge_size_is_refused(tmp_path, side, message):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "5_1.png")
    _png_header(tmp_path / "6_1.png", side, side)
    with pytest.raises(ValueError, match=message) as err:
        load_hat_maps(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / '6_1.png'}: ") and "\n" not in str(err.value)
    assert set(load_hat_maps(tmp_path, question_ids={5})) == {5}


def test_hat_bomb_from_the_command_line(real, capsys):
    hat = real["tmp"] / "hat"
    hat.mkdir()
    _png_header(hat / "101_1.png", 40000, 40000)
    err = _train_error(real, capsys, "--hat-dir", str(hat))
    assert f"{hat / '101_1.png'}: its header claims too many pixels" in err
