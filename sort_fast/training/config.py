"""Command-line flags of ``python -m sort_fast.train`` and ``python -m sort_fast.evaluate``.

Flag values are checked while parsing: an impossible value (``--batch-groups 0``, ``--lr -1``,
a missing file) ends the program with one line naming the flag and exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Callable, List, NoReturn, Optional, Sequence

from ..data.synthetic import DESIGNS
from ..errors import CLIError, Interrupted
from ..models.pythia import INPUT_ABLATIONS

__all__ = ["OneLineParser", "build_train_parser",
           "build_evaluate_parser", "command_line", "require_all", "LOSSES", "METHOD_NAMES",
           "EVAL_DIR"]

LOSSES = ("bce", "squint", "sort-sq", "sort", "role-bce")
METHOD_NAMES = {"bce": "Pythia", "squint": "Pythia + SQuINT", "sort-sq": "Pythia + SOrT (only SQ)",
                "sort": "Pythia + SOrT (SQ + IQ)",
                "role-bce": "Pythia + SOrT's BCE weights (no Grad-CAM term)"}
EVAL_DIR = "eval"  # the evaluator's output folder beside the checkpoint, unless --out says


def run_command(prog: str, command: Callable[[argparse.Namespace], object],
                args: argparse.Namespace) -> int:
    """Runs an entry point's ``command``: a :class:`CLIError` or ``OSError`` is printed on one
    line (exit 2); an :class:`Interrupted` run prints its resume command on the next line and
    exits 128 + the signal number; Ctrl-C ends with exit 130; 0 otherwise."""
    try:
        command(args)
    except (CLIError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{prog}: {e}\n{e.resume}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line (``prog: error: message``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def command_line(prog: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                 **changes: Any) -> str:
    """The shell command running ``prog`` with ``args`` (flags left at their default omitted),
    ``changes`` applied (``True``/``False`` for on/off flags)."""
    values = {**vars(args), **changes}
    words = [prog]
    for action in parser._actions:
        if not action.option_strings or action.dest not in values:
            continue  # --help
        value = values[action.dest]
        if value == action.default:
            continue
        words.append(action.option_strings[0])
        if action.nargs != 0:
            words.append(shlex.quote(str(value)))
    return " ".join(words)


def _number(kind: Callable[[str], float], low: float, inclusive: bool, what: str
            ) -> Callable[[str], float]:
    """An argparse ``type`` accepting ``kind`` values above ``low`` (or equal if ``inclusive``)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < low or (
                value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = _number(int, 0, False, "an integer >= 1")
non_negative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a number > 0")
non_negative_float = _number(float, 0.0, True, "a number >= 0")


def _probability(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


def existing_file(text: str) -> str:
    """A path to an existing regular file."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def existing_path(text: str) -> str:
    """A path to an existing file or directory."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return text


def existing_dir(text: str) -> str:
    """A path to an existing directory."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return text


def _add_eval_data_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Validation data flags, shared by both commands. Without ``defaults`` (the evaluator) a
    flag left out takes the value stored in the checkpoint."""
    group = parser.add_argument_group("validation data")
    group.add_argument("--synthetic-val-groups", type=positive_int,
                       default=1000 if defaults else None,
                       help="validation groups of the embedded synthetic benchmark"
                            + (" (default: %(default)s)" if defaults else
                               " (default: as in training)"))
    group.add_argument("--val-introspect", type=existing_file, default=None,
                       help="VQA-Introspect validation JSON (real data; needs the other --val-* "
                            "files)")
    group.add_argument("--val-vqa-questions", type=existing_file, default=None,
                       help="VQAv2 validation questions JSON")
    group.add_argument("--val-vqa-annotations", type=existing_file, default=None,
                       help="VQAv2 validation annotations JSON")
    group.add_argument("--val-features", type=existing_path, default=None,
                       help="region features of the validation images (directory of .npy "
                            "files or a bottom-up TSV)")
    group.add_argument("--hat-dir", type=existing_dir, default=None,
                       help="directory of VQA-HAT attention PNGs; grounding is then measured "
                            "against them instead of the groups' region grounding")


def _add_run_flags(parser: argparse.ArgumentParser, training: bool) -> None:
    """Device, batch size and Grad-CAM path, shared by both commands (``training``: the
    trainer's wording)."""
    parser.add_argument("--batch-groups", type=positive_int, default=64,
                        help=("groups (reasoning question + its sub/irrelevant questions) per "
                              "step, split between the processes of a torchrun launch"
                              if training else "groups per evaluation batch")
                        + " (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run; auto picks CUDA when available (default: "
                             "%(default)s)")
    parser.add_argument("--threads", type=non_negative_int, default=1,
                        help="CPU threads of each process's torch operations; 0 keeps torch's "
                             "default. The model is small, so extra threads mostly add "
                             "synchronisation, and suffer most on a shared machine "
                             "(default: %(default)s)")
    parser.add_argument("--no-plots", dest="plots", action="store_false",
                        help="write metrics.json and table1.md without the plots (saves a few "
                             "seconds per report, e.g. in a protocol of many runs)")
    parser.add_argument("--naive", action="store_true",
                        help="compute Grad-CAM gradients with plain autograd "
                             "(autograd.grad(create_graph=True)) instead of the closed-form "
                             "head_gradcam" + (", and the loss with its PyTorch backend"
                                               if training else ""))


def explicit_flags(build: Callable[[], argparse.ArgumentParser],
                   argv: Optional[Sequence[str]]) -> List[str]:
    """The destinations of the flags given on the command line ``argv`` (not defaulted), from
    the parser ``build()`` makes."""
    parser = build()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return sorted(vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))


def build_train_parser() -> OneLineParser:
    """The parser of ``python -m sort_fast.train``."""
    p = OneLineParser(
        prog="python -m sort_fast.train",
        description="Train a Pythia-style VQA model with SOrT (or a baseline loss) and evaluate "
                    "it. Without data flags it uses the embedded synthetic benchmark.")
    p.add_argument("--out", default="runs/sort",
                   help="output directory: train.log, log.jsonl, checkpoint.pt, metrics.json, "
                        "table1.md, plots (default: %(default)s)")
    sched = p.add_argument_group("schedule")
    sched.add_argument("--max-steps", type=non_negative_int, default=0,
                       help="optimizer steps to train; 0 means --epochs full passes "
                            "(default: %(default)s)")
    sched.add_argument("--epochs", type=positive_int, default=15,
                       help="passes over the training groups when --max-steps is 0 "
                            "(default: %(default)s)")
    _add_run_flags(sched, training=True)
    sched.add_argument("--seed", type=int, default=0,
                       help="seed of initialisation, dropout and data order (default: "
                            "%(default)s)")
    sched.add_argument("--eval-every", type=non_negative_int, default=230,
                       help="evaluate every N steps (0: only at the end; default: %(default)s)")
    sched.add_argument("--save-every", type=non_negative_int, default=230,
                       help="write the checkpoint every N steps (0: only at the end; default: "
                            "%(default)s)")
    sched.add_argument("--log-every", type=positive_int, default=10,
                       help="read the loss parts from the device every N steps (one host sync "
                            "per N steps; every step is still logged, and a non-finite loss "
                            "stops the run at the next read; default: %(default)s)")
    speed = p.add_argument_group("speed")
    speed.add_argument("--compile", action="store_true",
                       help="run the model and the objective of each step under torch.compile "
                            "(the first steps compile; results equal eager's within float "
                            "rounding)")
    speed.add_argument("--workers", type=non_negative_int, default=0,
                       help="DataLoader processes that read and pack the next batches while "
                            "the step runs (0: the training process does it; real data reads "
                            "its region features there; default: %(default)s)")
    speed.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                       help="mixed precision: the step under torch.autocast in bfloat16 or "
                            "float16 (fp16 with gradient scaling); default: %(default)s")
    start = sched.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from its checkpoint, with the flags stored "
                            "there (no need to repeat them; a flag given again that would "
                            "change the training trajectory must match); bit-identical to an "
                            "uninterrupted run on CPU")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh even though OUT holds a checkpoint, replacing that "
                            "run's outputs (without it, such an OUT is refused)")
    sched.add_argument("--init", type=existing_file, default=None, metavar="CKPT",
                       help="start from the model weights of this checkpoint (fine-tuning, as "
                            "SOrT fine-tunes a trained Pythia); optimizer and step start fresh")

    loss = p.add_argument_group("loss")
    loss.add_argument("--loss", choices=LOSSES, default="sort",
                      help="bce: plain model, BCE on all questions; squint: BCE plus attention "
                           "alignment of reasoning and sub-questions (Selvaraju et al. 2020); "
                           "sort-sq: SOrT with sub-questions only; sort: full SOrT; role-bce: "
                           "SOrT's per-role BCE weights (--lambda-reasoning/-sub/-irrelevant) "
                           "without its Grad-CAM term, a control (default: %(default)s)")
    loss.add_argument("--lambda-reasoning", type=non_negative_float, default=2.27,
                      help="SOrT weight of the reasoning questions' BCE (default: %(default)s)")
    loss.add_argument("--lambda-sub", type=non_negative_float, default=2.27,
                      help="SOrT weight of the sub-questions' BCE (default: %(default)s)")
    loss.add_argument("--lambda-irrelevant", type=non_negative_float, default=3e-4,
                      help="SOrT weight of the irrelevant questions' BCE (default: %(default)s)")
    loss.add_argument("--margin", type=non_negative_float, default=0.0,
                      help="hinge margin of the contrastive gradient loss (default: "
                           "%(default)s)")
    loss.add_argument("--lambda-attention", type=non_negative_float, default=1.0,
                      help="SQuINT weight of the attention alignment loss (default: "
                           "%(default)s)")

    opt = p.add_argument_group("optimizer (Adamax, as Pythia)")
    opt.add_argument("--lr", type=positive_float, default=3e-3,
                     help="learning rate after warm-up (default: %(default)s)")
    opt.add_argument("--warmup-steps", type=non_negative_int, default=50,
                     help="linear learning-rate warm-up from 0, then constant (default: "
                          "%(default)s)")
    opt.add_argument("--grad-clip", type=non_negative_float, default=0.25,
                     help="clip the gradient norm to this value; 0 disables (default: "
                          "%(default)s)")

    model = p.add_argument_group("model")
    model.add_argument("--hidden-dim", type=positive_int, default=64,
                       help="LSTM, attention and text-classifier width (default: %(default)s)")
    model.add_argument("--joint-dim", type=positive_int, default=128,
                       help="joint embedding width (where Grad-CAM vectors live) and "
                            "image-classifier width (default: %(default)s)")
    model.add_argument("--dropout", type=_probability, default=0.1,
                       help="dropout on the joint embedding and in the classifier (default: "
                            "%(default)s)")
    model.add_argument("--image-glimpses", type=positive_int, default=1,
                       help="attention heads over the image regions, concatenated (Pythia: 2; "
                            "default: %(default)s)")
    model.add_argument("--input-ablation", choices=INPUT_ABLATIONS, default="none",
                       help="shortcut probes: text-only zeroes every region feature, "
                            "image-only replaces every question by one token (default: "
                            "%(default)s)")

    data = p.add_argument_group("training data")
    data.add_argument("--synthetic-seed", type=int, default=0,
                      help="seed of the embedded synthetic benchmark (default: %(default)s)")
    data.add_argument("--synthetic-train-groups", type=positive_int, default=3000,
                      help="training groups of the synthetic benchmark (default: %(default)s)")
    data.add_argument("--synthetic-design", choices=sorted(DESIGNS), default="v1",
                      help="reasoning templates of the synthetic benchmark: v1 (the original, "
                           "with answer priors), balanced (even priors, templates two "
                           "glimpses can perceive) or shift (balanced's templates with strong "
                           "answer priors in train and val and balanced's test split; "
                           "docs/synthetic_benchmark.md; default: %(default)s)")
    data.add_argument("--introspect", type=existing_file, default=None,
                      help="VQA-Introspect training JSON (real data; needs --vqa-questions, "
                           "--vqa-annotations, --features and the --val-* files)")
    data.add_argument("--vqa-questions", type=existing_file, default=None,
                      help="VQAv2 training questions JSON")
    data.add_argument("--vqa-annotations", type=existing_file, default=None,
                      help="VQAv2 training annotations JSON")
    data.add_argument("--features", type=existing_path, default=None,
                      help="region features of the training images (directory of .npy files "
                           "or a bottom-up TSV)")
    _add_eval_data_flags(p, defaults=True)
    return p


