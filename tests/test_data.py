import base64
import hashlib
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from sort_fast.data import (
    Group,
    IntrospectDataset,
    SyntheticIntrospect,
    Vocab,
    collate_groups,
    load_hat_maps,
    load_word_vectors,
    normalize_answer,
    regions_to_map,
    save_region_info,
    tokenize,
    vqa_accuracy,
    vqa_soft_scores,
)
from sort_fast.data.synthetic import COLOURS, TYPES
from sort_fast.layout import row_roles


@pytest.fixture(scope="module")
def synth():
    return (SyntheticIntrospect(seed=0, split="train", num_groups=600),
            SyntheticIntrospect(seed=0, split="val", num_groups=300))


# --- text ----------------------------------------------------------------------------------

def test_answer_normalisation_and_vqa_accuracy():
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("the Yes.") == "yes"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("1,000") == "1000"
    assert tokenize("What's the dog's colour?") == ["what", "'s", "the", "dog", "'s", "colour"]
    humans = ["yes"] * 3 + ["no"] * 7
    # (1/10) sum_i min(1, #{j != i: gt_j = a} / 3)
    assert vqa_accuracy("yes", humans) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("no", humans) == 1.0
    assert vqa_accuracy("maybe", humans) == 0.0
    assert vqa_soft_scores(["Two"] * 10) == {"2": 1.0}


def test_vocab_roundtrip_and_word_vectors(tmp_path):
    vocab = Vocab.build_questions(["is the dog red?", "is the cat red?"])
    assert vocab.tokens[:2] == ["<pad>", "<unk>"]
    assert vocab.encode("is the zebra red") == [vocab.get("is"), vocab.get("the"), 1,
                                                vocab.get("red")]
    vocab.save(tmp_path / "v.txt")
    assert Vocab.load(tmp_path / "v.txt") == vocab
    with pytest.raises(ValueError, match="twice"):
        Vocab(["a", "a"])
    with pytest.raises(ValueError, match="nope.txt"):
        Vocab.load(tmp_path / "nope.txt")
    glove = tmp_path / "glove.txt"
    glove.write_text("dog 1 2 3\nzebra 4 5 6\nred 0.5 0.5 0.5\n")
    w = load_word_vectors(glove, vocab, 3)
    assert w.shape == (len(vocab), 3)
    torch.testing.assert_close(w[vocab.get("dog")], torch.tensor([1.0, 2.0, 3.0]))
    assert bool((w[0] == 0).all())                                   # <pad>
    assert w[vocab.get("cat")].abs().sum() > 0                        # random init
    glove.write_text("dog 1 2\n")
    with pytest.raises(ValueError, match="glove.txt: line 1"):
        load_word_vectors(glove, vocab, 3)


# --- synthetic benchmark ------------------------------------------------------------------

def test_synthetic_is_deterministic():
    a = SyntheticIntrospect(seed=5, num_groups=40)
    b = SyntheticIntrospect(seed=5, num_groups=40)
    c = SyntheticIntrospect(seed=6, num_groups=40)
    assert [g.questions for g in a] == [g.questions for g in b]
    assert all(np.array_equal(x.features, y.features) for x, y in zip(a, b))
    assert [g.targets for g in a] == [g.targets for g in b]
    assert [g.questions for g in a] != [g.questions for g in c]
    assert not np.array_equal(a[0].features, c[0].features)


# sha256 over everything the generator produces (vocabulary, templates, questions, answers,
# soft targets, features, boxes, grounding) for 300 groups of each split of worlds 0 and 1: new
# designs must leave the existing worlds exactly as they are
WORLD_DIGESTS = {
    (0, "train"): "ea76173c9caf18bebaf8dedd46eef993fc21eca29af2d63e8be9705453b4945d",
    (0, "val"): "2b08579fdc282c13d3ab161be666ef77fbcb0f2a5ebebc073c3770dd85a01768",
    (0, "test"): "68860c6141b7ef27e3094e6bceff03826b183d3c77d1d40800cb4863ca735aec",
    (1, "train"): "eb205e5c9e244f4ce1b0de8816439a3edb965ab9dba19ae43cbe5681220a037a",
    (1, "val"): "b54ac034f1e6bc6441b6b4a41556ad59a7e86579264aa13a656ccd396ddf3426",
    (1, "test"): "c51d2e296870d4e8a0c95b49759764969f446e42588490df793a729045781e33",
}


