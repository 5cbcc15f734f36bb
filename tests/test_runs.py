"""Reliability of training runs: checksummed checkpoints, the run-folder lock, SIGINT/SIGTERM
(save, print the resume command, resume bit-for-bit), write failures, stale temporary files,
``--overwrite``, resuming a finished run (and completing its report) and refusing a resume on
changed data."""
from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from sort_fast.errors import CLIError
from sort_fast.evaluate import main as evaluate_main
from sort_fast.train import main
from sort_fast.training import checkpoint as ckpt
from sort_fast.training import data as training_data
from sort_fast.training import plots
from test_train import TINY, assert_same_params, metrics, params, run, steps_logged

STEPS = 12
FLAGS = ["--max-steps", str(STEPS), "--save-every", "0", "--eval-every", "0", "--log-every", "1"]
# the trainer in a subprocess, each step slowed by 0.1 s so that a signal surely lands mid-run
SLOW_TRAINER = """
import sys, time
from sort_fast.training import objective
call = objective.Objective.__call__
def slow_call(self, model, batch):
    time.sleep(0.1)
    return call(self, model, batch)
objective.Objective.__call__ = slow_call
from sort_fast.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("reference")
    assert run(out, *FLAGS) == 0
    return out


def error_line(capsys) -> str:
    """The error line of the captured stderr (the only one besides log lines)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def flip_tensor_byte(path: Path) -> None:
    """Flips one byte in the middle of the checkpoint's largest tensor record."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    start = header + 30 + int.from_bytes(raw[header + 26:header + 28], "little") + \
        int.from_bytes(raw[header + 28:header + 30], "little")
    raw[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_or_truncated_checkpoint_is_refused(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    flip_tensor_byte(out / "checkpoint.pt")
    capsys.readouterr()
    assert evaluate_main([str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval")]) == 2
    err = error_line(capsys)
    assert "damaged checkpoint" in err and str(out / "checkpoint.pt") in err
    assert run(out, *FLAGS, "--resume") == 2
    assert "damaged checkpoint" in error_line(capsys)
    whole = (reference / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(whole[:len(whole) * 2 // 3])
    with pytest.raises(CLIError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(out / "checkpoint.pt")


def test_checkpoint_without_checksum_is_read_with_a_warning(reference, tmp_path, caplog,
                                                            monkeypatch):
    state = torch.load(reference / "checkpoint.pt", weights_only=True)
    del state["sha256"]
    torch.save({**state, "format": 1}, tmp_path / "old.pt")
    monkeypatch.setattr(logging.getLogger("sort_fast"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="sort_fast"):
        old = ckpt.load_checkpoint(tmp_path / "old.pt", ckpt.TRAINING_KEYS)
    assert "no checksum" in caplog.text and "old.pt" in caplog.text
    assert_same_params(old["model"], params(reference))
    torch.save({**state, "format": 2}, tmp_path / "unsummed.pt")  # the current format needs one
    with pytest.raises(CLIError, match="damaged checkpoint"):
        ckpt.load_checkpoint(tmp_path / "unsummed.pt")


def test_checkpoint_missing_entries_is_a_one_line_error(reference, tmp_path, capsys):
    state = ckpt.load_checkpoint(reference / "checkpoint.pt")
    for key in ("model_config", "config"):
        del state[key]
    out = tmp_path / "run"
    out.mkdir()
    ckpt.save_checkpoint(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert evaluate_main([str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval")]) == 2
    assert "incomplete checkpoint (no model_config)" in error_line(capsys)
    assert run(out, *FLAGS, "--resume") == 2
    assert "incomplete checkpoint (no model_config, config)" in error_line(capsys)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_saves_and_resume_is_bit_identical(signum, reference, tmp_path, capsys):
    """A signalled trainer saves after its current step, prints the resume command and exits
    128 + signal; while it runs, a second trainer on its folder is refused; running the printed
    command finishes the run as the uninterrupted one did."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAINER, "--out", str(out), *TINY,
                             *FLAGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    log = out / "log.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 2):  # two steps trained
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.01)
    assert run(out, *FLAGS, "--overwrite") == 2
    assert "in use by another run" in error_line(capsys)
    proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1].strip().splitlines()
    assert proc.returncode == 128 + signum, err
    saved = ckpt.load_checkpoint(out / "checkpoint.pt")["step"]
    assert 2 <= saved < STEPS
    assert f"stopped by {signum.name} after step {saved}" in err[-2]
    words = shlex.split(err[-1])
    assert words[:3] == ["python", "-m", "sort_fast.train"] and "--resume" in words
    assert main(words[3:]) == 0
    assert_same_params(params(reference), params(out))
    assert metrics(reference) == metrics(out)
    assert steps_logged(out) == list(range(1, STEPS + 1))
    assert f"trained {STEPS - saved} steps in" in (out / "train.log").read_text()


