"""``python -m sort_fast.evaluate`` and the shared evaluation routine."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sort_fast.data import SyntheticIntrospect, collate_groups
from sort_fast.evaluate import main as evaluate_main
from sort_fast.models import PythiaConfig, PythiaVQA
from sort_fast.train import main as train_main
from sort_fast.training import checkpoint as ckpt
from sort_fast.training.evaluation import evaluate
from sort_fast.training.metrics_table import COLUMNS, format_table
from sort_fast.training.plots import PLOTS

TINY = ["--synthetic-train-groups", "40", "--synthetic-val-groups", "20", "--hidden-dim", "16",
        "--joint-dim", "32", "--batch-groups", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny SOrT run of 4 steps; returns its output directory."""
    out = tmp_path_factory.mktemp("train")
    assert train_main(["--out", str(out), *TINY, "--max-steps", "4", "--eval-every", "0"]) == 0
    return out


def test_evaluator_writes_report_matching_training(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_main([str(trained / "checkpoint.pt"), "--out", str(out), "--batch-groups",
                          "7"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["method"] == "Pythia + SOrT (SQ + IQ)" and report["step"] == 4
    training = json.loads((trained / "metrics.json").read_text())["metrics"]
    # same model, same validation groups; another batching only changes rounding
    for key, value in training.items():
        if isinstance(value, float):
            assert report["metrics"][key] == pytest.approx(value, abs=1e-5), key
        else:
            assert report["metrics"][key] == value, key
    table = (out / "table1.md").read_text()
    assert table.strip().endswith(printed.strip().splitlines()[-1])
    for header, *_ in COLUMNS:
        assert header in table
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_default_output_directory_is_beside_the_checkpoint(trained):
    assert evaluate_main([str(trained / "checkpoint.pt")]) == 0
    assert (trained / "eval" / "table1.md").exists()


def test_naive_and_closed_form_gradcam_agree(trained):
    state = ckpt.load_checkpoint(trained / "checkpoint.pt")
    model = PythiaVQA(PythiaConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    groups = SyntheticIntrospect(seed=0, split="val", num_groups=20)
    kw = dict(batch_groups=8, device=torch.device("cpu"))
    fused, naive = evaluate(model, groups, **kw), evaluate(model, groups, naive=True, **kw)
    np.testing.assert_allclose(fused.similarity, naive.similarity, atol=1e-5)
    assert fused.metrics["mp1"] == naive.metrics["mp1"]
    assert model.training  # evaluate restores the mode


def test_question_without_an_answer_in_the_vocabulary_is_never_correct(trained):
    state = ckpt.load_checkpoint(trained / "checkpoint.pt")
    model = PythiaVQA(PythiaConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    with torch.no_grad():  # every prediction becomes class 0
        for branch in model.classifier.branches:
            branch[-1].bias.fill_(-1e4)
        model.classifier.branches[0][-1].bias[0] = 1e4
    groups = list(SyntheticIntrospect(seed=0, split="val", num_groups=20))
    # the first reasoning question's answers all lie outside the answer vocabulary
    groups[0] = dataclasses.replace(groups[0], targets=[{}, *groups[0].targets[1:]])
    batch = collate_groups(groups)
    assert int(batch.classes[0]) == 0 and float(batch.targets[0].sum()) == 0.0
    metrics = evaluate(model, groups, batch_groups=8, device=torch.device("cpu")).metrics
    answerable = batch.targets.amax(1) > 0
    assert metrics["accuracy"] == pytest.approx(
        float(((batch.classes == 0) & answerable).double().mean()))
    first = batch.offsets[:-1]
    assert metrics["reasoning_accuracy"] == pytest.approx(
        float(((batch.classes[first] == 0) & answerable[first]).double().mean()))


def test_evaluate_on_more_groups_via_flags(trained, tmp_path):
    out = tmp_path / "more"
    assert evaluate_main([str(trained / "checkpoint.pt"), "--out", str(out),
                          "--synthetic-val-groups", "30"]) == 0
    assert json.loads((out / "metrics.json").read_text())["metrics"]["groups"] == 30


def test_evaluate_on_the_held_out_test_split(trained, tmp_path):
    val, test = tmp_path / "val", tmp_path / "test"
    ckpt_path = str(trained / "checkpoint.pt")
    assert evaluate_main([ckpt_path, "--out", str(val)]) == 0
    assert evaluate_main([ckpt_path, "--out", str(test), "--synthetic-split", "test"]) == 0
    on_val = json.loads((val / "metrics.json").read_text())["metrics"]
    on_test = json.loads((test / "metrics.json").read_text())["metrics"]
    assert on_test["groups"] == on_val["groups"] == 20
    assert on_test["pairs"] != on_val["pairs"] or on_test["mrr"] != on_val["mrr"]


def test_format_table_layout():
    metrics = {k: 0.5 for _, k, _, _ in COLUMNS}
    metrics.update(wpr=0.1, grounding_spearman=None)
    lines = format_table(metrics, "Pythia").splitlines()
    assert lines[0].startswith("| Method | R✓S✓ ↑ | R✓S✗ ↓ | R✗S✓ ↓ | R✗S✗ ↓ | Consistency% ↑")
    assert lines[2] == "| Pythia | " + " | ".join(["50.00"] * 10 + ["10.00", "–"]) + " |"


def test_bad_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "sort_fast.evaluate", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err and "not a readable checkpoint" in err


def _newer_format(state):
    state["format"] = ckpt.FORMAT + 1


def _unknown_key(state):
    state["model_config"]["attention_heads"] = 4


def _nan_weight(state):
    state["model"]["classifier.branches.0.0.parametrizations.weight.original1"][0, 0] = float(
        "nan")


def _other_width(state):
    state["model_config"]["joint_dim"] = 48


def _missing_key(state):
    del state["model_config"]["vocab_size"]


@pytest.mark.parametrize("change, message", [
    (_newer_format, f"checkpoint format {ckpt.FORMAT + 1} is newer than this version of "
                    "sort_fast reads"),
    (_unknown_key, "unknown model_config key 'attention_heads'"),
    (_nan_weight, "weight 'classifier.branches.0.0.parametrizations.weight.original1' is not "
                  "finite"),
    (_other_width, "has shape"),
    (_missing_key, "model_config has no 'vocab_size'"),
], ids=["newer-format", "unknown-key", "nan-weight", "config-mismatch", "missing-key"])
def test_unusable_checkpoint_is_one_line_naming_file_and_key(change, message, trained, tmp_path,
                                                              capsys):
    state = ckpt.load_checkpoint(trained / "checkpoint.pt")
    change(state)
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint({k: v for k, v in state.items() if k not in ("format", "sha256")},
                         path)
    if change is _newer_format:  # save_checkpoint writes the current format
        state["sha256"] = ckpt.content_digest(state)
        torch.save(state, path)
    capsys.readouterr()
    assert evaluate_main([str(path), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert message in err and str(path) in err


def test_missing_checkpoint_and_bad_flag(tmp_path, capsys):
    for argv in ([str(tmp_path / "missing.pt")], [str(tmp_path), "--batch-groups", "-3"]):
        with pytest.raises(SystemExit) as e:
            evaluate_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ("no such file" in err or "--batch-groups" in err)


def test_run_folder_is_accepted(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_main([str(trained), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["step"] == 4
    capsys.readouterr()
    assert evaluate_main([str(tmp_path)]) == 2  # a folder without a checkpoint
    err = capsys.readouterr().err
    assert "holds no checkpoint.pt" in err and err.count("\n") == 1


def test_evaluate_help_speaks_of_evaluation(capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "summed over all processes" not in text and "PyTorch backend" not in text
    assert "run folder" in text and "groups per evaluation batch" in text
