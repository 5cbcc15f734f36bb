"""The trainer's typed configuration (:class:`TrainConfig`) and the command lines of
``python -m sort_fast.train`` and ``python -m sort_fast.evaluate`` generated from it
(docs/training.md, "Configuration").

Flag values are checked while parsing: an impossible value (``--batch-groups 0``, ``--lr -1``,
a missing file) ends the program with one line naming the flag and exit code 2, no traceback;
a ``--config`` file's values get the same checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterator,
    List,
    Mapping,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
)

from ..data.synthetic import DESIGNS
from ..errors import CLIError, Interrupted
from ..models.pythia import INPUT_ABLATIONS
from .flags import add_flags, checked_value, flag_fields, flag_name, mark, option

__all__ = ["TrainConfig", "DataConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig",
           "RunConfig", "OneLineParser", "build_train_parser", "build_evaluate_parser",
           "parse_train_args", "read_config_file", "resumed_config", "trajectory_changes",
           "marked", "command_line", "require_all", "LOSSES", "MODELS", "METHOD_NAMES",
           "method_name", "EVAL_DIR"]

LOSSES = ("bce", "squint", "sort-sq", "sort", "role-bce")
MODELS = ("pythia", "llava")
METHOD_NAMES = {"bce": "Pythia", "squint": "Pythia + SQuINT", "sort-sq": "Pythia + SOrT (only SQ)",
                "sort": "Pythia + SOrT (SQ + IQ)",
                "role-bce": "Pythia + SOrT's BCE weights (no Grad-CAM term)"}
MODEL_NAMES = {"pythia": "Pythia", "llava": "LLaVA"}
EVAL_DIR = "eval"  # the evaluator's output folder beside the checkpoint, unless --out says


def method_name(loss: str, model: str = "pythia") -> str:
    """The table name of a run: ``METHOD_NAMES[loss]`` with its model's name."""
    return METHOD_NAMES[loss].replace("Pythia", MODEL_NAMES[model], 1)


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


def command_line(prog: str, parser: argparse.ArgumentParser, values: Mapping[str, Any],
                 **changes: Any) -> str:
    """The shell command running ``prog`` with the flag ``values`` (by flag name; flags left
    at their default omitted), ``changes`` applied (``True``/``False`` for on/off flags)."""
    values = {**values, **changes}
    words = [prog]
    written = set()
    for action in parser._actions:
        if not action.option_strings or action.dest not in values or action.dest in written:
            continue  # --help, a flag's deprecated spelling
        written.add(action.dest)
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


def probability(text: str) -> float:
    """A number in [0, 1)."""
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


@dataclasses.dataclass
class DataConfig:
    """Training and validation data: the embedded synthetic benchmark, or real data files."""

    synthetic_seed: int = option(0, "seed of the embedded synthetic benchmark (default: "
                                 "%(default)s)", parse=int, trajectory=True, evaluate=True,
                                 from_checkpoint=True,
                                 evaluate_help="seed of the synthetic benchmark (default: as "
                                               "in training)")
    synthetic_train_groups: int = option(
        3000, "training groups of the synthetic benchmark (default: %(default)s)",
        parse=positive_int, trajectory=True)
    synthetic_design: str = option(
        "v1", "reasoning templates of the synthetic benchmark: v1 (the original, with answer "
        "priors), balanced (even priors, templates two glimpses can perceive) or shift "
        "(balanced's templates with strong answer priors in train and val and balanced's test "
        "split; docs/synthetic_benchmark.md; default: %(default)s)",
        choices=sorted(DESIGNS), trajectory=True)
    introspect: Optional[str] = option(
        None, "VQA-Introspect training JSON (real data; needs --vqa-questions, "
        "--vqa-annotations, --features and the --val-* files)", parse=existing_file,
        trajectory=True)
    vqa_questions: Optional[str] = option(None, "VQAv2 training questions JSON",
                                          parse=existing_file, trajectory=True)
    vqa_annotations: Optional[str] = option(None, "VQAv2 training annotations JSON",
                                            parse=existing_file, trajectory=True)
    features: Optional[str] = option(None, "region features of the training images (directory "
                                     "of .npy files or a bottom-up TSV)", parse=existing_path,
                                     trajectory=True)
    synthetic_val_groups: int = option(
        1000, "validation groups of the embedded synthetic benchmark (default: %(default)s)",
        parse=positive_int, evaluate=True, from_checkpoint=True,
        evaluate_help="validation groups of the embedded synthetic benchmark (default: as in "
                      "training)")
    val_introspect: Optional[str] = option(
        None, "VQA-Introspect validation JSON (real data; needs the other --val-* files)",
        parse=existing_file, evaluate=True)
    val_vqa_questions: Optional[str] = option(None, "VQAv2 validation questions JSON",
                                              parse=existing_file, evaluate=True)
    val_vqa_annotations: Optional[str] = option(None, "VQAv2 validation annotations JSON",
                                                parse=existing_file, evaluate=True)
    val_features: Optional[str] = option(
        None, "region features of the validation images (directory of .npy files or a "
        "bottom-up TSV)", parse=existing_path, evaluate=True)
    hat_dir: Optional[str] = option(
        None, "directory of VQA-HAT attention PNGs; grounding is then measured against them "
        "instead of the groups' region grounding", parse=existing_dir, evaluate=True)