def test_resuming_a_finished_run_keeps_its_report(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    log = (out / "log.jsonl").read_text()
    report = (out / "metrics.json").read_text()
    capsys.readouterr()
    assert run(out, *FLAGS, "--resume") == 0
    assert "| Pythia + SOrT (SQ + IQ) |" in capsys.readouterr().out
    assert (out / "log.jsonl").read_text() == log
    assert (out / "metrics.json").read_text() == report


REPORT = ("metrics.json", "table1.md", *plots.PLOTS, plots.CURVES)


@pytest.mark.parametrize("damage", ["killed while plotting", "plot missing", "table missing"])
def test_resuming_a_finished_run_completes_its_report(damage, reference, tmp_path, monkeypatch,
                                                      capsys):
    """A run stopped while writing its report (Ctrl-C in the plots), or whose report lacks a
    file: --resume evaluates again and writes the whole report, as the uninterrupted run's,
    with one final evaluation in log.jsonl."""
    out = tmp_path / "run"
    if damage == "killed while plotting":
        plot_all = plots.plot_all

        def interrupted(result, out_dir, method):
            plots._quadrants(result, out_dir / plots.PLOTS[0], method)
            raise KeyboardInterrupt

        monkeypatch.setattr(plots, "plot_all", interrupted)
        assert run(out, *FLAGS) == 130
        monkeypatch.setattr(plots, "plot_all", plot_all)
    else:
        shutil.copytree(reference, out)
        (out / ("examples.png" if damage == "plot missing" else "table1.md")).unlink()
    capsys.readouterr()
    assert run(out, *FLAGS, "--resume") == 0
    assert "| Pythia + SOrT (SQ + IQ) |" in capsys.readouterr().out
    assert "already finished" not in (out / "train.log").read_text()
    for name in REPORT:
        assert (out / name).stat().st_size > 0, name
    assert metrics(out) == metrics(reference)
    assert (out / "table1.md").read_text() == (reference / "table1.md").read_text()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records] == [
        *(("train", s) for s in range(1, STEPS + 1)), ("eval", STEPS)]


def test_overwrite_removes_the_old_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--max-steps", "1", "--eval-every", "0") == 0
    empty = tmp_path / "no-hat"
    empty.mkdir()
    # a fresh start that fails after taking the folder: the old run is gone all the same
    assert run(out, "--max-steps", "1", "--overwrite", "--hat-dir", str(empty)) == 2
    assert "no VQA-HAT map" in error_line(capsys)
    # what is left is the new run's: its log and its resolved configuration
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "train.log"]
    assert "hat-dir" not in (out / "config.yaml").read_text()
    assert f"hat_dir: {empty}" in (out / "config.yaml").read_text()
    assert "trained 1 steps" not in (out / "train.log").read_text()  # the new run's log only


def test_overwrite_killed_before_its_first_checkpoint_leaves_no_old_run(tmp_path, monkeypatch,
                                                                        capsys):
    """--overwrite removes the old run (checkpoint, log, report, the evaluator's report)
    before it logs anything: killed at its first step, it leaves nothing --resume could
    continue, so no log mixes the two runs."""
    from sort_fast.training import objective as obj

    out = tmp_path / "run"
    assert run(out, "--max-steps", "3", "--eval-every", "0", "--no-plots") == 0
    assert evaluate_main([str(out), "--no-plots"]) == 0
    assert (out / "eval" / "metrics.json").exists()

    def killed(self, model, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(obj.Objective, "__call__", killed)
    assert run(out, "--max-steps", "2", "--overwrite", "--seed", "1") == 130
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "train.log"]
    assert "seed: 1\n" in (out / "config.yaml").read_text()  # the new run's
    capsys.readouterr()
    assert run(out, "--max-steps", "2", "--resume") == 2
    assert "checkpoint.pt does not exist" in error_line(capsys)


