"""The shifted-prior design of the synthetic benchmark; the balanced design stays as it was."""
from __future__ import annotations

import numpy as np
import pytest

from sort_fast.data import SyntheticIntrospect
from sort_fast.data.synthetic import DESIGNS, SHIFT_PRIORS, TEST_TEMPLATES
from test_data import synthetic_digest

# synthetic_digest of 300 groups of the balanced design, as generated before the shift design
# was added; the shift design's test split is the balanced design's test split, bit for bit
BALANCED_DIGESTS = {
    (0, "train"): "a5285288af545cf87fd527bcd36caaf429174c0e859dc319ee3d7a248ba4a123",
    (0, "val"): "211e10dc1e1d57a2d2bb0fccdd92c805d65936e7e52af9607d7c169e9136ad2c",
    (0, "test"): "0cb8209be2b1ec6f075770d56cba018b869a1c26f9021262070cc114faeaed9d",
    (1, "train"): "ee671b9c48bdb920b8716c94d266fc125f2b2b08f38e0165c6e7a5454585885c",
    (1, "val"): "50bafd7b481ecd64b24b2a93e1f9e459ccf17ce9d64f8a0b706c804a4d725d73",
    (1, "test"): "c68d7c43b361deda21729d884ca257872238e26ae01a49b109550bf233e58d0a",
}
# the shift design's train and val splits of world 0 (frozen with the design's version 2)
SHIFT_DIGESTS = {
    (0, "train"): "b223e75db2f5409d95ffd8f2ed58131fce13cd6d8d049bff16798d6d73851fed",
    (0, "val"): "a03cc655e1d02731ff030b8123a1b55be7b1cba15c944629d790fc1c05c93b64",
}


@pytest.mark.parametrize("seed, split", sorted(BALANCED_DIGESTS))
def test_balanced_worlds_are_unchanged(seed, split):
    ds = SyntheticIntrospect(seed=seed, split=split, num_groups=300, design="balanced")
    assert synthetic_digest(ds) == BALANCED_DIGESTS[seed, split]


@pytest.mark.parametrize("seed", [0, 1])
def test_shift_test_split_is_the_balanced_test_split(seed):
    ds = SyntheticIntrospect(seed=seed, split="test", num_groups=300, design="shift")
    assert synthetic_digest(ds) == BALANCED_DIGESTS[seed, "test"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_shift_train_and_val_are_frozen(split):
    ds = SyntheticIntrospect(seed=0, split=split, num_groups=300, design="shift")
    assert synthetic_digest(ds) == SHIFT_DIGESTS[0, split]


def _yes_rates(ds: SyntheticIntrospect) -> dict:
    return {name: np.mean([g.answers[0] == "yes" for g, t in zip(ds, ds.templates) if t == name])
            for name in sorted(set(ds.templates))}


def test_shift_priors_hold_in_train_and_val_and_vanish_in_test():
    """Train and val answer every template yes at its prior (3000 / 1000 groups: within 0.05),
    test at 0.5; every split exposes the training prior, never its own."""
    assert set(SHIFT_PRIORS) == {"wash", "big_colour", "pair", "all_clean"}
    assert all(abs(p - 0.5) == pytest.approx(0.45) for p in SHIFT_PRIORS.values())
    for split in ("train", "val", "test"):
        ds = SyntheticIntrospect(seed=0, split=split, design="shift")
        assert ds.train_prior == SHIFT_PRIORS
        expected = SHIFT_PRIORS if split != "test" else dict.fromkeys(SHIFT_PRIORS, 0.5)
        rates = _yes_rates(ds)
        assert set(rates) == set(SHIFT_PRIORS)
        for name, rate in rates.items():
            assert abs(rate - expected[name]) < 0.05, (split, name, rate)
    balanced = SyntheticIntrospect(seed=0, split="test", num_groups=10, design="balanced")
    assert balanced.train_prior == dict.fromkeys(SHIFT_PRIORS, 0.5)


def test_shift_design_keeps_vocabularies_and_template_texts():
    shift = SyntheticIntrospect(seed=0, split="train", num_groups=10, design="shift")
    balanced = SyntheticIntrospect(seed=0, split="train", num_groups=10, design="balanced")
    assert shift.vocab == balanced.vocab and shift.answer_vocab == balanced.answer_vocab
    assert [(t.name, t.text, t.weight) for t in DESIGNS["shift"]] == [
        (t.name, t.text, t.weight) for t in TEST_TEMPLATES["shift"]]
    assert TEST_TEMPLATES["shift"] == DESIGNS["balanced"]