@dataclasses.dataclass
class ModelConfig:
    """The model (the Pythia-style model or a LLaVA-style decoder), its sizes, and the
    checkpoint it starts from."""

    model: str = option("pythia", "pythia: the Pythia-style model SOrT was published with; "
                        "llava: a LLaVA-style decoder VLM whose answers are tokens (docs/vlm.md; "
                        "default: %(default)s)", choices=MODELS, trajectory=True)
    hidden_dim: int = option(64, "LSTM, attention and text-classifier width; with --model llava "
                             "the decoder's width (default: %(default)s)", parse=positive_int,
                             trajectory=True)
    joint_dim: int = option(128, "joint embedding width (where Grad-CAM vectors live) and "
                            "image-classifier width; with --model llava the decoder's MLP "
                            "width (default: %(default)s)", parse=positive_int, trajectory=True)
    decoder_layers: int = option(2, "--model llava: decoder layers (default: %(default)s)",
                                 parse=positive_int, trajectory=True)
    decoder_heads: int = option(4, "--model llava: attention heads, half as many key/value "
                                "heads when even (default: %(default)s)", parse=positive_int,
                                trajectory=True)
    gradcam_layer: int = option(-1, "--model llava: the decoder layer whose output at the answer "
                                "position is the fusion layer Grad-CAM is taken at; -1, the "
                                "last, has the closed form, another layer takes autograd double "
                                "backward through the layers above it (default: %(default)s)",
                                parse=int, trajectory=True)
    lora: int = option(0, "--model llava: train only LoRA adapters of this rank (peft) on the "
                       "decoder's attention projections; 0 trains every weight (default: "
                       "%(default)s)", parse=non_negative_int, metavar="R", trajectory=True)
    lora_alpha: float = option(16.0, "--model llava: LoRA scaling alpha (default: %(default)s)",
                               parse=positive_float, trajectory=True)
    hf_model: Optional[str] = option(None, "--model llava: start from this local "
                                     "save_pretrained Llava folder (its sizes and weights; "
                                     "nothing is downloaded)", parse=existing_dir,
                                     metavar="DIR", trajectory=True)
    dropout: float = option(0.1, "dropout on the joint embedding and in the classifier; with "
                            "--model llava on the attention weights (default: %(default)s)",
                            parse=probability, trajectory=True)
    image_glimpses: int = option(1, "attention heads over the image regions, concatenated "
                                 "(Pythia: 2; default: %(default)s)", parse=positive_int,
                                 trajectory=True)
    input_ablation: str = option("none", "shortcut probes: text-only zeroes every region "
                                 "feature, image-only replaces every question by one token "
                                 "(default: %(default)s)", choices=INPUT_ABLATIONS,
                                 trajectory=True)
    init: Optional[str] = option(None, "start from the model weights of this checkpoint "
                                 "(fine-tuning, as SOrT fine-tunes a trained Pythia); optimizer "
                                 "and step start fresh", parse=existing_file, metavar="CKPT",
                                 trajectory=True)