def synthetic_digest(ds) -> str:
    h = hashlib.sha256("\n".join(ds.vocab.tokens).encode())
    for g, template in zip(ds, ds.templates):
        targets = sorted((k, round(v, 12)) for t in g.targets for k, v in t.items())
        h.update(repr((template, g.image_id, g.question_ids, g.questions, g.answers, g.num_sub,
                       targets)).encode())
        h.update(np.ascontiguousarray(g.features).tobytes())
        h.update(np.ascontiguousarray(g.boxes).tobytes())
        if g.grounding is not None:
            h.update(g.grounding.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("seed, split", sorted(WORLD_DIGESTS))
def test_existing_worlds_are_unchanged(seed, split):
    ds = SyntheticIntrospect(seed=seed, split=split, num_groups=300)
    assert synthetic_digest(ds) == WORLD_DIGESTS[seed, split]


def test_synthetic_statistics(synth):
    train, val = synth
    for ds in synth:
        sub = np.array([g.num_sub for g in ds])
        irr = np.array([g.num_irrelevant for g in ds])
        assert 2.3 <= sub.mean() <= 2.9 and sub.min() >= 1
        assert 6 <= irr.mean() <= 8 and irr.min() >= 6 and irr.max() <= 8
        assert all(g.features.shape == (g.boxes.shape[0], 64) for g in ds)
        assert np.mean([g.grounding is not None for g in ds]) > 0.9
        for g in ds:
            if g.grounding is not None:
                assert g.grounding.sum() == pytest.approx(1.0) and (g.grounding >= 0).all()
            for target, answer in zip(g.targets, g.answers):
                assert ds.answer_vocab.tokens[max(target, key=target.get)] == answer
                assert target[ds.answer_vocab.get(answer)] == 1.0
    assert {g.image_id for g in train}.isdisjoint({g.image_id for g in val})
    assert len({g.image_id for g in train}) < len(train)         # images carry several groups


def test_synthetic_test_split_is_held_out(synth):
    train, val = synth
    test = SyntheticIntrospect(seed=0, split="test", num_groups=300)
    assert test.vocab == train.vocab and test.answer_vocab == train.answer_vocab
    images = {g.image_id for g in test}
    assert images.isdisjoint({g.image_id for g in train} | {g.image_id for g in val})
    assert [g.questions for g in test] != [g.questions for g in val]
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        SyntheticIntrospect(split="dev")


def test_synthetic_questions_follow_their_facts(synth):
    """Sub-question answers imply the reasoning answer for the fully determined templates."""
    train = synth[0]
    checked = 0
    for g, name in zip(train, train.templates):
        subs = dict(zip(g.questions[1: 1 + g.num_sub], g.answers[1: 1 + g.num_sub]))
        if name == "match":
            colours = [a for q, a in subs.items() if q.startswith("what colour")]
            assert g.answers[0] == ("yes" if colours[0] == colours[1] else "no")
            checked += 1
        elif name == "wash":
            dirty = [a for q, a in subs.items() if q.endswith("dirty?")]
            clean = [a for q, a in subs.items() if q.endswith("clean?")]
            assert g.answers[0] == (dirty[0] if dirty else ("no" if clean[0] == "yes" else "yes"))
            checked += 1
        irrelevant = set(g.questions[1 + g.num_sub:])
        assert irrelevant.isdisjoint(subs)
    assert checked > 100


def test_synthetic_has_a_language_shortcut(synth):
    """A rule reading only the question wording (objects and colours masked) answers most
    reasoning questions of the prior-carrying templates and beats chance overall."""
    train, val = synth

    def wording(q):
        return tuple("_" if w in TYPES or w in COLOURS else w for w in tokenize(q))

    majority = defaultdict(Counter)
    for g in train:
        majority[wording(g.questions[0])][g.answers[0]] += 1
    hits = defaultdict(list)
    for g, name in zip(val, val.templates):
        hits[name].append(majority[wording(g.questions[0])].most_common(1)[0][0] == g.answers[0])
    for name in ("wash", "all_clean", "big_colour"):
        assert np.mean(hits[name]) > 0.7
    assert np.mean([h for v in hits.values() for h in v]) > 0.6


def test_balanced_design_has_no_wording_shortcut():
    """The balanced design: every template's answers split evenly and the wording rule of the
    Table 1 protocol stays near chance on every template (it is far above on v1)."""
    from sort_fast.experiments.table1 import build_parser, wording_rule

    train = SyntheticIntrospect(seed=0, split="train", design="balanced")
    assert set(train.templates) == {"wash", "big_colour", "pair", "all_clean"}
    for name in set(train.templates):
        yes = [g.answers[0] == "yes" for g, t in zip(train, train.templates) if t == name]
        assert abs(np.mean(yes) - 0.5) < 0.05, name
    for design, bound in (("balanced", 0.6), ("v1", None)):
        rule = wording_rule(build_parser().parse_args(
            ["--synthetic-design", design, "--synthetic-test-groups", "1000"]))
        if bound is None:
            assert rule["wash"] > 0.8 and rule["all_clean"] > 0.8
        else:
            assert max(rule.values()) < bound, rule
    with pytest.raises(ValueError, match="design must be one of"):
        SyntheticIntrospect(design="v2")


# --- collate --------------------------------------------------------------------------------

def test_collate_round_trip(synth):
    groups = list(synth[1][:20])
    batch = collate_groups(groups)
    sizes = [len(g.questions) for g in groups]
    assert batch.offsets.tolist() == np.concatenate([[0], np.cumsum(sizes)]).tolist()
    assert batch.num_sub.tolist() == [g.num_sub for g in groups]
    assert batch.image_ids == list(dict.fromkeys(g.image_id for g in groups))
    assert batch.image_features.shape[0] == len(batch.image_ids) < len(groups)
    assert batch.num_questions == sum(sizes) == len(batch.question_ids)
    for n, g in enumerate(groups):
        rows = slice(int(batch.offsets[n]), int(batch.offsets[n + 1]))
        img = batch.image_index[rows]
        assert bool((img == batch.image_ids.index(g.image_id)).all())
        r = g.features.shape[0]
        np.testing.assert_array_equal(batch.image_features[img[0], :r].numpy(), g.features)
        assert batch.image_mask[img[0]].sum() == r
        assert batch.question_lengths[rows].tolist() == [len(t) for t in g.question_tokens]
        assert batch.question_tokens[rows][0, : len(g.question_tokens[0])].tolist() == \
            g.question_tokens[0]
        assert [synth[1].answer_vocab.tokens[c] for c in batch.classes[rows]] == g.answers
        known = g.grounding is not None
        assert bool(batch.has_grounding[n]) == known
        np.testing.assert_allclose(batch.grounding[n, :r].numpy(),
                                   g.grounding if known else np.zeros(r))
    roles = row_roles(batch.offsets, batch.num_sub, batch.offsets.diff())
    assert (roles == 0).sum() == len(groups)
    moved = batch.to("cpu")
    assert moved.image_ids == batch.image_ids and torch.equal(moved.targets, batch.targets)


def test_collate_rejects_bad_input(synth):
    with pytest.raises(ValueError, match="at least one"):
        collate_groups([])
    g = synth[1][0]
    with pytest.raises(ValueError, match="num_sub"):
        Group(**{**g.__dict__, "num_sub": 0})
    with pytest.raises(ValueError, match="answers"):
        Group(**{**g.__dict__, "answers": g.answers[:-1]})
    other = Group(**{**g.__dict__, "num_answers": 3})
    with pytest.raises(ValueError, match="answers"):
        collate_groups([g, other])


# --- real formats -------------------------------------------------------------------------

def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture()
def real(tmp_path):
    """Tiny VQA-Introspect / VQAv2 / feature fixtures in the real formats."""
    intro = {
        "101": {"reasoning_question": "Is it safe to cross?", "reasoning_answer_most_common": "yes",
                "image_id": 42, "introspect": [
                    {"sub_qa": [{"sub_question": "Is the light green?", "sub_answer": "yea"}],
                     "pred_q_type": "perception"},
                    {"sub_qa": [{"sub_question": "Is the light green?", "sub_answer": "yes"},
                                {"sub_question": "Are there cars?", "sub_answer": "No"}],
                     "pred_q_type": "reasoning"},
                    {"sub_qa": [{"sub_question": "Is it raining?", "sub_answer": "no"}],
                     "pred_q_type": "invalid"}]},
        "102": {"reasoning_question": "Is the man happy?", "reasoning_answer_most_common": "yes",
                "image_id": 42, "introspect": [{"sub_qa": [], "pred_q_type": "perception"}]},
        "201": {"reasoning_question": "Could he eat this?", "reasoning_answer_most_common": "no",
                "image_id": 7, "introspect": [
                    {"sub_qa": [{"sub_question": "Is it a pizza?", "sub_answer": "no"}],
                     "pred_q_type": "perception"}]},
        "301": {"reasoning_question": "Is it late?", "image_id": 9, "introspect": []},
    }
    qs = [(101, 42, "Is it safe to cross?"), (102, 42, "Is the man happy?"),
          (103, 42, "Is the light green ?"), (104, 42, "How many people are there?"),
          (105, 42, "What color is the bus?"), (201, 7, "Could he eat this?"),
          (202, 7, "What is on the table?"), (301, 9, "Is it late?")]
    answers = {101: ["yes"] * 8 + ["no"] * 2, 102: ["yes"] * 10, 103: ["yes"] * 10,
               104: ["two"] * 6 + ["3"] * 4, 105: ["red"] * 9 + ["Red."],
               201: ["no"] * 10, 202: ["a pizza"] * 5 + ["food"] * 5, 301: ["no"] * 10}
    questions = {"questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t in qs]}
    annotations = {"annotations": [
        {"question_id": q, "image_id": i, "question_type": "is", "answer_type": "other",
         "multiple_choice_answer": Counter(answers[q]).most_common(1)[0][0],
         "answers": [{"answer_id": k + 1, "answer": a, "answer_confidence": "yes"}
                     for k, a in enumerate(answers[q])]} for q, i, _ in qs]}
    rng = np.random.default_rng(0)
    feats = {i: rng.standard_normal((n, 6)).astype(np.float32) for i, n in ((42, 4), (7, 3),
                                                                           (9, 2))}
    npy = tmp_path / "npy"
    npy.mkdir()
    for i, f in feats.items():
        np.save(npy / f"COCO_val2014_{i:012d}.npy", f)
    boxes42 = np.array([[0, 0, 320, 240], [320, 240, 640, 480], [0, 0, 640, 480],
                        [10, 10, 20, 20]], dtype=np.float32)
    save_region_info(npy / f"COCO_val2014_{42:012d}_info.npy", boxes42, 640, 480)
    tsv = tmp_path / "feats.tsv"
    with open(tsv, "w") as fh:
        for i, f in feats.items():
            b = np.tile(np.array([0, 0, 100, 50], dtype=np.float32), (len(f), 1))
            fh.write("\t".join([str(i), "100", "50", str(len(f)),
                                base64.b64encode(b.tobytes()).decode(),
                                base64.b64encode(f.tobytes()).decode()]) + "\n")
    return dict(introspect=_write_json(tmp_path / "VQAIntrospect_valv1.0.json", intro),
                questions=_write_json(tmp_path / "q.json", questions),
                annotations=_write_json(tmp_path / "a.json", annotations),
                npy=npy, tsv=tsv, feats=feats, boxes42=boxes42, tmp=tmp_path)


def _open(real, features="npy", **kw):
    return IntrospectDataset(real["introspect"], real["questions"], real["annotations"],
                             real[features], **kw)


def test_introspect_groups(real):
    ds = _open(real)
    assert len(ds) == 2                 # 102: empty sub_qa, 301: empty introspect -> no group
    g = ds[0]
    assert g.image_id == 42 and g.num_sub == 2
    assert g.questions[:3] == ["Is it safe to cross?", "Is the light green?", "Are there cars?"]
    assert g.answers[:3] == ["yes", "yes", "no"]                       # 'yea' -> 'yes'
    assert "Is it raining?" not in g.questions                         # invalid entry skipped
    # irrelevant: the image's other questions minus reasoning and sub-questions (by text)
    assert g.questions[3:] == ["Is the man happy?", "How many people are there?",
                               "What color is the bus?"]
    assert g.question_ids == ["101", "101_sub0", "101_sub1", "102", "104", "105"]
    av = ds.answer_vocab
    assert g.answers[4] == "2"                                         # 'two' -> '2'
    assert g.targets[4] == {av.get("2"): 1.0, av.get("3"): 1.0}
    assert g.targets[0][av.get("no")] == pytest.approx(0.6)
    assert g.targets[1] == {av.get("yes"): 1.0}
    assert g.targets[5] == {av.get("red"): 1.0}                        # 'Red.' normalised
    np.testing.assert_array_equal(g.features, real["feats"][42])
    np.testing.assert_allclose(g.boxes, real["boxes42"] / [640, 480, 640, 480])
    assert ds[1].boxes.sum() == 0                                      # no _info.npy
    assert ds[1].questions == ["Could he eat this?", "Is it a pizza?", "What is on the table?"]
    batch = collate_groups([ds[0], ds[1]])
    assert batch.offsets.tolist() == [0, 6, 9] and batch.num_sub.tolist() == [2, 1]
    assert not batch.has_grounding.any()


def test_introspect_tsv_and_vocab_file(real):
    vocab_file = real["tmp"] / "answers.txt"
    Vocab(["yes", "no", "2"]).save(vocab_file)
    ds = _open(real, "tsv", answer_vocab=vocab_file)
    npy = _open(real)
    for a, b in zip(ds, npy):
        np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_allclose(ds[0].boxes, np.tile([0, 0, 1, 1], (4, 1)))
    assert ds.num_answers == 3
    assert ds[0].targets[5] == {}                                      # 'red' not in the file


@pytest.mark.parametrize("which,content,message", [
    ("introspect", None, "cannot read JSON"),
    ("introspect", '{"101": {"reasoning_question": ', "cannot read JSON"),
    ("introspect", '{"101": {"reasoning_question": "q", "image_id": "x", "introspect": []}}',
     "image_id"),
    ("introspect", '[1, 2]', "keyed by question id"),
    ("questions", '{"questions": [{"question_id": 1}]}', "image_id"),
    ("questions", '{"qs": []}', "questions"),
    ("annotations", '{"annotations": [{"question_id": 101, "answers": [3]}]}', "answer"),
    ("annotations", "", "cannot read JSON"),
])
def test_introspect_malformed_json(real, which, content, message):
    path = real[which]
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        _open(real)
    assert path.name in str(err.value)


def test_malformed_features(real):
    missing = real["npy"] / f"COCO_val2014_{7:012d}.npy"
    missing.unlink()
    with pytest.raises(ValueError, match="npy: no region features"):
        _open(real)
    missing.write_bytes(b"\x93NUMPY truncated")
    with pytest.raises(ValueError, match=missing.name):  # found when the data set is opened
        _open(real)
    np.save(missing, real["feats"][7])
    info = real["npy"] / f"COCO_val2014_{42:012d}_info.npy"
    np.save(info, np.zeros((), [("bbox", "<f4", (4, 4)), ("num_boxes", "<i8")]))
    with pytest.raises(ValueError, match="missing image_width, image_height"):
        _open(real)
    lines = real["tsv"].read_text().splitlines()
    real["tsv"].write_text("\n".join([lines[0][:-8]] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="feats.tsv"):
        _open(real, "tsv")
    real["tsv"].write_text("42\t1\t2\n")
    with pytest.raises(ValueError, match="feats.tsv: line 1"):
        _open(real, "tsv")
    with pytest.raises(ValueError, match="does not exist"):
        IntrospectDataset(real["introspect"], real["questions"], real["annotations"],
                          real["tmp"] / "nowhere")


# --- VQA-HAT ------------------------------------------------------------------------------

def test_hat_maps(tmp_path):
    left = np.zeros((28, 42), dtype=np.uint8)
    left[:, :21] = 255
    Image.fromarray(left).save(tmp_path / "5_1.png")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "5_2.png")
    Image.fromarray(np.full((7, 7), 255, dtype=np.uint8)).save(tmp_path / "6_1.png")
    (tmp_path / "notes.txt").write_text("ignored")
    maps = load_hat_maps(tmp_path)
    assert set(maps) == {5, 6} and maps[5].shape == (14, 14)
    assert maps[5][:, :6] == pytest.approx(0.5) and maps[5][:, 8:] == pytest.approx(0.0)
    assert maps[6] == pytest.approx(1.0)
    assert set(load_hat_maps(tmp_path, question_ids={6})) == {6}
    (tmp_path / "7_1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="7_1.png"):
        load_hat_maps(tmp_path)
    grid = regions_to_map(np.array([1.0, 2.0]), np.array([[0, 0, 0.5, 0.5], [0, 0, 1, 1]]))
    assert grid[0, 0] == 3.0 and grid[13, 13] == 2.0
