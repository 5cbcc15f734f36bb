"""``benchmarks/gpu.sh``: the dry run (every part on the CPU at tiny sizes) packs every part's
result, the build failure and the missing GPU are one line each, and the summary reads what a
cut-short run leaves."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
RESULTS = ["log.txt", "loss.jsonl", "step.jsonl", "head.jsonl", "tests.txt", "train.txt",
           "summary.md"]
PARTS = ["build", "loss", "step", "graph", "head", "tests", "train", "vlm"]


def run_script(*args: str, env: Dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def cpu_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SORT_BENCH")}
    env.update(CUDA_VISIBLE_DEVICES="", **extra)
    return env


def jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gpu-dry") / "out"
    done = run_script("--dry-run", str(out), env=cpu_env(), timeout=660)
    return done, out


@pytest.mark.slow
def test_dry_run_exits_0_with_at_most_8_files(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULTS + ["gpu-results.tar.gz"])
    with tarfile.open(out / "gpu-results.tar.gz") as tar:
        members = {m.name: m.size for m in tar.getmembers()}
    assert sorted(members) == sorted(RESULTS)
    assert all(size > 0 for size in members.values()), members


@pytest.mark.slow
def test_dry_run_records_every_part(dry_run):
    done, out = dry_run
    status = dict(re.findall(r"^gpu\.sh part (\S+): (.*)$", (out / "log.txt").read_text(),
                             re.M))
    assert list(status) == PARTS, status
    for name in PARTS:
        assert status[name].startswith(("ok", "exit 0")), (name, status[name])

    loss = [r for r in jsonl(out / "loss.jsonl") if "size" in r]
    assert sorted((r["size"], r["dtype"]) for r in loss) == sorted(
        (s, d) for s in ("pythia", "pythia_x8") for d in ("fp32", "bf16"))
    for r in loss:
        assert "error" not in r, r
        assert r["forward"]["ms"] > 0 and r["backward"]["ms"] > 0 and r["floor_ms"] > 0
        assert r["bitwise_repeatable"] is True

    step = {r["name"]: r for r in jsonl(out / "step.jsonl")}
    for name in ("test_step_fused[small]", "test_step_vectorized_shared[small]"):
        assert step[name]["stats"]["median"] > 0 and step[name]["stats"]["rounds"] == 1
    for variant in ("closed_form", "closed_form_per_question", "autograd",
                    "authors_three_passes"):
        assert step[f"test_vlm_step[{variant}-2048]"]["stats"]["median"] > 0
    assert not [r for r in step.values() if "error" in r]

    head = {(r["dtype"], r["path"]): r for r in jsonl(out / "head.jsonl")}
    assert sorted(head) == sorted([("fp32", "closed_triton"), ("fp32", "autograd"),
                                   ("bf16", "closed_triton"), ("bf16", "closed_torch"),
                                   ("bf16", "autograd")])
    for r in head.values():
        assert "error" not in r and r["ok"] is True and r["ms"] > 0, r
    assert head["bf16", "closed_triton"]["kernel"] is True  # the tl.dot kernel ran

    tests = (out / "tests.txt").read_text()
    assert len(re.findall(r" PASSED", tests)) >= 5 and " FAILED" not in tests
    assert re.search(r"trained 2 steps in", (out / "train.txt").read_text())


@pytest.mark.slow
def test_dry_run_prints_the_summary_last(dry_run):
    done, out = dry_run
    summary = (out / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip())
    for title in ("Loss kernels against the HBM floor", "SOrT step", "Head Grad-CAM",
                  "CUDA tests", "Training"):
        assert f"## {title}" in summary
    assert re.search(r"\| pythia_x8 \| bf16 \| \d+ \| [0-9.]+ \| [0-9.]+ \|", summary)
    assert re.search(r"small: fused step [0-9.]+x plain autograd", summary)
    assert re.search(r"decoder VLM 2048: closed-form step [0-9.]+x autograd", summary)
    assert re.search(r"\| bf16 \| closed_triton \| True \|", summary)
    # the CUDA-graph step's code path (Dynamo's eager backend on the CPU), timed at smoke size
    assert re.search(r"small: CUDA-graph step [0-9.]+x the eager fused step", summary)


def test_without_a_gpu_one_line_and_exit_2(tmp_path):
    done = run_script(str(tmp_path / "out"), env=cpu_env(), timeout=120)
    assert done.returncode == 2
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("gpu.sh: no CUDA GPU")
    assert not (tmp_path / "out").exists()


def test_a_failed_build_is_one_line_and_stops(tmp_path):
    """pybind11 missing (shadowed by a package that fails to import): the script names the
    build failure in one line, exits 1 and runs no part."""
    fake = tmp_path / "site" / "pybind11"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no pybind11 in this image')\n")
    out = tmp_path / "out"
    done = run_script("--dry-run", str(out), env=cpu_env(PYTHONPATH=str(fake.parent)),
                      timeout=120)
    assert done.returncode == 1
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu.sh: build failed: setuptools/pybind11 not importable")
    assert "no pybind11 in this image" in last
    assert "Traceback" not in done.stdout and done.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == ["log.txt"]


def test_summary_reads_a_run_cut_short(tmp_path):
    """A part killed mid-line leaves a truncated last JSON line; absent parts leave nothing:
    the summary shows what finished and names what did not."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_summary import summary
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    record = dict(part="loss", size="pythia", dtype="fp32", rows=640, forward={"ms": 0.05},
                  backward={"ms": 0.07}, floor_ms=0.1, floor_fraction=0.1 / 0.12,
                  bitwise_repeatable=True)
    (tmp_path / "loss.jsonl").write_text(json.dumps(record) + "\n" + '{"part": "loss", "si')
    (tmp_path / "log.txt").write_text("gpu.sh 2026\ngpu.sh part loss: stopped by its time "
                                      "limit after 40 s (budget 40 s)\n"
                                      "gpu.sh part graph: exit 4 after 7 s (budget 35 s)\n")
    (tmp_path / "tests.txt").write_text("tests/test_a.py::test_x PASSED [ 50%]\n"
                                        "tests/test_a.py::test_y[1] FAILED [100%]\n")
    text = summary(str(tmp_path))
    assert "| pythia | fp32 | 640 | 0.0500 | 0.0700 | 0.1000 | 83% | True |" in text
    assert "| loss | stopped by its time limit after 40 s (budget 40 s) |" in text
    assert "1 failed, 1 passed" in text and "- tests/test_a.py::test_y[1]" in text
    assert "no step benchmark finished" in text
    assert ("CUDA-graph step: not measured, bench_step.py has no `cuda_graph` benchmark "
            "(pytest selected none: graph part exit 4 after 7 s (budget 35 s))") in text
    assert "the training run did not finish its steps" in text