def build_evaluate_parser() -> OneLineParser:
    """The parser of ``python -m sort_fast.evaluate``."""
    p = OneLineParser(
        prog="python -m sort_fast.evaluate",
        description="Evaluate a checkpoint: consistency quadrants, accuracy, Grad-CAM ranking "
                    "metrics and grounding; writes metrics.json, table1.md and plots.")
    p.add_argument("checkpoint", type=existing_path,
                   help="a checkpoint.pt written by training, or the run folder holding it "
                        "(the trainer's --out)")
    p.add_argument("--out", default=None,
                   help=f"output directory (default: an '{EVAL_DIR}' directory beside the "
                        "checkpoint)")
    _add_run_flags(p, training=False)
    p.add_argument("--synthetic-seed", type=int, default=None,
                   help="seed of the synthetic benchmark (default: as in training)")
    p.add_argument("--synthetic-split", choices=("val", "test"), default=None,
                   help="split of the synthetic benchmark to evaluate on: val (the one "
                        "training reports and tuning may look at) or test (held out for "
                        "final numbers; default: as in training, i.e. val)")
    _add_eval_data_flags(p, defaults=False)
    return p


def require_all(args: argparse.Namespace, names: Sequence[str]) -> bool:
    """True when every flag in ``names`` is set, False when none is; a partial set is a
    :class:`CLIError` naming the missing flags."""
    given = [n for n in names if getattr(args, n) is not None]
    if given and len(given) != len(names):
        missing = ", ".join("--" + n.replace("_", "-") for n in names if n not in given)
        raise CLIError(f"real data needs {missing} as well")
    return bool(given)

