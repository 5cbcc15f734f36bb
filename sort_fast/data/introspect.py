"""VQA-Introspect + VQAv2 + region features as groups (docs/data_formats.md)."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .features import open_region_features
from .group import Group
from .text import UNK, Vocab, normalize_answer, tokenize, vqa_soft_scores

__all__ = ["IntrospectDataset"]

PathLike = Union[str, "os.PathLike[str]"]
# ground-truth answer and the human answers (one answer for sub-questions), normalised
Answers = Tuple[str, Tuple[str, ...]]
# a VQAv2 question id as VQA-Introspect writes its keys: ASCII digits, no leading zero
_QUESTION_ID = re.compile(r"0|[1-9][0-9]*")


class _RepeatedKey(Exception):
    """A key that occurs twice in one JSON object (``json`` would keep only the last)."""


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """``object_pairs_hook`` of :func:`_load_json`: the object, refusing a repeated key."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _RepeatedKey(next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1))
    return obj


def _load_json(path: PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None
    except _RepeatedKey as e:
        raise ValueError(f"{path}: key {e.args[0]!r} occurs twice in one JSON object") from None
    except RecursionError:
        raise ValueError(f"{path}: cannot read JSON (nested too deeply)") from None


def _check(ok: bool, path: PathLike, what: str) -> None:
    if not ok:
        raise ValueError(f"{path}: {what}")


def _is(value: Any, kind: type) -> bool:
    """``isinstance`` that does not take a JSON ``true``/``false`` for a number."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _records(path: PathLike, key: str, fields: Dict[str, type]) -> Dict[int, dict]:
    """``data[key]``: a list of dicts with the typed ``fields``, by their unique
    ``question_id`` (VQAv2 has one question and one annotation per id)."""
    data = _load_json(path)
    _check(isinstance(data, dict) and isinstance(data.get(key), list), path,
           f"expected a JSON object with a list {key!r}")
    by_id: Dict[int, dict] = {}
    for i, rec in enumerate(data[key]):
        _check(isinstance(rec, dict), path, f"{key}[{i}] is not an object")
        for name, kind in fields.items():
            _check(_is(rec.get(name), kind), path,
                   f"{key}[{i}] needs {name!r} of type {kind.__name__}")
        qid = rec["question_id"]
        _check(qid not in by_id, path, f"{key}[{i}] repeats question_id {qid}")
        by_id[qid] = rec
    return by_id


def _question_key(text: str) -> str:
    """Normalised question text used to match sub-questions with VQAv2 questions."""
    return " ".join(tokenize(text))


def _introspect_answer(answer: str) -> str:
    answer = normalize_answer(answer)
    return "yes" if answer == "yea" else answer


class IntrospectDataset(Sequence[Group]):
    """Groups from VQA-Introspect (``introspect``), the VQAv2 ``questions`` and
    ``annotations`` of the same split, and region ``features`` (a directory of ``.npy`` files or
    a bottom-up TSV). Region features are read on access.

    A group: the reasoning question (its ten VQAv2 human answers; the Introspect
    ``reasoning_answer_most_common`` when VQAv2 has none), its distinct sub-questions from every
    non-``invalid`` introspection (one answer each, target score 1) and, as irrelevant
    questions, the image's other VQAv2 questions that are neither (matched by normalised text;
    questions without annotation are left out). Reasoning questions without sub-questions make
    no group. ``answer_vocab``: a :class:`Vocab`, a file (one answer per line) or ``None`` to
    build it from these annotations and sub-answers (answers seen ``>= min_answer_count``
    times). ``question_vocab``: a :class:`Vocab` or ``None`` to build it from these questions.
    Malformed or missing files raise ``ValueError`` naming the file, and so does inconsistent
    data: a question id twice in ``questions`` or ``annotations``, a key twice in one JSON
    object, a VQA-Introspect key that is not a question id in canonical form (``"01000"``,
    ``"１０００"``), an empty sub-answer, a reasoning question whose image differs between
    VQA-Introspect and VQAv2, a JSON bool where an id is expected. The region features of every
    image are read and checked once when the data set is opened (docs/data_formats.md).
    """

    def __init__(self, introspect: PathLike, questions: PathLike, annotations: PathLike,
                 features: PathLike, answer_vocab: Union[Vocab, PathLike, None] = None,
                 question_vocab: Optional[Vocab] = None, *, min_answer_count: int = 1) -> None:
        plans = self._read_introspect(introspect)
        images = {image_id for _, image_id, _, _, _ in plans}
        vqa_questions = _records(questions, "questions",
                                 {"question_id": int, "image_id": int, "question": str})
        for _, image_id, qid, _, _ in plans:
            rec = vqa_questions.get(qid)
            if rec is not None and rec["image_id"] != image_id:
                raise ValueError(f"{introspect}: question {qid} is on image {image_id} here but "
                                 f"on image {rec['image_id']} in {questions}")
        by_image: Dict[int, List[Tuple[int, str]]] = {}
        for rec in vqa_questions.values():
            if rec["image_id"] in images:
                by_image.setdefault(rec["image_id"], []).append((rec["question_id"],
                                                                 rec["question"]))
        wanted = {qid for _, _, qid, _, _ in plans} | {
            qid for qs in by_image.values() for qid, _ in qs}
        human: Dict[int, Answers] = {}
        for qid, rec in _records(annotations, "annotations",
                                 {"question_id": int, "answers": list}).items():
            if qid not in wanted:
                continue
            answers = rec["answers"]
            _check(len(answers) > 0 and all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                            for a in answers), annotations,
                   f"question {qid}: 'answers' must be objects with a string 'answer'")
            humans = tuple(normalize_answer(a["answer"]) for a in answers)
            best = rec.get("multiple_choice_answer")
            gt = normalize_answer(best) if isinstance(best, str) else Counter(humans).most_common(
                1)[0][0]
            human[qid] = (gt, humans)

        self._groups: List[Tuple[int, List[str], List[str], List[Answers], int]] = []
        for text, image_id, qid, fallback, subs in plans:
            _check(qid in human or bool(fallback), annotations,
                   f"reasoning question {qid} has no annotation and no "
                   "reasoning_answer_most_common")
            sub_keys = {_question_key(q) for q, _ in subs} | {_question_key(text)}
            irrelevant = [(i, q) for i, q in by_image.get(image_id, [])
                          if i != qid and i in human and _question_key(q) not in sub_keys]
            self._groups.append((
                image_id,
                [str(qid)] + [f"{qid}_sub{k}" for k in range(len(subs))] + [str(i) for i, _ in
                                                                            irrelevant],
                [text] + [q for q, _ in subs] + [q for _, q in irrelevant],
                [human.get(qid, (fallback, (fallback,)))] + [(a, (a,)) for _, a in subs]
                + [human[i] for i, _ in irrelevant],
                len(subs),
            ))

        self.features = open_region_features(features)
        missing = [i for i in sorted(images) if i not in self.features]
        if missing:
            raise ValueError(f"{features}: no region features for {len(missing)} image(s), e.g. "
                             f"image ids {missing[:5]}")
        self.features.check_images(sorted(images))  # before training reads them one by one
        if isinstance(answer_vocab, Vocab):
            self.answer_vocab = answer_vocab
        elif answer_vocab is not None:
            self.answer_vocab = Vocab.load(answer_vocab)
        else:
            self.answer_vocab = Vocab.build(
                (a for g in self._groups for _, humans in g[3] for a in humans),
                min_count=min_answer_count)
        self.vocab = question_vocab or Vocab.build_questions(q for g in self._groups for q in g[2])

    @staticmethod
    def _read_introspect(path: PathLike) -> List[Tuple[str, int, int, str, List[Tuple[str, str]]]]:
        """``[(reasoning text, image id, question id, most common answer, [(sub-question,
        sub-answer)])]`` for reasoning questions with at least one sub-question, by question id."""
        data = _load_json(path)
        _check(isinstance(data, dict), path, "expected a JSON object keyed by question id")
        plans = []
        for key in sorted(data, key=lambda k: (len(k), k)):
            entry = data[key]
            where = f"entry {key!r}"
            _check(_QUESTION_ID.fullmatch(key) is not None, path,
                   f"{where}: keys must be VQAv2 question ids (ASCII digits, no leading zero)")
            _check(isinstance(entry, dict) and isinstance(entry.get("reasoning_question"), str)
                   and _is(entry.get("image_id"), int)
                   and isinstance(entry.get("introspect"), list), path,
                   f"{where} needs 'reasoning_question' (str), 'image_id' (int) and "
                   "'introspect' (list)")
            text = entry["reasoning_question"]
            seen = {_question_key(text)}
            subs: List[Tuple[str, str]] = []
            for j, item in enumerate(entry["introspect"]):
                _check(isinstance(item, dict) and isinstance(item.get("sub_qa"), list), path,
                       f"{where}: introspect[{j}] needs a list 'sub_qa'")
                if item.get("pred_q_type") == "invalid":
                    continue
                for sq in item["sub_qa"]:
                    _check(isinstance(sq, dict) and isinstance(sq.get("sub_question"), str)
                           and isinstance(sq.get("sub_answer"), str), path,
                           f"{where}: introspect[{j}].sub_qa needs string 'sub_question' and "
                           "'sub_answer'")
                    k = _question_key(sq["sub_question"])
                    if k and k not in seen:
                        answer = _introspect_answer(sq["sub_answer"])
                        _check(bool(answer), path, f"{where}: sub-question "
                               f"{sq['sub_question']!r} has the sub_answer "
                               f"{sq['sub_answer']!r}, empty after the VQA answer normalisation")
                        seen.add(k)
                        subs.append((sq["sub_question"], answer))
            if subs:
                fallback = entry.get("reasoning_answer_most_common")
                fallback = _introspect_answer(fallback) if isinstance(fallback, str) else ""
                plans.append((text, entry["image_id"], int(key), fallback, subs))
        _check(bool(plans), path, "no reasoning question has a valid sub-question")
        return plans

    def __len__(self) -> int:
        return len(self._groups)

    @property
    def num_answers(self) -> int:
        return len(self.answer_vocab)

    @property
    def feature_dim(self) -> int:
        """The region feature width ``F`` shared by every image (checked when opened)."""
        return self.features.feature_dim

    def _targets(self, humans: Tuple[str, ...]) -> Dict[int, float]:
        """Soft scores over the answer vocabulary (answers outside it are dropped)."""
        scores = {humans[0]: 1.0} if len(humans) == 1 else vqa_soft_scores(humans)
        indexed = ((self.answer_vocab.get(a), s) for a, s in scores.items())
        return {i: s for i, s in indexed if i is not None}

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image_id, ids, texts, answers, num_sub = self._groups[index]
        features, boxes = self.features[image_id]
        return Group(
            image_id=image_id, question_ids=ids, questions=texts,
            question_tokens=[self.vocab.encode(q) or [self.vocab.get(UNK)] for q in texts],
            answers=[gt for gt, _ in answers], targets=[self._targets(h) for _, h in answers],
            num_answers=self.num_answers, num_sub=num_sub, features=features, boxes=boxes)
