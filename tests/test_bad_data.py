"""Bad input found by the fault campaign: each case must fail loudly, naming the file and id."""
import base64
import hashlib
import json
import random
import re

import numpy as np
import pytest
from PIL import Image
from torch import nn

from sort_fast.data import SyntheticIntrospect, load_hat_maps, save_region_info, tokenize
from sort_fast.heads import BranchSum, mlp_head, pythia_classifier
from test_data import _open, _write_json, real  # noqa: F401  (``real`` is a fixture)


def _edit(path, change):
    """Rewrites the JSON file ``path`` with ``change(data)`` applied in place."""
    data = json.loads(path.read_text())
    change(data)
    _write_json(path, data)


# --- 1. 16-bit VQA-HAT maps ---------------------------------------------------------------

def test_hat_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "1_1.png")
    with Image.open(tmp_path / "1_1.png") as img:
        assert img.mode in ("I;16", "I")                               # "I" in older Pillow
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "2_1.png")
    maps = load_hat_maps(tmp_path)
    assert maps[1].min() < 0.05 and maps[1].max() > 0.95
    assert maps[1].mean() == pytest.approx(0.5, abs=1e-3)
    np.testing.assert_allclose(maps[1], maps[2], atol=2 / 255)      # same map, 8-bit


# --- 2. inconsistent VQA-Introspect / VQAv2 / feature files --------------------------------

def _repeat_question(data):
    data["questions"].append(dict(data["questions"][3]))                     # id 104


def _reuse_question_id(data):
    data["questions"].append({"question_id": 104, "image_id": 7, "question": "Is it hot?"})


def _repeat_annotation(data):
    flipped = json.loads(json.dumps(data["annotations"][0]))                 # id 101
    flipped["multiple_choice_answer"] = "no"
    for a in flipped["answers"]:
        a["answer"] = "no"
    data["annotations"].append(flipped)


def _set_question(qid, **fields):
    def change(data):
        next(q for q in data["questions"] if q["question_id"] == qid).update(fields)
    return change


@pytest.mark.parametrize("which,change,message", [
    ("questions", _repeat_question, "repeats question_id 104"),
    ("questions", _reuse_question_id, "repeats question_id 104"),
    ("annotations", _repeat_annotation, "repeats question_id 101"),
    ("introspect", lambda d: d["101"].update(image_id=True), "'image_id'"),
    ("questions", _set_question(104, image_id=True), "'image_id'"),
    ("questions", _set_question(104, question_id=True), "'question_id'"),
])
def test_inconsistent_json_is_an_error(real, which, change, message):
    _edit(real[which], change)
    with pytest.raises(ValueError, match=message) as err:
        _open(real)
    assert real[which].name in str(err.value)


def test_introspect_and_vqav2_disagreeing_on_the_image_is_an_error(real):
    _edit(real["questions"], _set_question(101, image_id=43))
    with pytest.raises(ValueError, match="question 101 is on image 42 here but on image 43") as err:
        _open(real)
    assert real["introspect"].name in str(err.value) and real["questions"].name in str(err.value)


def test_two_feature_files_for_one_image_are_an_error(real):
    np.save(real["npy"] / f"COCO_train2014_{42:012d}.npy", real["feats"][42])
    with pytest.raises(ValueError, match="image 42 has two feature files"):
        _open(real)


def test_repeated_tsv_row_is_an_error(real):
    first = real["tsv"].read_text().splitlines()[0]
    with open(real["tsv"], "a") as f:
        f.write(first + "\n")
    with pytest.raises(ValueError, match="feats.tsv: line 4 repeats image 42"):
        _open(real, "tsv")


# --- 3. Unicode questions -----------------------------------------------------------------

_OLD_TOKEN = re.compile(r"[a-z0-9]+|'[a-z]+")


def test_ascii_tokens_match_the_old_regex():
    alphabet = "aZz09 _'-?.,!\"\t" + "".join(map(chr, range(32, 127)))
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
             for _ in range(3000)] + ["What's the dog's colour?", "''s 9's a_b O'NEIL"]
    for text in texts:
        assert tokenize(text) == _OLD_TOKEN.findall(text.lower()), text


# sha256 of the vocabulary and the token ids of the first 50 groups per split, computed with
# the ASCII-only tokenizer this one replaced
SYNTHETIC_TOKENS = {
    "train": "df687c24df0601ed5ef64629ca3ad30e6fd878c2f6b3ad98043b24828b07ab1f",
    "val": "ee3dd8f898c977706a59c25c593b9633a916209501c1bcd19fba76341e9099d9",
    "test": "b6e05a6346436d107c755e3b266f97424edd9f0e34b55fb1a1178a20401457d8",
}


@pytest.mark.parametrize("split", sorted(SYNTHETIC_TOKENS))
def test_synthetic_tokens_are_unchanged(split):
    ds = SyntheticIntrospect(seed=0, split=split, num_groups=50)
    digest = hashlib.sha256("\n".join(ds.vocab.tokens).encode())
    for g in ds:
        digest.update(repr(g.question_tokens).encode())
    assert len(ds.vocab) == 44 and digest.hexdigest() == SYNTHETIC_TOKENS[split]


