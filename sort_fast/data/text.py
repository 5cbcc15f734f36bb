"""Question tokenisation, vocabularies, the official VQA answer normalisation and soft scores."""
from __future__ import annotations

import os
import re
import sys
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "PAD",
    "UNK",
    "tokenize",
    "Vocab",
    "normalize_answer",
    "vqa_soft_scores",
    "vqa_accuracy",
    "load_word_vectors",
]

PAD, UNK = "<pad>", "<unk>"

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})


@lru_cache(maxsize=None)
def _token_pattern() -> "re.Pattern[str]":
    """Words (letters, digits and combining marks, so Devanagari or Thai words stay whole) and
    clitics (an apostrophe and letters). On ASCII text this is ``[a-z0-9]+|'[a-z]+``."""
    marks = "".join(chr(c) for c in range(sys.maxunicode + 1)
                    if unicodedata.category(chr(c)).startswith("M"))
    marks = re.escape(marks)
    return re.compile(rf"(?:[^\W_]|[{marks}])+|'(?:[^\W\d_]|[{marks}])+")


def tokenize(text: str) -> List[str]:
    """Case-folded Unicode word tokens after NFKC normalisation; clitics are split off
    (``"what's" -> ["what", "'s"]``, ``"Café?" -> ["café"]``)."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()
    return _token_pattern().findall(text)


class Vocab:
    """A list of tokens and its inverse. Used for questions (with ``<pad>`` at 0 and ``<unk>``)
    and for answers (no specials)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens: List[str] = list(tokens)
        self._index: Dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            dup = next(t for t, n in Counter(self.tokens).items() if n > 1)
            raise ValueError(f"vocabulary has the token {dup!r} twice")

    @classmethod
    def build(
        cls, items: Iterable[str], *, min_count: int = 1, specials: Sequence[str] = ()
    ) -> "Vocab":
        """Vocabulary of ``items`` seen at least ``min_count`` times, most frequent first (ties
        alphabetical), after ``specials``."""
        counts = Counter(items)
        kept = sorted((t for t, n in counts.items() if n >= min_count and t not in specials),
                      key=lambda t: (-counts[t], t))
        return cls([*specials, *kept])

    @classmethod
    def build_questions(cls, questions: Iterable[str], *, min_count: int = 1) -> "Vocab":
        """Question vocabulary: ``<pad>`` (index 0), ``<unk>`` (index 1), then the words."""
        return cls.build((t for q in questions for t in tokenize(q)), min_count=min_count,
                         specials=(PAD, UNK))

    @classmethod
    def load(cls, path: "os.PathLike[str] | str") -> "Vocab":
        """One token per line (UTF-8), as written by :meth:`save`."""
        try:
            with open(path, encoding="utf-8") as f:
                tokens = [line.rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the vocabulary file ({e})") from None
        if not tokens or any(not t for t in tokens):
            raise ValueError(f"{path}: a vocabulary file needs one non-empty token per line")
        return cls(tokens)

    def save(self, path: "os.PathLike[str] | str") -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.tokens) + "\n")

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def get(self, token: str) -> Optional[int]:
        """Index of ``token`` or ``None``."""
        return self._index.get(token)

    def encode(self, text: str) -> List[int]:
        """Token indices of a question (out-of-vocabulary words map to ``<unk>``)."""
        unk = self._index.get(UNK)
        ids = [self._index.get(t, unk) for t in tokenize(text)]
        if unk is None and None in ids:
            raise ValueError(f"{text!r} has words outside a vocabulary without {UNK}")
        return ids


# --- official VQA answer normalisation (compact port of the VQA evaluation script) ----------
_CONTRACTIONS = {
    c.replace("'", ""): c
    for c in (
        "aren't can't couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
        "he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll it's "
        "let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
        "oughtn't shan't she'd she'd've she'll she's should've shouldn't shouldn't've "
        "somebody'd somebody'll somebody's someone'd someone'll someone's something'd "
        "something'll that's there'd there'd've there're there's they'd they'd've they'll "
        "they're they've wasn't we'd we'd've we'll we're we've weren't what'll what're what's "
        "what've when's where'd where's where've who'd who'd've who'll who's who've why'll "
        "why're why's won't would've wouldn't wouldn't've y'all y'all'd've you'd you'd've "
        "you'll you're you've"
    ).split()
}
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation: punctuation, number words to digits, articles
    and contractions (``"Two dogs!" -> "2 dogs"``, ``"dont" -> "don't"``)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_soft_scores(human_answers: Sequence[str]) -> Dict[str, float]:
    """VQA accuracy of every distinct (normalised) human answer:
    ``acc(a) = (1/n) sum_i min(1, #{j != i : gt_j = a} / 3)`` over the ``n`` (usually 10) humans.
    """
    gts = [normalize_answer(a) for a in human_answers]
    counts = Counter(gts)
    n = len(gts)
    # humans i that gave a see count(a) - 1 others agreeing; the others see count(a)
    return {
        a: (c * min(1.0, (c - 1) / 3) + (n - c) * min(1.0, c / 3)) / n
        for a, c in counts.items()
    }


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers (0 if nobody gave it)."""
    return vqa_soft_scores(human_answers).get(normalize_answer(prediction), 0.0)


def load_word_vectors(
    path: "os.PathLike[str] | str", vocab: Vocab, dim: int, *, seed: int = 0
) -> torch.Tensor:
    """Embedding matrix ``[len(vocab), dim]`` float32 from a GloVe text file
    (``word v_1 ... v_dim`` per line). Words the file lacks get ``N(0, 0.1^2)`` rows (fixed by
    ``seed``), ``<pad>`` a zero row. Reads the file once, keeping only vocabulary words."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 0.1, size=(len(vocab), dim)).astype(np.float32)
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                word, _, rest = line.rstrip().partition(" ")
                idx = vocab.get(word)
                if idx is None:
                    continue
                values = rest.split()
                try:
                    if len(values) != dim:
                        raise ValueError
                    weights[idx] = np.array(values, dtype=np.float32)
                except ValueError:
                    raise ValueError(f"{path}: line {lineno} ({word!r}) needs {dim} numbers, "
                                     f"got {values[:3]}... ({len(values)} fields)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the word vectors ({e})") from None
    pad = vocab.get(PAD)
    if pad is not None:
        weights[pad] = 0.0
    return torch.from_numpy(weights)
