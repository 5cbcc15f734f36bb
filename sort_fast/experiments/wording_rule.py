"""The wording rule: a text-only shortcut that needs no learning, Table 1's floor for what the
wording alone can answer (docs/REPRODUCTION.md)."""
from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from typing import Dict, List

import numpy as np

from ..data.synthetic import COLOURS, TYPES
from ..training.data import synthetic_split

__all__ = ["wording_rule"]


def wording_rule(args: argparse.Namespace) -> Dict[str, float]:
    """Accuracy on the test split's reasoning questions, per template and overall (``"all"``),
    of the rule that reads only the wording: the training split's majority answer for the same
    question with object types and colour words masked (the template's majority when the
    masked wording never occurred in training). A text-only shortcut without any learning."""
    masked = re.compile(r"\b(%s)\b" % "|".join(TYPES + COLOURS))
    data = {split: synthetic_split(args.synthetic_seed, split, groups, args.synthetic_design)
            for split, groups in (("train", args.synthetic_train_groups),
                                  ("test", args.synthetic_test_groups))}
    by_wording: Dict[str, Counter] = defaultdict(Counter)
    by_template: Dict[str, Counter] = defaultdict(Counter)
    for group, template in zip(data["train"], data["train"].templates):
        by_wording[masked.sub("_", group.questions[0])][group.answers[0]] += 1
        by_template[template][group.answers[0]] += 1
    right: Dict[str, List[bool]] = defaultdict(list)
    for group, template in zip(data["test"], data["test"].templates):
        votes = by_wording.get(masked.sub("_", group.questions[0])) or by_template[template]
        right[template].append(votes.most_common(1)[0][0] == group.answers[0])
    accuracy = {t: float(np.mean(v)) for t, v in sorted(right.items())}
    accuracy["all"] = float(np.mean([x for v in right.values() for x in v]))
    return accuracy
