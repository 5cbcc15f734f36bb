"""The trainer's typed configuration (docs/training.md, "Configuration"): the command line
generated from it keeps every flag and value of the hand-written parser it replaced (the
recorded Table 1 commands parse to the same values), ``--config`` files get the flags' checks,
``--print-config`` and ``config.yaml`` round-trip, the trajectory marks drive ``--resume``'s
check, and ``--naive`` is a deprecated spelling of ``--autograd-reference``."""
from __future__ import annotations

import dataclasses
import glob
import json
import shlex
from pathlib import Path

import pytest
import yaml

from sort_fast.errors import CLIError
from sort_fast.train import main, train
from sort_fast.training import TrainConfig
from sort_fast.training import checkpoint as ckpt
from sort_fast.training.config import (
    OptimConfig,
    build_evaluate_parser,
    build_train_parser,
    command_line,
    marked,
    parse_train_args,
    read_config_file,
    resumed_config,
)
from sort_fast.training.flags import option

ROOT = Path(__file__).resolve().parents[1]
# the defaults of the hand-written parser the generated one replaced (naive: its old name)
OLD_DEFAULTS = {
    "out": "runs/sort", "max_steps": 0, "epochs": 15, "batch_groups": 64, "device": "auto",
    "threads": 1, "plots": True, "autograd_reference": False, "seed": 0, "eval_every": 230,
    "save_every": 230, "log_every": 10, "compile": False, "workers": 0, "amp": "none",
    "resume": False, "overwrite": False, "init": None, "loss": "sort", "lambda_reasoning": 2.27,
    "lambda_sub": 2.27, "lambda_irrelevant": 0.0003, "margin": 0.0, "lambda_attention": 1.0,
    "lr": 0.003, "warmup_steps": 50, "grad_clip": 0.25, "hidden_dim": 64, "joint_dim": 128,
    "dropout": 0.1, "image_glimpses": 1, "input_ablation": "none", "synthetic_seed": 0,
    "synthetic_train_groups": 3000, "synthetic_design": "v1", "introspect": None,
    "vqa_questions": None, "vqa_annotations": None, "features": None,
    "synthetic_val_groups": 1000, "val_introspect": None, "val_vqa_questions": None,
    "val_vqa_annotations": None, "val_features": None, "hat_dir": None}
ADDED_SINCE = {"cuda_graphs": False, "model": "pythia", "decoder_layers": 2, "decoder_heads": 4,
               "gradcam_layer": -1, "lora": 0, "lora_alpha": 16.0, "hf_model": None}
# the hand-kept lists the marks replaced
OLD_TRAJECTORY_FLAGS = (
    "seed", "batch_groups", "loss", "lambda_reasoning", "lambda_sub", "lambda_irrelevant",
    "margin", "lambda_attention", "lr", "warmup_steps", "grad_clip", "hidden_dim", "joint_dim",
    "dropout", "naive", "init", "synthetic_seed", "synthetic_train_groups", "introspect",
    "vqa_questions", "vqa_annotations", "features", "amp", "synthetic_design", "image_glimpses",
    "input_ablation")
OLD_RUN_CONTROL_FLAGS = ("out", "resume", "overwrite", "plots")
TINY = ["--synthetic-train-groups", "40", "--synthetic-val-groups", "20", "--hidden-dim", "16",
        "--joint-dim", "32", "--batch-groups", "8", "--warmup-steps", "2", "--device", "cpu",
        "--eval-every", "0", "--no-plots"]


def _recorded_commands():
    for path in sorted(glob.glob(str(ROOT / "docs" / "table1_*_world*.json"))):
        data = json.loads(Path(path).read_text())
        for entries in data["methods"].values():
            for entry in entries:
                for key in ("init_command", "train_command", "test_command"):
                    if key in entry:
                        yield entry[key]