@dataclasses.dataclass
class ObjectiveConfig:
    """The training loss (``--loss``) and its weights."""

    loss: str = option("sort", "bce: plain model, BCE on all questions; squint: BCE plus "
                       "attention alignment of reasoning and sub-questions (Selvaraju et al. "
                       "2020); sort-sq: SOrT with sub-questions only; sort: full SOrT; "
                       "role-bce: SOrT's per-role BCE weights (--lambda-reasoning/-sub/"
                       "-irrelevant) without its Grad-CAM term, a control (default: "
                       "%(default)s)", choices=LOSSES, trajectory=True)
    lambda_reasoning: float = option(2.27, "SOrT weight of the reasoning questions' BCE "
                                     "(default: %(default)s)", parse=non_negative_float,
                                     trajectory=True)
    lambda_sub: float = option(2.27, "SOrT weight of the sub-questions' BCE (default: "
                               "%(default)s)", parse=non_negative_float, trajectory=True)
    lambda_irrelevant: float = option(3e-4, "SOrT weight of the irrelevant questions' BCE "
                                      "(default: %(default)s)", parse=non_negative_float,
                                      trajectory=True)
    margin: float = option(0.0, "hinge margin of the contrastive gradient loss (default: "
                           "%(default)s)", parse=non_negative_float, trajectory=True)
    lambda_attention: float = option(1.0, "SQuINT weight of the attention alignment loss "
                                     "(default: %(default)s)", parse=non_negative_float,
                                     trajectory=True)
    autograd_reference: bool = option(
        False, "compute Grad-CAM gradients with plain autograd (autograd.grad("
        "create_graph=True)) instead of the closed-form head_gradcam, and the loss with its "
        "PyTorch backend (the reference the fast paths are tested against)", trajectory=True,
        evaluate=True, deprecated=("--naive",),
        evaluate_help="compute Grad-CAM gradients with plain autograd (autograd.grad("
                      "create_graph=True)) instead of the closed-form head_gradcam")


@dataclasses.dataclass
class OptimConfig:
    """Adamax (as Pythia), its schedule, and the batches it steps on."""

    batch_groups: int = option(
        64, "groups (reasoning question + its sub/irrelevant questions) per step, split "
        "between the processes of a torchrun launch (default: %(default)s)",
        parse=positive_int, trajectory=True, evaluate=True,
        evaluate_help="groups per evaluation batch (default: %(default)s)")
    lr: float = option(3e-3, "learning rate after warm-up (default: %(default)s)",
                       parse=positive_float, trajectory=True)
    warmup_steps: int = option(50, "linear learning-rate warm-up from 0, then constant "
                               "(default: %(default)s)", parse=non_negative_int,
                               trajectory=True)
    grad_clip: float = option(0.25, "clip the gradient norm to this value; 0 disables "
                              "(default: %(default)s)", parse=non_negative_float,
                              trajectory=True)
    max_steps: int = option(0, "optimizer steps to train; 0 means --epochs full passes "
                            "(default: %(default)s)", parse=non_negative_int)
    epochs: int = option(15, "passes over the training groups when --max-steps is 0 "
                         "(default: %(default)s)", parse=positive_int)