def test_benchmarks_write_one_line_each_as_they_end(tmp_path):
    """benchmarks/conftest.py: under SORT_BENCH_JSONL every benchmark appends its line when it
    ends (a failed one its error); SORT_BENCH_SMOKE=1 applies the smoke sizes and rounds."""
    for name in ("conftest.py", "common.py"):
        shutil.copy(ROOT / "benchmarks" / name, tmp_path)
    (tmp_path / "bench_step.py").write_text(
        "NUM_GROUPS = 64\n\n\n"
        "def test_groups(benchmark):\n"
        "    benchmark.extra_info['groups'] = NUM_GROUPS\n"
        "    benchmark.pedantic(lambda: None, rounds=5)\n\n\n"
        "def test_fails(benchmark):\n"
        "    benchmark.pedantic(lambda: None, rounds=2)\n"
        "    assert NUM_GROUPS == 0, 'deliberate failure'\n")
    out = tmp_path / "results.jsonl"
    env = cpu_env(SORT_BENCH_JSONL=str(out), SORT_BENCH_SMOKE="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--benchmark-only", "bench_step.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-2000:]
    records = {r["name"]: r for r in jsonl(out)}
    assert sorted(records) == ["test_fails", "test_groups"]
    assert records["test_groups"]["extra_info"] == {"groups": 2}  # the smoke size
    assert records["test_groups"]["stats"]["rounds"] == 1  # the smoke rounds, not 5
    assert records["test_fails"]["error"].startswith("AssertionError: deliberate failure")