def _literal_values(words, defaults):
    """The values the old parser gave the flags of ``words``: each value converted to its
    default's type (paths stay text), on/off flags switched."""
    values, i = dict(defaults), 0
    while i < len(words):
        dest = words[i][2:].replace("-", "_")
        if words[i] == "--no-plots":
            values["plots"] = False
        elif isinstance(defaults.get(dest), bool):
            values[dest] = True
        else:
            old = OLD_DEFAULTS.get(dest)
            kind = type(old) if old is not None else str
            values[dest] = kind(words[i + 1])
            i += 1
        i += 1
    return values


def test_recorded_table1_commands_parse_to_the_same_values(tmp_path):
    """Every recorded command of docs/table1_*_world*.json parses to the values the
    hand-written parser gave it (its files replaced by existing ones, as when rerun)."""
    stand_in = tmp_path / "checkpoint.pt"
    stand_in.write_bytes(b"")
    commands = list(_recorded_commands())
    assert len(commands) > 100
    for command in commands:
        words = shlex.split(command)[3:]  # after python -m module
        module = shlex.split(command)[2]
        words = [str(stand_in) if w.endswith("checkpoint.pt") else w for w in words]
        if module == "sort_fast.train":
            config, _ = parse_train_args(words)
            assert config.flags() == _literal_values(words, {**OLD_DEFAULTS, **ADDED_SINCE}), \
                command
            assert config.given == {w[2:].replace("-", "_") for w in words
                                    if w.startswith("--")} - {"no_plots"} | (
                {"plots"} if "--no-plots" in words else set())
        else:
            assert module == "sort_fast.evaluate"
            args = vars(build_evaluate_parser().parse_args(words))
            defaults = {k: None if k in ("out", "synthetic_seed", "synthetic_val_groups",
                                         "synthetic_split") else v
                        for k, v in OLD_DEFAULTS.items() if k in args}
            expected = _literal_values(words[1:], {**defaults, "synthetic_split": ""})
            expected["synthetic_split"] = expected["synthetic_split"] or None
            assert args == {"checkpoint": str(stand_in), **expected}, command


def test_generated_defaults_and_marks_are_the_old_ones():
    assert TrainConfig().flags() == {**OLD_DEFAULTS, **ADDED_SINCE}
    renamed = {"naive": "autograd_reference"}
    assert {renamed.get(n, n) for n in OLD_TRAJECTORY_FLAGS} <= set(marked(trajectory=True))
    # and those added since: --cuda-graphs pads batches, which changes dropout's masks; the
    # decoder's model flags
    assert set(marked(trajectory=True)) - {renamed.get(n, n) for n in OLD_TRAJECTORY_FLAGS} \
        == set(ADDED_SINCE)
    assert set(marked(control=True)) == set(OLD_RUN_CONTROL_FLAGS)


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ["--no-plots" if name == "plots" else "--" + name.replace("_", "-")
                 for name in TrainConfig().flags()] + ["--naive", "--config", "--print-config"]:
        assert flag in text, flag


def test_a_new_trajectory_field_is_checked_on_resume():
    """A field added with the trajectory mark joins --resume's check without other code."""
    @dataclasses.dataclass
    class WithMomentum(OptimConfig):
        momentum: float = option(0.0, "momentum", trajectory=True)

    config = dataclasses.replace(TrainConfig(), optim=WithMomentum(momentum=0.9),
                                 given=frozenset({"momentum"}))
    with pytest.raises(CLIError, match=r"--momentum 0.5 \(this run: 0.9\)"):
        resumed_config(config, {**TrainConfig().flags(), "momentum": 0.5})
    same = resumed_config(config, {**TrainConfig().flags(), "momentum": 0.9, "lr": 0.01})
    assert same.optim.momentum == 0.9 and same.optim.lr == 0.01
    # not given: the checkpoint's value is taken
    taken = resumed_config(dataclasses.replace(config, given=frozenset()),
                           {**TrainConfig().flags(), "momentum": 0.5})
    assert taken.optim.momentum == 0.5


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_sets_flags_and_the_command_line_overrides_it(suffix, tmp_path):
    settings = {"optim": {"lr": 0.01, "batch_groups": 8}, "objective": {"loss": "bce"},
                "run": {"plots": False}}
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(settings) if suffix == ".json" else yaml.safe_dump(settings))
    config, _ = parse_train_args(["--config", str(path), "--lr", "0.02"])
    assert (config.optim.lr, config.optim.batch_groups, config.objective.loss,
            config.run.plots) == (0.02, 8, "bce", False)
    assert {"lr", "batch_groups", "loss", "plots"} <= config.given
    assert "config" not in config.flags()