@pytest.mark.parametrize("text,tokens", [
    ("Est-ce un café ?", ["est", "ce", "un", "café"]),
    ("Est-ce un cafe\u0301 ?", ["est", "ce", "un", "café"]),             # NFD -> NFKC
    ("Что это?", ["что", "это"]),
    ("क्या यह पिज़्ज़ा है?", ["क्या", "यह", "पिज़्ज़ा", "है"]),                # combining marks
    ("ＷＨＡＴ’S １２", ["what", "'s", "12"]),                          # full width, ’
    ("STRASSE Straße", ["strasse", "strasse"]),                        # case folding
])
def test_unicode_tokens(text, tokens):
    assert tokenize(text) == tokens


def test_non_latin_sub_question_is_kept(real):
    _edit(real["introspect"], lambda d: d["201"]["introspect"][0]["sub_qa"].append(
        {"sub_question": "Это пицца?", "sub_answer": "нет"}))
    ds = _open(real)
    assert ds[1].num_sub == 2 and ds[1].questions[:3] == [
        "Could he eat this?", "Is it a pizza?", "Это пицца?"]
    assert ds[1].answers[2] == "нет" and "это" in ds.vocab


# --- 4. NaN / inf region features ---------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_npy_features_are_an_error(real, bad):
    feats = real["feats"][7].copy()
    feats[1, 2] = bad
    path = real["npy"] / f"COCO_val2014_{7:012d}.npy"
    np.save(path, feats)
    with pytest.raises(ValueError, match=f"{path.name}: image 7 has 1 NaN/inf feature"):
        _open(real)[1]


def test_non_finite_npy_boxes_are_an_error(real):
    info = real["npy"] / f"COCO_val2014_{42:012d}_info.npy"
    boxes = real["boxes42"].copy()
    boxes[0, 0] = np.nan
    save_region_info(info, boxes, 640, 480)
    with pytest.raises(ValueError, match=f"{info.name}: image 42 has 1 NaN/inf box"):
        _open(real)


def _tsv_row(image_id, feats, size="100"):
    boxes = np.tile(np.array([0, 0, 100, 50], dtype=np.float32), (len(feats), 1))
    return "\t".join([str(image_id), size, "50", str(len(feats)),
                      base64.b64encode(boxes.tobytes()).decode(),
                      base64.b64encode(feats.astype(np.float32).tobytes()).decode()])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tsv_features_are_an_error(real, bad):
    feats = real["feats"][42].copy()
    feats[0, 0] = bad
    lines = real["tsv"].read_text().splitlines()
    real["tsv"].write_text("\n".join([_tsv_row(42, feats)] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="feats.tsv: image 42 has 1 NaN/inf feature"):
        _open(real, "tsv")[0]


@pytest.mark.parametrize("size", ["nan", "inf"])
def test_non_finite_tsv_image_size_is_an_error(real, size):
    lines = real["tsv"].read_text().splitlines()
    real["tsv"].write_text("\n".join([_tsv_row(42, real["feats"][42], size)] + lines[1:]) + "\n")
    with pytest.raises(ValueError,
                       match="feats.tsv: image 42: image size must be positive and finite"):
        _open(real, "tsv")[0]


# --- 6. error types -----------------------------------------------------------------------

def test_branch_sum_branches_must_agree_on_the_output_size():
    with pytest.raises(ValueError, match="branch 0: 5, branch 1: 6"):
        BranchSum(nn.Linear(4, 5), mlp_head(4, 3, 6))
    BranchSum(nn.Linear(4, 5), mlp_head(4, 3, 5), nn.ReLU())          # size of ReLU unknown
    assert len(pythia_classifier(8, 4, 4, 5).branches) == 2


def test_runtime_file_problems_name_the_file_before_training(real, tmp_path):
    """A feature file of another width, a non-integer num_boxes and deeply nested JSON are
    one-line errors naming the file, raised when the data set is opened, before training."""
    np.save(real["npy"] / f"COCO_val2014_{42:012d}.npy", np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"COCO_val2014_000000000042\.npy: image 42 has 5-d"):
        _open(real)
    np.save(real["npy"] / f"COCO_val2014_{42:012d}.npy", real["feats"][42])
    info = real["npy"] / f"COCO_val2014_{42:012d}_info.npy"
    fields = [("bbox", "<f4", (4, 4)), ("num_boxes", "<f8"), ("image_width", "<f8"),
              ("image_height", "<f8")]
    np.save(info, np.array((real["boxes42"], 3.5, 640, 480), dtype=fields))
    with pytest.raises(ValueError, match=r"_info\.npy: num_boxes must be an integer, got float64"):
        _open(real)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: cannot read JSON \(nested too deeply\)"):
        _open(dict(real, introspect=deep))