def write_real_data(root: Path, sub_answer: str = "yes") -> list:
    """Tiny VQA-Introspect / VQAv2 / .npy files (one image, one group) and the trainer's data
    flags for them (training and validation on the same files). The answers "yes" (the
    reasoning question's 10) and "red" (the other question's 10) plus ``sub_answer`` make the
    answer vocabulary: ``sub_answer`` comes first."""
    import numpy as np

    root.mkdir(exist_ok=True)
    files = {
        "introspect": {"101": {"reasoning_question": "Is it safe to cross?", "image_id": 42,
                               "reasoning_answer_most_common": "yes",
                               "introspect": [{"pred_q_type": "perception", "sub_qa": [
                                   {"sub_question": "Is the light green?",
                                    "sub_answer": sub_answer}]}]}},
        "questions": {"questions": [{"question_id": 101, "image_id": 42,
                                     "question": "Is it safe to cross?"},
                                    {"question_id": 102, "image_id": 42,
                                     "question": "What colour is the bus?"}]},
        "annotations": {"annotations": [
            {"question_id": q, "image_id": 42, "multiple_choice_answer": a,
             "answers": [{"answer_id": k, "answer": a} for k in range(10)]}
            for q, a in ((101, "yes"), (102, "red"))]},
    }
    for name, content in files.items():
        (root / f"{name}.json").write_text(json.dumps(content))
    (root / "features").mkdir(exist_ok=True)
    np.save(root / "features" / "COCO_val2014_000000000042.npy",
            np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    paths = [str(root / f"{n}.json") for n in files] + [str(root / "features")]
    return [x for prefix in ("--", "--val-") for flag, path in zip(
        ("introspect", "vqa-questions", "vqa-annotations", "features"), paths)
        for x in (prefix + flag, path)]


@pytest.fixture
def noisier_synthetic_generator(monkeypatch):
    """The synthetic benchmark's generator changed (more noise), seed and design as before."""
    class Noisier(training_data.SyntheticIntrospect):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "noise": 0.31})

    training_data.synthetic_split.cache_clear()
    monkeypatch.setattr(training_data, "SyntheticIntrospect", Noisier)
    yield
    monkeypatch.undo()
    training_data.synthetic_split.cache_clear()


def test_resume_refuses_a_changed_synthetic_generator(tmp_path, request, capsys):
    out = tmp_path / "run"
    assert run(out, "--max-steps", "2", "--eval-every", "0", "--no-plots") == 0
    request.getfixturevalue("noisier_synthetic_generator")
    capsys.readouterr()
    assert run(out, "--max-steps", "3", "--resume") == 2
    err = error_line(capsys)
    assert f"cannot resume {out / 'checkpoint.pt'}: its training data differ" in err
    assert "vocabulary" not in err  # the same words, other groups
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["step"] == 2


def test_resume_refuses_changed_data_files(tmp_path, capsys):
    """The same answers in another order (a sub-answer changed in the data files): the answer
    vocabulary (what the classifier's outputs mean) and the training data differ from the
    checkpoint's."""
    data = tmp_path / "data"
    flags = write_real_data(data)
    out = tmp_path / "run"
    assert run(out, *flags, "--max-steps", "1", "--no-plots") == 0
    write_real_data(data, sub_answer="red")
    capsys.readouterr()
    assert run(out, "--max-steps", "2", "--resume") == 2
    err = error_line(capsys)
    assert "its answer vocabulary, training data differ from this run's data" in err
    write_real_data(data)  # the data restored: the run continues
    assert run(out, "--max-steps", "2", "--resume") == 0


def test_checkpoint_without_fingerprint_resumes_with_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--max-steps", "1", "--eval-every", "0", "--no-plots") == 0
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    del state["data_fingerprint"], state["sha256"], state["format"]
    ckpt.save_checkpoint(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert run(out, "--max-steps", "2", "--resume") == 0
    assert "has no data fingerprint" in capsys.readouterr().err
    assert "data_fingerprint" in ckpt.load_checkpoint(out / "checkpoint.pt")


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1180"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["torch", "os"])
def test_failed_checkpoint_write_is_a_one_line_error(failure, tmp_path, monkeypatch, capsys):
    save, calls = torch.save, []

    def fail_second_save(obj, f):
        calls.append(1)
        if len(calls) == 1:
            return save(obj, f)
        f.write(b"half a checkpoint")
        raise failure

    monkeypatch.setattr(ckpt.torch, "save", fail_second_save)
    out = tmp_path / "run"
    assert run(out, "--max-steps", "3", "--save-every", "1", "--eval-every", "0") == 2
    monkeypatch.undo()
    err = error_line(capsys)
    assert f"cannot write {out / 'checkpoint.pt'}" in err and "disk may be full" in err
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["step"] == 1
    assert not list(out.glob(".*.tmp-*"))


def test_run_start_removes_temporary_files_of_dead_processes(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / f".checkpoint.pt.tmp-{dead.pid}", out / f".metrics.json.tmp-{dead.pid}"]
    live = out / f".table1.md.tmp-{os.getppid()}"  # the parent still runs
    for path in (*stale, live):
        path.write_bytes(b"partial")
    assert run(out, "--max-steps", "1", "--eval-every", "0") == 0
    assert not any(p.exists() for p in stale) and live.exists()