@dataclasses.dataclass
class RunConfig:
    """Where and how this run executes: output folder, device, seed, schedule of evaluations,
    checkpoints and logs, and the speed options."""

    out: str = option("runs/sort", "output directory: train.log, log.jsonl, checkpoint.pt, "
                      "config.yaml, metrics.json, table1.md, plots (default: %(default)s)",
                      control=True, evaluate=True, from_checkpoint=True,
                      evaluate_help=f"output directory (default: an '{EVAL_DIR}' directory "
                                    "beside the checkpoint)")
    resume: bool = option(False, "continue the run in OUT from its checkpoint, with the flags "
                          "stored there (no need to repeat them; a flag given again that "
                          "would change the training trajectory must match); bit-identical "
                          "to an uninterrupted run on CPU", control=True, group="start")
    overwrite: bool = option(False, "start afresh even though OUT holds a checkpoint, "
                             "replacing that run's outputs (without it, such an OUT is "
                             "refused)", control=True, group="start")
    seed: int = option(0, "seed of initialisation, dropout and data order (default: "
                       "%(default)s)", parse=int, trajectory=True)
    device: str = option("auto", "where to run; auto picks CUDA when available (default: "
                         "%(default)s)", choices=("auto", "cpu", "cuda"), evaluate=True)
    threads: int = option(1, "CPU threads of each process's torch operations; 0 keeps torch's "
                          "default. The model is small, so extra threads mostly add "
                          "synchronisation, and suffer most on a shared machine (default: "
                          "%(default)s)", parse=non_negative_int, evaluate=True)
    plots: bool = option(True, "write metrics.json and table1.md without the plots (saves a "
                         "few seconds per report, e.g. in a protocol of many runs)",
                         flag="--no-plots", control=True, evaluate=True)
    eval_every: int = option(230, "evaluate every N steps (0: only at the end; default: "
                             "%(default)s)", parse=non_negative_int)
    save_every: int = option(230, "write the checkpoint every N steps (0: only at the end; "
                             "default: %(default)s)", parse=non_negative_int)
    log_every: int = option(10, "read the loss parts from the device every N steps (one host "
                            "sync per N steps; every step is still logged, and a non-finite "
                            "loss stops the run at the next read; default: %(default)s)",
                            parse=positive_int)
    compile: bool = option(False, "run the model and the objective of each step under "
                           "torch.compile (the first steps compile; results equal eager's "
                           "within float rounding)")
    cuda_graphs: bool = option(False, "CUDA only, one process: pad every batch to one of a "
                               "few static shapes and run the step compiled with CUDA graphs "
                               "(torch.compile mode reduce-overhead, a capturable optimizer); "
                               "losses equal the unpadded step's within float rounding",
                               trajectory=True)
    workers: int = option(0, "DataLoader processes that read and pack the next batches while "
                          "the step runs (0: the training process does it; real data reads "
                          "its region features there; default: %(default)s)",
                          parse=non_negative_int)
    amp: str = option("none", "mixed precision: the step under torch.autocast in bfloat16 or "
                      "float16 (fp16 with gradient scaling); default: %(default)s",
                      choices=("none", "bf16", "fp16"), trajectory=True)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig,
            "optim": OptimConfig, "run": RunConfig}
SECTION_TITLES = {"data": "data", "model": "model", "objective": "loss",
                  "optim": "optimizer (Adamax, as Pythia)", "run": "run"}
# flag names of older versions, as checkpoints written by them store them
RENAMED = {"naive": "autograd_reference"}


