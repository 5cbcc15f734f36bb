"""``python -m sort_fast.train``: outputs, determinism, resume (also after SIGKILL), atomic
checkpoints, flag errors, ``--help`` and two-process training (gloo)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from sort_fast.errors import CLIError
from sort_fast.train import main
from sort_fast.training import checkpoint as ckpt

TINY = ["--synthetic-train-groups", "40", "--synthetic-val-groups", "20", "--hidden-dim", "16",
        "--joint-dim", "32", "--batch-groups", "8", "--warmup-steps", "2", "--device", "cpu"]
STEPS = 6


def run(out: Path, *flags: str) -> int:
    """Runs the trainer in this process (no interpreter start-up) and returns its exit code."""
    return main(["--out", str(out), *TINY, *flags])


def params(out: Path) -> Dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(out / "checkpoint.pt")["model"]


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["metrics"]


def steps_logged(out: Path) -> List[int]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if r["event"] == "train"]


def assert_same_params(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sort_fast.train", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps, evaluating and saving every 3."""
    out = tmp_path_factory.mktemp("base")
    assert run(out, "--max-steps", str(STEPS), "--eval-every", "3", "--save-every", "3") == 0
    return out


def test_no_plots_writes_the_report_without_images(tmp_path):
    assert run(tmp_path, "--max-steps", "2", "--eval-every", "0", "--no-plots") == 0
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "table1.md").exists()
    assert not list(tmp_path.glob("*.png"))


