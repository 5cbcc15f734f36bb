"""The embedded VQA-Introspect-like benchmark (design in docs/synthetic_benchmark.md).

Images are sets of region feature vectors of objects (type, colour, size, cleanliness) plus
background regions. Perception questions ask about one fact; reasoning questions combine one to
three facts (their sub-questions); other perception questions on the image are irrelevant.
In the original design (``"v1"``) three reasoning templates carry a strong answer prior (the
language shortcut); the ``"balanced"`` design gives every template an even answer prior and
keeps only the templates a plain model learns to answer from the image; the ``"shift"`` design
keeps those templates with a strong prior on each in train and val and an even one in test.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .group import Group
from .text import Vocab, vqa_soft_scores

__all__ = ["SyntheticIntrospect", "TYPES", "COLOURS", "SIZES", "STATES", "ANSWERS", "TEMPLATES",
           "DESIGNS", "TEST_TEMPLATES", "SHIFT_PRIORS"]

TYPES = ("dog", "cat", "horse", "car", "bus", "bike", "cup", "chair", "lamp", "box")
COLOURS = ("red", "blue", "green", "yellow", "white", "black")
SIZES = ("small", "big")
STATES = ("clean", "dirty")
ANSWERS = ("yes", "no", *COLOURS, *SIZES)

NUM_HUMANS = 10
HUMAN_ERROR = 0.1        # chance that one simulated human answers wrongly (at most 3 per question)
ALT_PHRASING = 0.25      # chance that a sub-question fact is also asked in its other phrasing
IRRELEVANT_RANGE = (6, 8)
GROUPS_PER_IMAGE = (1, 2)
EXTRA_OBJECTS = (1, 3)   # distractor objects beyond those the reasoning questions need
MIN_OBJECTS = 3
EXTRA_ABSENT = (1, 2)    # absent object types asked about ("is there a ...?" -> no)
BACKGROUND_RANGE = (2, 6)
AMPLITUDE = (0.5, 1.5)   # visibility of one attribute in a region's feature vector
NUM_BACKGROUND_PROTOTYPES = 4
DEFAULT_GROUPS = {"train": 3000, "val": 1000, "test": 1000}
# per split: the random stream and the first image id (the splits share no image)
SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}
SPLIT_IMAGE_ID_START = {"train": 0, "val": 1_000_000, "test": 2_000_000}

Fact = Tuple[str, str]   # (attribute, object type): ("colour", "dog"), ("present", "cup"), ...
Objects = Dict[str, Dict[str, str]]   # present object type -> {"colour", "size", "state"}


@dataclass(frozen=True)
class Template:
    """A reasoning question: wording, how many objects it needs, the facts it rests on
    (``(attribute, object slot)``), its answer prior ``p_yes``, its share ``weight`` of the
    reasoning questions and ``make(rng, types, yes) -> (objects, absent types, text slots)``
    that draws attributes giving the wanted answer."""

    name: str
    text: str
    num_objects: int
    facts: Tuple[Tuple[str, int], ...]
    p_yes: float
    weight: float
    make: Callable[[np.random.Generator, List[str], bool],
                   Tuple[Objects, List[str], Dict[str, str]]]


def _pick(rng: np.random.Generator, values: Sequence[str]) -> str:
    """One element of ``values`` chosen uniformly (``rng.choice`` is slow on small tuples)."""
    return values[int(rng.integers(len(values)))]

def _alternatives(answer: str) -> Tuple[str, ...]:
    """The other values of an answer's or attribute value's kind."""
    for values in (("yes", "no"), COLOURS, SIZES, STATES):
        if answer in values:
            return tuple(v for v in values if v != answer)
    raise AssertionError(answer)


def _random_object(rng: np.random.Generator, **fixed: str) -> Dict[str, str]:
    obj = {"colour": _pick(rng, COLOURS), "size": _pick(rng, SIZES), "state": _pick(rng, STATES)}
    obj.update(fixed)
    return obj


def _values_not_all_equal(rng: np.random.Generator, values: Sequence[str], n: int) -> List[str]:
    while True:
        out = [_pick(rng, values) for _ in range(n)]
        if len(set(out)) > 1:
            return out


def _make_wash(rng, types, yes):
    return {types[0]: _random_object(rng, state="dirty" if yes else "clean")}, [], {}


def _make_match(rng, types, yes):
    colours = [_pick(rng, COLOURS)] * 2 if yes else _values_not_all_equal(rng, COLOURS, 2)
    return {t: _random_object(rng, colour=c) for t, c in zip(types, colours)}, [], {}


def _make_big_colour(rng, types, yes):
    colour = _pick(rng, COLOURS)
    big, right_colour = (True, True) if yes else [(False, True), (True, False), (False, False)][
        int(rng.integers(3))]
    actual = colour if right_colour else _pick(rng, _alternatives(colour))
    obj = _random_object(rng, colour=actual, size="big" if big else "small")
    return {types[0]: obj}, [], {"c": colour}


def _make_pair(rng, types, yes):
    present = [True, True] if yes else [[False, True], [True, False], [False, False]][
        int(rng.integers(3))]
    objects = {t: _random_object(rng) for t, p in zip(types, present) if p}
    return objects, [t for t, p in zip(types, present) if not p], {}


def _make_all_clean(rng, types, yes):
    states = ["clean"] * 3 if yes else _values_not_all_equal(rng, STATES, 3) \
        if rng.random() < 0.75 else ["dirty"] * 3
    return {t: _random_object(rng, state=s) for t, s in zip(types, states)}, [], {}


def _make_same_colour(rng, types, yes):
    colours = [_pick(rng, COLOURS)] * 3 if yes else _values_not_all_equal(rng, COLOURS, 3)
    return {t: _random_object(rng, colour=c) for t, c in zip(types, colours)}, [], {}


TEMPLATES: Tuple[Template, ...] = (
    Template("wash", "does the {t1} need a wash?", 1, (("state", 0),), 0.85, 0.20, _make_wash),
    Template("match", "do the {t1} and the {t2} have the same colour?", 2,
             (("colour", 0), ("colour", 1)), 0.5, 0.20, _make_match),
    Template("big_colour", "is the {t1} a big {c} thing?", 1, (("size", 0), ("colour", 0)), 0.2,
             0.15, _make_big_colour),
    Template("pair", "are there both a {t1} and a {t2}?", 2, (("present", 0), ("present", 1)),
             0.5, 0.15, _make_pair),
    Template("all_clean", "are the {t1}, the {t2} and the {t3} all clean?", 3,
             (("state", 0), ("state", 1), ("state", 2)), 0.15, 0.15, _make_all_clean),
    Template("same_colour", "do the {t1}, the {t2} and the {t3} share a colour?", 3,
             (("colour", 0), ("colour", 1), ("colour", 2)), 0.5, 0.15, _make_same_colour),
)

# The balanced design (docs/synthetic_benchmark.md): every answer prior 0.5, so the wording of a
# reasoning question says nothing about its answer. The colour comparisons (match, same_colour)
# are dropped: plain models of this family stay at chance on them even with two attention
# glimpses and 60 epochs, while they perceive the single colours.
BALANCED_TEMPLATES: Tuple[Template, ...] = tuple(
    replace(t, p_yes=0.5) for t in TEMPLATES if t.name not in ("match", "same_colour"))
# The shifted-prior design (docs/synthetic_benchmark.md, version 2): the balanced design's
# templates, each with a strong answer prior in train and val (two leaning yes, two no), and the
# balanced design itself in test, so that about half the test answers go against the prior.
SHIFT_PRIORS: Dict[str, float] = {"wash": 0.95, "big_colour": 0.05, "pair": 0.95,
                                  "all_clean": 0.05}
SHIFT_TEMPLATES: Tuple[Template, ...] = tuple(
    replace(t, p_yes=SHIFT_PRIORS[t.name]) for t in BALANCED_TEMPLATES)
# design name -> the reasoning templates of its train and val splits; "v1" is the original
# benchmark, unchanged
DESIGNS: Dict[str, Tuple[Template, ...]] = {"v1": TEMPLATES, "balanced": BALANCED_TEMPLATES,
                                            "shift": SHIFT_TEMPLATES}
# design name -> the templates of its test split, for the designs whose test split differs
TEST_TEMPLATES: Dict[str, Tuple[Template, ...]] = {"shift": BALANCED_TEMPLATES}


def _phrasings(rng: np.random.Generator, fact: Fact, objects: Objects) -> List[Tuple[str, str]]:
    """The two ways of asking about a fact, ``[(question, answer), (question, answer)]``."""
    attr, t = fact
    yes_no = ("no", "yes")
    if attr == "present":
        a = yes_no[t in objects]
        return [(f"is there a {t}?", a), (f"can you see a {t}?", a)]
    value = objects[t][attr]
    if attr == "colour":
        asked = value if rng.random() < 0.5 else _pick(rng, _alternatives(value))
        return [(f"what colour is the {t}?", value),
                (f"is the {t} {asked}?", yes_no[asked == value])]
    if attr == "size":
        asked = _pick(rng, SIZES)
        return [(f"what size is the {t}?", value), (f"is the {t} {asked}?", yes_no[asked == value])]
    first = _pick(rng, STATES)
    return [(f"is the {t} {s}?", yes_no[s == value]) for s in (first, _alternatives(first)[0])]




@lru_cache(maxsize=None)
def _soft_scores(human_answers: Tuple[str, ...]) -> Dict[str, float]:
    return vqa_soft_scores(human_answers)


class SyntheticIntrospect(Sequence[Group]):
    """Deterministic synthetic VQA-Introspect-like groups (a ``Sequence`` of :class:`Group`).

    ``split="train"``, ``"val"`` and ``"test"`` draw disjoint images (val image ids start at
    1,000,000, test at 2,000,000) from the same world (prototype vectors fixed by ``seed``);
    ``test`` is a held-out split for reporting results tuned on ``val``. ``num_groups``
    defaults to 3000 (train) / 1000 (val, test). Region features are ``[R, feature_dim]`` with
    ``R`` in 6..17; ``noise`` is the per-dimension standard deviation of the Gaussian noise
    added to every region.
    ``design`` picks the reasoning templates (:data:`DESIGNS`: ``"v1"``, the original,
    ``"balanced"`` or ``"shift"``, whose test split takes :data:`TEST_TEMPLATES`).
    Attributes: ``vocab`` (questions), ``answer_vocab``, ``templates`` (template name per group),
    ``train_prior`` (``{template: P(yes)}`` of the design's training split, whatever ``split``:
    the answer prior a model trained on the design learns, read from the design, not the labels).
    """

    def __init__(self, seed: int = 0, split: str = "train", num_groups: Optional[int] = None,
                 *, feature_dim: int = 64, noise: float = 0.3, design: str = "v1") -> None:
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {sorted(DESIGNS)}, got {design!r}")
        if split not in DEFAULT_GROUPS:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        num_groups = DEFAULT_GROUPS[split] if num_groups is None else num_groups
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if feature_dim < 8:
            raise ValueError(f"feature_dim must be >= 8, got {feature_dim}")
        self.split, self.seed, self.noise, self.design = split, seed, noise, design
        self._templates = (TEST_TEMPLATES.get(design, DESIGNS[design]) if split == "test"
                           else DESIGNS[design])
        self.train_prior = {t.name: t.p_yes for t in DESIGNS[design]}
        self.vocab = Vocab.build_questions(
            [re.sub(r"\{\w+\}", "", t.text) for t in self._templates]
            + ["what colour size is there a can you see the", *TYPES, *COLOURS, *SIZES, *STATES])
        self.answer_vocab = Vocab(ANSWERS)
        world = np.random.default_rng([seed, 0])
        self._prototypes = {
            name: self._unit(world.standard_normal((len(values), feature_dim)))
            for name, values in (("type", TYPES), ("colour", COLOURS), ("size", SIZES),
                                 ("state", STATES))
        }
        self._background = self._unit(world.standard_normal((NUM_BACKGROUND_PROTOTYPES,
                                                               feature_dim)))
        rng = np.random.default_rng([seed, SPLIT_STREAM[split]])
        self.groups: List[Group] = []
        self.templates: List[str] = []
        image_id = SPLIT_IMAGE_ID_START[split]
        while len(self.groups) < num_groups:
            n = int(rng.integers(GROUPS_PER_IMAGE[0], GROUPS_PER_IMAGE[1] + 1))
            self._image(rng, image_id, min(n, num_groups - len(self.groups)))
            image_id += 1

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def _image(self, rng: np.random.Generator, image_id: int, num_groups: int) -> None:
        """Draws one image with ``num_groups`` reasoning questions and appends their groups."""
        free = [str(t) for t in rng.permutation(TYPES)]
        objects: Objects = {}
        absent: List[str] = []
        plans = []  # (template, question text, answer, facts)
        templates = self._templates
        weights = np.array([t.weight for t in templates])
        for _ in range(num_groups):
            template = templates[int(rng.choice(len(templates), p=weights / weights.sum()))]
            types, free = free[: template.num_objects], free[template.num_objects:]
            yes = bool(rng.random() < template.p_yes)
            new_objects, new_absent, slots = template.make(rng, types, yes)
            objects.update(new_objects)
            absent += new_absent
            slots.update({f"t{i + 1}": t for i, t in enumerate(types)})
            facts = [(attr, types[slot]) for attr, slot in template.facts]
            plans.append((template, template.text.format(**slots), ("no", "yes")[yes], facts))
        extra = max(int(rng.integers(EXTRA_OBJECTS[0], EXTRA_OBJECTS[1] + 1)),
                    MIN_OBJECTS - len(objects))
        for t in free[:extra]:
            objects[t] = _random_object(rng)
        absent += free[extra: extra + int(rng.integers(EXTRA_ABSENT[0], EXTRA_ABSENT[1] + 1))]

        features, boxes, region_of = self._regions(rng, objects)
        pool: List[Fact] = [(a, t) for t in objects for a in ("colour", "size", "state", "present")]
        pool += [("present", t) for t in absent]
        asked: Dict[str, Tuple[str, Dict[int, float]]] = {}  # text -> (question id, targets)
        for template, text, answer, facts in plans:
            questions = [(text, answer)]
            for fact in facts:
                first, second = _phrasings(rng, fact, objects)
                questions.append(first)
                if rng.random() < ALT_PHRASING:
                    questions.append(second)
            num_sub = len(questions) - 1
            others = [f for f in pool if f not in facts]
            k = min(len(others), int(rng.integers(IRRELEVANT_RANGE[0], IRRELEVANT_RANGE[1] + 1)))
            for i in rng.choice(len(others), size=k, replace=False):
                questions.append(_phrasings(rng, others[int(i)], objects)[int(rng.integers(2))])
            grounded = sorted({region_of[t] for _, t in facts if t in objects})
            grounding = None
            if grounded:
                grounding = np.zeros(features.shape[0], dtype=np.float32)
                grounding[grounded] = 1.0 / len(grounded)
            ids, targets = zip(*(self._ask(rng, asked, image_id, q, a) for q, a in questions))
            self.groups.append(Group(
                image_id=image_id, question_ids=list(ids), questions=[q for q, _ in questions],
                question_tokens=[self.vocab.encode(q) for q, _ in questions],
                answers=[a for _, a in questions], targets=list(targets),
                num_answers=len(ANSWERS), num_sub=num_sub, features=features, boxes=boxes,
                grounding=grounding))
            self.templates.append(template.name)

    def _ask(self, rng: np.random.Generator, asked: Dict[str, Tuple[str, Dict[int, float]]],
             image_id: int, question: str, answer: str) -> Tuple[str, Dict[int, float]]:
        """Question id and soft targets of a question; the same text on one image is one
        question (same id, same simulated human answers)."""
        if question not in asked:
            wrong = min(int(rng.binomial(NUM_HUMANS, HUMAN_ERROR)), 3)
            humans = [answer] * (NUM_HUMANS - wrong) + [
                _pick(rng, _alternatives(answer)) for _ in range(wrong)]
            scores = _soft_scores(tuple(sorted(humans)))
            targets = {self.answer_vocab.get(a): s for a, s in scores.items()}
            asked[question] = (f"{image_id}_{len(asked)}", targets)
        return asked[question]

    def _regions(self, rng: np.random.Generator, objects: Objects
                 ) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
        """Region features ``[R, F]``, boxes ``[R, 4]`` and the region of every object."""
        num_bg = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
        r = len(objects) + num_bg
        dim = self._background.shape[1]
        order = rng.permutation(r)
        region_of = {t: int(order[i]) for i, t in enumerate(objects)}
        features = (rng.standard_normal((r, dim)) * self.noise).astype(np.float32)
        for t, i in region_of.items():
            parts = [("type", TYPES.index(t))] + [
                (attr, values.index(objects[t][attr]))
                for attr, values in (("colour", COLOURS), ("size", SIZES), ("state", STATES))]
            for (name, idx), amp in zip(parts, rng.uniform(*AMPLITUDE, size=len(parts))):
                features[i] += amp * self._prototypes[name][idx]
        for i in order[len(objects):]:
            features[i] += rng.uniform(*AMPLITUDE) * self._background[int(
                rng.integers(NUM_BACKGROUND_PROTOTYPES))]
        xy = rng.uniform(0.0, 0.8, size=(r, 2))
        wh = rng.uniform(0.1, 0.5, size=(r, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, 1.0)], axis=1).astype(np.float32)
        return features, boxes, region_of

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index):  # type: ignore[override]
        return self.groups[index]

    @property
    def num_answers(self) -> int:
        return len(self.answer_vocab)

    @property
    def feature_dim(self) -> int:
        return self._background.shape[1]