@dataclasses.dataclass
class TrainConfig:
    """Everything ``python -m sort_fast.train`` is told, in five sections (docs/training.md).
    Field names are unique over the sections and are the flags' names (``lr`` is ``--lr``);
    ``given`` holds the names set explicitly (on the command line or in a ``--config`` file),
    which ``--resume`` must not replace with the checkpoint's values."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    given: FrozenSet[str] = frozenset()

    def sections(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}

    def fields(self) -> Iterator[Tuple[Any, dataclasses.Field]]:
        """``(section, field)`` for every flag of the configuration."""
        for section in self.sections().values():
            for field in flag_fields(section):
                yield section, field

    def flags(self) -> Dict[str, Any]:
        """Every value by flag name (``{"lr": 0.003, ...}``): what checkpoints store."""
        return {field.name: getattr(section, field.name) for section, field in self.fields()}

    def nested(self) -> Dict[str, Dict[str, Any]]:
        """The values by section (the layout of ``config.yaml`` and ``--config`` files)."""
        return {name: dataclasses.asdict(section) for name, section in self.sections().items()}

    def replace(self, values: Mapping[str, Any]) -> "TrainConfig":
        """A copy with the flags ``values`` (by flag name; old names of :data:`RENAMED` are
        read as their new ones, other unknown names are ignored) set."""
        values = {RENAMED.get(k, k): v for k, v in values.items()}
        return dataclasses.replace(self, **{
            name: dataclasses.replace(section, **{f.name: values[f.name]
                                                  for f in flag_fields(section)
                                                  if f.name in values})
            for name, section in self.sections().items()})

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "TrainConfig":
        """The configuration of parsed flags (:func:`build_train_parser`); ``args.explicit``,
        when set, becomes ``given``."""
        config = cls().replace(vars(args))
        return dataclasses.replace(config, given=frozenset(getattr(args, "explicit", ())))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.nested(), sort_keys=False)


def marked(cls: type = TrainConfig, **marks: bool) -> Tuple[str, ...]:
    """The flag names of ``cls``'s fields (a section or :class:`TrainConfig`) whose marks
    equal ``marks`` (``marked(trajectory=True)``)."""
    sections = list(SECTIONS.values()) if cls is TrainConfig else [cls]
    return tuple(f.name for section in sections for f in flag_fields(section)
                 if all(getattr(mark(f), k) == v for k, v in marks.items()))


def trajectory_changes(config: TrainConfig, stored: Mapping[str, Any]) -> List[str]:
    """The flags of ``config.given`` marked ``trajectory`` whose value differs from the one a
    checkpoint's ``stored`` flags record (a flag it does not record had its default), as
    ``--flag STORED (this run: VALUE)``."""
    stored = {RENAMED.get(k, k): v for k, v in stored.items()}
    changed = []
    for section, field in config.fields():
        if not (mark(field).trajectory and field.name in config.given):
            continue
        before, now = stored.get(field.name, field.default), getattr(section, field.name)
        if before != now:
            changed.append(f"{flag_name(field)} {before!r} (this run: {now!r})")
    return changed


def resumed_config(config: TrainConfig, stored: Mapping[str, Any]) -> TrainConfig:
    """``--resume``: every flag not in ``config.given`` and not marked ``control`` takes the
    checkpoint's ``stored`` value; a given flag marked ``trajectory`` must keep it (all
    mismatches in one :class:`CLIError`)."""
    changed = trajectory_changes(config, stored)
    if changed:
        raise CLIError("cannot resume: the checkpoint was trained with " + ", ".join(changed)
                       + "; leave these flags out to continue with the checkpoint's values")
    control = set(marked(control=True))
    stored = {RENAMED.get(k, k): v for k, v in stored.items()}
    return config.replace({k: v for k, v in stored.items()
                           if k not in config.given and k not in control})


class _DeprecatedFlag(argparse.Action):
    """An old spelling of an on/off flag: sets it, with one warning line on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "",
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help=f"deprecated spelling of {new}")
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        if not getattr(parser, "quiet", False):
            print(f"{parser.prog}: warning: {option_string} is deprecated, use {self.new}",
                  file=sys.stderr)
        setattr(namespace, self.dest, True)


def _add_section_flags(parser: argparse.ArgumentParser, cls: type, title: str, *,
                       evaluator: bool, exclusive: Dict[str, Any]) -> None:
    group = parser.add_argument_group(title)
    add_flags(group, cls, evaluator=evaluator, groups=exclusive)
    for field in flag_fields(cls):
        if evaluator and not mark(field).evaluate:
            continue
        for old in mark(field).deprecated:
            group.add_argument(old, dest=field.name, action=_DeprecatedFlag,
                               new=flag_name(field))


def build_train_parser() -> OneLineParser:
    """The parser of ``python -m sort_fast.train``, generated from :class:`TrainConfig`."""
    p = OneLineParser(
        prog="python -m sort_fast.train",
        description="Train a Pythia-style VQA model with SOrT (or a baseline loss) and evaluate "
                    "it. Without data flags it uses the embedded synthetic benchmark.")
    p.add_argument("--config", type=existing_file, default=None, metavar="FILE",
                   help="YAML or JSON file of settings by section (the layout of a run's "
                        "config.yaml); flags on the command line override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as YAML and exit")
    exclusive: Dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        _add_section_flags(p, cls, SECTION_TITLES[name], evaluator=False, exclusive=exclusive)
    return p


@dataclasses.dataclass
class EvaluatorOnly:
    """The evaluator's flags that training does not have."""

    checkpoint: str = option(None, "a checkpoint.pt written by training, or the run folder "
                             "holding it (the trainer's --out)", parse=existing_path,
                             positional=True, evaluate=True)
    synthetic_split: Optional[str] = option(
        None, "split of the synthetic benchmark to evaluate on: val (the one training reports "
        "and tuning may look at) or test (held out for final numbers; default: as in "
        "training, i.e. val)", choices=("val", "test"), evaluate=True)