@pytest.mark.parametrize("content, message", [
    ("optim: {lr: -1}", "optim.lr: expected a number > 0, got '-1'"),
    ("optim: {learning_rate: 0.1}", "unknown key optim.learning_rate"),
    ("optimizer: {lr: 0.1}", "unknown section 'optimizer'"),
    ("objective: {loss: mse}", "objective.loss: invalid choice 'mse'"),
    ("run: {plots: maybe}", "run.plots: expected true or false"),
    ("model: {init: /no/such.pt}", "model.init: no such file: /no/such.pt"),
    ("optim: [1, 2]", "section 'optim' must map names to values"),
    ("optim: {lr: [", "cannot read it"),
])
def test_bad_config_file_is_one_line_naming_file_and_item(content, message, tmp_path,
                                                           capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"--config {path}: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_print_config_round_trips_and_trains_nothing(tmp_path, capsys):
    assert main(["--print-config", "--lr", "0.02", "--loss", "squint", "--out",
                 str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    config, _ = parse_train_args(["--config", str(path)])
    assert config.flags() == {**TrainConfig().flags(), "lr": 0.02, "loss": "squint",
                              "out": str(tmp_path / "out")}


def test_run_folder_holds_its_resolved_config_and_the_python_api(tmp_path):
    """``train(TrainConfig)`` trains; the run folder's config.yaml holds the configuration
    (after --resume: the checkpoint's values), and reads back as a --config file."""
    out = tmp_path / "run"
    config, _ = parse_train_args(["--out", str(out), *TINY, "--max-steps", "2", "--lr", "0.01"])
    result = train(config)
    assert result.metrics is not None
    assert read_config_file(str(out / "config.yaml")) == config.flags()
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["config"] == config.flags()
    assert main(["--out", str(out), "--resume", "--max-steps", "3"]) == 0
    assert read_config_file(str(out / "config.yaml"))["lr"] == 0.01


def test_naive_is_a_deprecated_spelling_and_old_checkpoints_resume(tmp_path, capsys):
    config, _ = parse_train_args(["--naive"])
    assert config.objective.autograd_reference and "autograd_reference" in config.given
    err = capsys.readouterr().err
    assert err == ("python -m sort_fast.train: warning: --naive is deprecated, use "
                   "--autograd-reference\n")
    # a checkpoint of an older version stores the flag as "naive": it is compared as the new
    out = tmp_path / "run"
    assert main(["--out", str(out), *TINY, "--max-steps", "2"]) == 0
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    state["config"]["naive"] = state["config"].pop("autograd_reference")
    ckpt.save_checkpoint({k: v for k, v in state.items() if k not in ("format", "sha256")},
                         out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["--out", str(out), "--resume", "--autograd-reference"]) == 2
    err = capsys.readouterr().err
    assert "--autograd-reference False (this run: True)" in err and err.count("\n") == 1
    assert main(["--out", str(out), "--resume", "--max-steps", "3"]) == 0
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["config"]["autograd_reference"] is False


def test_resume_command_spells_the_new_flag_once():
    config, _ = parse_train_args(["--naive", "--lr", "0.01"])
    line = command_line("prog", build_train_parser(), config.flags(), resume=True)
    assert line == "prog --autograd-reference --lr 0.01 --resume"