def test_short_run_writes_every_output(base, capsys):
    for name in ("checkpoint.pt", "log.jsonl", "metrics.json", "table1.md", "train.log",
                 "quadrants.png", "similarity_hist.png", "examples.png"):
        assert (base / name).stat().st_size > 0, name
    assert steps_logged(base) == list(range(1, STEPS + 1))
    records = [json.loads(line) for line in (base / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3, STEPS]
    assert {"loss", "contrastive", "bce_reasoning", "bce_sub", "bce_irrelevant", "lr",
            "groups_per_s"} <= records[0].keys()
    m = metrics(base)
    assert m == {k: v for k, v in evals[-1].items() if k not in ("event", "step")}
    quadrants = sum(m[k] for k in ("r_right_s_right", "r_right_s_wrong", "r_wrong_s_right",
                                   "r_wrong_s_wrong"))
    assert quadrants == pytest.approx(1.0)
    assert m["groups"] == 20 and 0 <= m["mp1"] <= 1 and m["grounding_questions"] > 0
    table = (base / "table1.md").read_text()
    assert "Pythia + SOrT (SQ + IQ)" in table and "MP@1" in table and "WPR" in table
    state = ckpt.load_checkpoint(base / "checkpoint.pt")
    assert state["step"] == STEPS
    assert {"model", "optimizer", "scheduler", "rng", "data", "config"} <= state.keys()
    assert state["data"]["position"] == STEPS % 5 and state["data"]["epoch"] == STEPS // 5
    assert "step 3: consistency" in (base / "train.log").read_text()


def test_same_seed_same_result_other_seed_differs(base, tmp_path):
    assert run(tmp_path / "again", "--max-steps", str(STEPS)) == 0
    assert_same_params(params(base), params(tmp_path / "again"))
    assert metrics(base) == metrics(tmp_path / "again")
    assert run(tmp_path / "seed1", "--max-steps", "1", "--seed", "1") == 0
    assert run(tmp_path / "seed0", "--max-steps", "1") == 0
    a, b = params(tmp_path / "seed0"), params(tmp_path / "seed1")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_bit_for_bit(base, tmp_path):
    out = tmp_path / "run"
    assert run(out, "--max-steps", str(STEPS // 2), "--eval-every", "3") == 0
    assert run(out, "--max-steps", str(STEPS), "--resume") == 0
    assert_same_params(params(base), params(out))
    assert metrics(base) == metrics(out)
    assert steps_logged(out) == list(range(1, STEPS + 1))
    state_a = ckpt.load_checkpoint(base / "checkpoint.pt")
    state_b = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert torch.equal(state_a["rng"][0]["torch"], state_b["rng"][0]["torch"])


def test_resume_rejects_changed_flags(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--max-steps", "1") == 0
    capsys.readouterr()
    assert run(out, "--max-steps", "2", "--resume", "--lr", "0.5") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume" in err and "--lr" in err and "\n" not in err


def test_existing_run_is_not_overwritten_without_consent(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--max-steps", "1") == 0
    before = params(out)
    capsys.readouterr()
    assert run(out, "--max-steps", "2", "--seed", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint.pt exists" in err and "--overwrite" in err and "\n" not in err
    assert_same_params(params(out), before)  # the earlier run's checkpoint is untouched
    assert run(out, "--max-steps", "2", "--seed", "1", "--overwrite") == 0
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert steps_logged(out) == [1, 2]


def test_killed_run_resumes_to_the_same_result(base, tmp_path):
    """SIGKILL a run (aiming far beyond STEPS, so it is surely still running) right after its
    first checkpoint; resuming to STEPS matches the uninterrupted run (the schedule does not
    depend on the run's length)."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sort_fast.train", "--out", str(out), *TINY, "--max-steps",
         "1000", "--save-every", "1", "--eval-every", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = ckpt.load_checkpoint(out / "checkpoint.pt")["step"]
    assert 1 <= saved < STEPS, f"killed too late (step {saved})"
    assert run(out, "--max-steps", str(STEPS), "--save-every", "1", "--resume") == 0
    assert_same_params(params(base), params(out))
    assert metrics(base) == metrics(out)
    assert steps_logged(out) == list(range(1, STEPS + 1))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    path.write_bytes(b"half a checkpoint")
    with pytest.raises(CLIError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("flags, message", [
    (["--batch-groups", "0"], "--batch-groups: expected an integer >= 1, got '0'"),
    (["--lr", "-1"], "--lr: expected a number > 0, got '-1'"),
    (["--lr", "nan"], "--lr: expected a number > 0"),
    (["--dropout", "1"], "--dropout: expected a probability"),
    (["--loss", "mse"], "--loss: invalid choice"),
    (["--introspect", "/no/such/file.json"], "no such file: /no/such/file.json"),
    (["--resume"], "--resume:"),
    (["--init", "{bad}"], "not a readable checkpoint"),
])
def test_bad_flags_end_with_one_line(flags, message, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("garbage")
    flags = [str(bad) if f == "{bad}" else f for f in flags]
    try:
        code = main(["--out", str(tmp_path / "out"), *TINY, *flags])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err and "Traceback" not in err


def test_malformed_data_file_from_the_command_line(tmp_path, capsys):
    files = {}
    for name in ("introspect", "questions", "annotations", "features"):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text("{not json")
    paths = [str(files[n]) for n in ("introspect", "questions", "annotations", "features")]
    result = cli("--out", str(tmp_path / "out"),
                 "--introspect", paths[0], "--vqa-questions", paths[1],
                 "--vqa-annotations", paths[2], "--features", paths[3],
                 "--val-introspect", paths[0], "--val-vqa-questions", paths[1],
                 "--val-vqa-annotations", paths[2], "--val-features", paths[3])
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "introspect.json" in err and "cannot read JSON" in err
    assert run(tmp_path / "out", "--introspect", paths[0]) == 2
    err = capsys.readouterr().err.strip()
    assert "--vqa-questions" in err and "\n" not in err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--max-steps", "--epochs", "--batch-groups", "--seed", "--device",
                 "--loss", "--lambda-reasoning", "--lambda-sub", "--lambda-irrelevant",
                 "--margin", "--lambda-attention", "--lr", "--warmup-steps", "--grad-clip",
                 "--eval-every", "--save-every", "--resume", "--overwrite", "--init", "--naive",
                 "--introspect", "--vqa-questions", "--vqa-annotations", "--features",
                 "--val-introspect", "--val-vqa-questions", "--val-vqa-annotations",
                 "--val-features", "--synthetic-train-groups", "--synthetic-val-groups",
                 "--hat-dir"):
        assert flag in text, flag
    assert "runs/sort" in text and "2.27" in text


def test_sort_loss_separates_sub_from_irrelevant_similarities(tmp_path):
    """Only the contrastive term, on one repeated batch: sub-questions' Grad-CAM similarity
    rises above the irrelevant questions'."""
    from sort_fast.data import SyntheticIntrospect
    from sort_fast.models import PythiaConfig, PythiaVQA
    from sort_fast.training.evaluation import evaluate

    groups = SyntheticIntrospect(seed=0, split="train", num_groups=16)
    out = tmp_path / "sort"
    assert main(["--out", str(out), *TINY, "--synthetic-train-groups", "16",
                 "--batch-groups", "16", "--max-steps", "25", "--lr", "0.01",
                 "--lambda-reasoning", "0", "--lambda-sub", "0", "--lambda-irrelevant", "0",
                 "--dropout", "0", "--grad-clip", "0", "--eval-every", "0"]) == 0
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    torch.manual_seed(0)
    model = PythiaVQA(PythiaConfig(**state["model_config"]))  # the run's initial weights
    before = evaluate(model, groups, batch_groups=16, device=torch.device("cpu")).metrics
    model.load_state_dict(state["model"])
    after = evaluate(model, groups, batch_groups=16, device=torch.device("cpu")).metrics
    gap = lambda m: m["similarity_sub_mean"] - m["similarity_irrelevant_mean"]  # noqa: E731
    assert gap(after) > gap(before) + 0.1
    assert after["mrr"] > before["mrr"]


WORKER = """
import os, sys, torch
from sort_fast.train import train
from sort_fast.training.config import build_train_parser
result = train(build_train_parser().parse_args(sys.argv[1:]))
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def test_two_process_training_keeps_ranks_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), "--out", str(out), *TINY, "--max-steps", "3", "--eval-every", "0",
         "--dropout", "0"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rank0 = torch.load(out / "rank0.pt")
    rank1 = torch.load(out / "rank1.pt")
    assert_same_params(rank0, rank1)
    assert_same_params(rank0, params(out))
    assert steps_logged(out) == [1, 2, 3]
    assert len(ckpt.load_checkpoint(out / "checkpoint.pt")["rng"]) == 2  # one per rank
    # close to one process on the whole batch, not equal (sort_fast/training/distributed.py
    # says why): Adamax turns small gradient differences into steps of about lr (3e-3)
    single = tmp_path / "single"
    assert run(single, "--max-steps", "3", "--eval-every", "0", "--dropout", "0") == 0
    gap = max(float((params(single)[k] - v).abs().max()) for k, v in rank0.items())
    print(f"largest weight difference DDP x2 vs one process after 3 steps: {gap:.2e}")
    assert 0 < gap < 3 * 3 * 3e-3  # at most about lr per step


def test_real_data_formats_with_hat_grounding(tmp_path, capsys):
    """Training and evaluation on tiny files in the VQA-Introspect / VQAv2 / .npy formats, with
    grounding measured against a VQA-HAT map."""
    import numpy as np
    from PIL import Image

    from sort_fast.evaluate import main as evaluate_main

    intro = {"101": {"reasoning_question": "Is it safe to cross?", "image_id": 42,
                     "reasoning_answer_most_common": "yes", "introspect": [
                         {"pred_q_type": "perception", "sub_qa": [
                             {"sub_question": "Is the light green?", "sub_answer": "yes"}]}]},
             "201": {"reasoning_question": "Could he eat this?", "image_id": 7,
                     "reasoning_answer_most_common": "no", "introspect": [
                         {"pred_q_type": "perception", "sub_qa": [
                             {"sub_question": "Is it a pizza?", "sub_answer": "no"}]}]}}
    qs = [(101, 42, "Is it safe to cross?"), (103, 42, "What color is the bus?"),
          (104, 42, "How many people are there?"), (201, 7, "Could he eat this?"),
          (202, 7, "What is on the table?")]
    answers = {101: "yes", 103: "red", 104: "2", 201: "no", 202: "pizza"}
    files = {"introspect": intro, "questions": {"questions": [
        {"question_id": q, "image_id": i, "question": t} for q, i, t in qs]},
        "annotations": {"annotations": [
            {"question_id": q, "image_id": i, "multiple_choice_answer": answers[q],
             "answers": [{"answer_id": k, "answer": answers[q]} for k in range(10)]}
            for q, i, _ in qs]}}
    paths = {}
    for name, obj in files.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    feats = tmp_path / "features"
    feats.mkdir()
    rng = np.random.default_rng(0)
    for image in (42, 7):
        np.save(feats / f"COCO_val2014_{image:012d}.npy",
                rng.standard_normal((3, 8)).astype(np.float32))
    hat = tmp_path / "hat"
    hat.mkdir()
    Image.fromarray((rng.random((20, 30)) * 255).astype(np.uint8)).save(hat / "101_1.png")
    data = ["--introspect", paths["introspect"], "--vqa-questions", paths["questions"],
            "--vqa-annotations", paths["annotations"], "--features", feats,
            "--val-introspect", paths["introspect"], "--val-vqa-questions", paths["questions"],
            "--val-vqa-annotations", paths["annotations"], "--val-features", feats,
            "--hat-dir", hat]
    out = tmp_path / "out"
    assert run(out, *map(str, data), "--max-steps", "2") == 0
    m = metrics(out)
    assert m["groups"] == 2 and m["grounding_source"] == "vqa-hat"
    assert m["grounding_questions"] == 1
    capsys.readouterr()
    assert evaluate_main([str(out / "checkpoint.pt"), "--hat-dir", str(hat)]) == 0
    assert json.loads((out / "eval" / "metrics.json").read_text())["metrics"] == m


def losses_logged(out: Path) -> List[float]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["event"] == "train"]


def test_non_finite_loss_stops_before_the_next_save(tmp_path, monkeypatch, capsys):
    """Loss parts are read every --log-every steps, and always before a checkpoint is written:
    a NaN at step 3 stops the run naming step 3, and the checkpoint stays at step 2."""
    from sort_fast.training import objective as obj

    original, calls = obj.Objective.__call__, []

    def nan_from_step_3(self, model, batch):
        loss, parts = original(self, model, batch)
        calls.append(1)
        if len(calls) >= 3:
            loss, parts["loss"] = loss * float("nan"), parts["loss"] * float("nan")
        return loss, parts

    monkeypatch.setattr(obj.Objective, "__call__", nan_from_step_3)
    out = tmp_path / "run"
    assert run(out, "--max-steps", "6", "--save-every", "2", "--log-every", "10") != 0
    assert "not finite at step 3" in capsys.readouterr().err
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert steps_logged(out) == [1, 2]


class NanGradient(torch.autograd.Function):
    """The identity whose backward turns every gradient into NaN: a finite loss with a NaN
    gradient."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


@pytest.mark.parametrize("grad_clip", ["0.25", "0"], ids=["clipped", "unclipped"])
def test_non_finite_gradient_never_reaches_a_checkpoint(grad_clip, tmp_path, monkeypatch,
                                                        capsys):
    """A finite loss with a NaN gradient at step 4, a save due at step 4: the run stops naming
    step 4 (from the clipped gradient norm, or without clipping from the weights checked before
    the save) and the checkpoint of step 2 stays, with finite weights."""
    from sort_fast.training import objective as obj

    original, calls = obj.Objective.__call__, []

    def nan_gradient_at_step_4(self, model, batch):
        loss, parts = original(self, model, batch)
        calls.append(1)
        return (NanGradient.apply(loss) if len(calls) == 4 else loss), parts

    monkeypatch.setattr(obj.Objective, "__call__", nan_gradient_at_step_4)
    out = tmp_path / "run"
    assert run(out, "--max-steps", "6", "--save-every", "2", "--log-every", "10",
               "--eval-every", "0", "--grad-clip", grad_clip) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    expected = ("the gradient is not finite at step 4" if grad_clip != "0" else
                "the weights are not finite after step 4")
    assert expected in lines[0] and "the checkpoint of step 2 is kept" in lines[0]
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2
    assert all(bool(torch.isfinite(w).all()) for w in state["model"].values())


def test_fine_tuning_resumes_without_its_init_file(tmp_path):
    """--resume takes the weights from the run's own checkpoint: the --init file may be gone,
    and the resumed fine-tuning ends as an uninterrupted one."""
    pretrained = tmp_path / "pretrained"
    assert run(pretrained, "--max-steps", "2", "--eval-every", "0", "--no-plots",
               "--loss", "bce") == 0
    init = tmp_path / "init.pt"
    (pretrained / "checkpoint.pt").rename(init)
    flags = ["--init", str(init), "--eval-every", "0", "--no-plots"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run(whole, *flags, "--max-steps", "4") == 0
    assert run(resumed, *flags, "--max-steps", "2") == 0
    init.unlink()
    assert run(resumed, "--max-steps", "4", "--resume") == 0
    assert_same_params(params(whole), params(resumed))
    assert metrics(whole) == metrics(resumed)


def test_bf16_autocast_run(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--max-steps", "3", "--eval-every", "0", "--amp", "bf16") == 0
    losses = losses_logged(out)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # --resume continues with the stored --amp; asking for another precision is refused
    assert run(out, "--max-steps", "4", "--resume", "--amp", "none") == 2
    assert run(out, "--max-steps", "4", "--resume") == 0
    assert steps_logged(out) == [1, 2, 3, 4]


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tmp_path):
    """--compile: the model (LSTM included), closed-form Grad-CAM and loss under
    torch.compile give eager's loss within float rounding (one step: one compile)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    flags = ["--max-steps", "1", "--eval-every", "0", "--dropout", "0"]
    assert run(eager, *flags) == 0
    torch._dynamo.reset()
    assert run(compiled, *flags, "--compile") == 0
    torch.testing.assert_close(torch.tensor(losses_logged(compiled)),
                               torch.tensor(losses_logged(eager)), rtol=1e-5, atol=1e-6)
    for name, value in params(eager).items():
        torch.testing.assert_close(params(compiled)[name], value, rtol=1e-4, atol=1e-6)


def test_resume_takes_the_stored_flags(tmp_path, capsys):
    """--resume needs only --out: every other flag comes from the checkpoint, and flags given
    again that change the trajectory are refused all in one message."""
    out = tmp_path / "run"
    assert run(out, "--max-steps", "4", "--save-every", "2", "--lr", "0.01", "--seed", "5",
               "--eval-every", "0") == 0
    ckpt_state = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert "explicit" not in ckpt_state["config"]
    capsys.readouterr()
    assert main(["--out", str(out), "--resume", "--lr", "0.02", "--seed", "6"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01" in err and "--seed 5" in err and err.count("\n") == 1
    # a longer run of the same configuration, resumed with only --out and --max-steps
    assert main(["--out", str(out), "--resume", "--max-steps", "6"]) == 0
    assert steps_logged(out) == list(range(1, 7))
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["config"]["lr"] == 0.01