def build_evaluate_parser() -> OneLineParser:
    """The parser of ``python -m sort_fast.evaluate``: :class:`EvaluatorOnly`'s flags and the
    fields of :class:`TrainConfig` marked ``evaluate``."""
    p = OneLineParser(
        prog="python -m sort_fast.evaluate",
        description="Evaluate a checkpoint: consistency quadrants, accuracy, Grad-CAM ranking "
                    "metrics and grounding; writes metrics.json, table1.md and plots.")
    exclusive: Dict[str, Any] = {}
    _add_section_flags(p, EvaluatorOnly, "evaluation", evaluator=True, exclusive=exclusive)
    for name, cls in SECTIONS.items():
        _add_section_flags(p, cls, SECTION_TITLES[name], evaluator=True, exclusive=exclusive)
    return p


def read_config_file(path: str) -> Dict[str, Any]:
    """The flags a ``--config`` file sets, by flag name, checked as the command line checks
    them; a file that cannot be read or parsed, an unknown section or key, or a bad value is
    a :class:`CLIError` naming the file and the item."""
    import yaml  # JSON is YAML too

    try:
        content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = next(iter(str(e).splitlines()), type(e).__name__)
        raise CLIError(f"--config {path}: cannot read it ({reason})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise CLIError(f"--config {path}: expected sections {', '.join(SECTIONS)}, got "
                       f"{type(content).__name__}")
    values: Dict[str, Any] = {}
    for name, settings in content.items():
        if name not in SECTIONS:
            raise CLIError(f"--config {path}: unknown section {name!r} (sections: "
                           f"{', '.join(SECTIONS)})")
        if not isinstance(settings, dict):
            raise CLIError(f"--config {path}: section {name!r} must map names to values")
        fields = {f.name: f for f in flag_fields(SECTIONS[name])}
        for key, value in settings.items():
            if key not in fields:
                raise CLIError(f"--config {path}: unknown key {name}.{key}")
            try:
                values[key] = checked_value(fields[key], value)
            except ValueError as e:
                raise CLIError(f"--config {path}: {name}.{key}: {e}") from None
    return values


def explicit_flags(build: Callable[[], argparse.ArgumentParser],
                   argv: Optional[Sequence[str]]) -> List[str]:
    """The destinations of the flags given on the command line ``argv`` (not defaulted), from
    the parser ``build()`` makes."""
    parser = build()
    parser.quiet = True  # a deprecated spelling warned in the first parse already
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return sorted(vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))


def parse_train_args(argv: Optional[Sequence[str]] = None) -> Tuple[TrainConfig, bool]:
    """The :class:`TrainConfig` of the command line ``argv`` (``sys.argv[1:]`` when ``None``):
    defaults, then a ``--config`` file's values, then the flags given; and whether
    ``--print-config`` was given. Errors end the program with one line (exit 2)."""
    parser = build_train_parser()
    args = parser.parse_args(argv)
    given = set(explicit_flags(build_train_parser, argv)) - {"config", "print_config"}
    if args.config is not None:
        try:
            from_file = read_config_file(args.config)
        except CLIError as e:
            parser.error(str(e))
        parser.set_defaults(**from_file)
        parser.quiet = True  # a deprecated spelling warned in the first parse already
        args = parser.parse_args(argv)
        given |= set(from_file)
    if args.resume and args.overwrite:
        parser.error("argument --overwrite: not allowed with argument --resume")
    config = TrainConfig.from_namespace(args)
    return dataclasses.replace(config, given=frozenset(given)), args.print_config


def require_all(args: argparse.Namespace, names: Sequence[str]) -> bool:
    """True when every flag in ``names`` is set, False when none is; a partial set is a
    :class:`CLIError` naming the missing flags."""
    given = [n for n in names if getattr(args, n) is not None]
    if given and len(given) != len(names):
        missing = ", ".join("--" + n.replace("_", "-") for n in names if n not in given)
        raise CLIError(f"real data needs {missing} as well")
    return bool(given)

