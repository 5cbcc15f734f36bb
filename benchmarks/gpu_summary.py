"""The key figures of a ``gpu.sh`` run as markdown, from the result files in its output folder.

    python benchmarks/gpu_summary.py OUTDIR

Reads what each part left (any part may be missing or cut short by its time limit):
``log.txt`` (environment and one ``gpu.sh part NAME: exit RC after S s (budget B s)`` line per
part), ``loss.jsonl`` and ``head.jsonl`` (``bench_kernels.py``), ``step.jsonl`` (the
``bench_step.py`` benchmarks, one line each, benchmarks/conftest.py), ``tests.txt``
(``pytest -v``) and ``train.txt`` (the trainer's log). Prints: the parts' status, the loss
kernels against the HBM floor, the SOrT step (fused against plain autograd on the shared-input
model, the CUDA-graph step against the eager one), head Grad-CAM per dtype and path (speed-up
over autograd, error against float64), the CUDA tests' counts and the training run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from collections import Counter
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import group_tables  # noqa: E402

PART_LINE = re.compile(r"^gpu\.sh part (\S+): (.*)$")
TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
TRAIN_LINE = re.compile(r"trained (\d+) steps in ([0-9.]+)s")


def read_jsonl(path: str) -> List[dict]:
    """The records of a JSON-lines file; a last line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_lines(path: str) -> List[str]:
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return f.read().splitlines()


def parts_section(log: List[str]) -> List[str]:
    lines = ["| part | result |", "|---|---|"]
    lines += [f"| {name} | {status} |" for name, status in part_status(log).items()]
    return lines


def part_status(log: List[str]) -> Dict[str, str]:
    """Part name -> its status line's text, from ``log.txt``."""
    return {m[1]: m[2] for m in map(PART_LINE.match, log) if m}


def errors(records: List[dict]) -> List[str]:
    return [f"- error in {' '.join(str(r.get(k, '')) for k in ('size', 'dtype', 'path'))}: "
            f"{r['error']}" for r in records if "error" in r]


def loss_section(records: List[dict]) -> List[str]:
    bandwidth = next((r["bandwidth"] for r in records if "bandwidth" in r), None)
    lines = [f"copy bandwidth {bandwidth / 1e12:.3f} TB/s" if bandwidth else "copy bandwidth: -",
             "", "| size | dtype | T | fwd ms | bwd ms | floor ms | fraction of floor | "
             "bitwise repeatable |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if "floor_ms" in r:
            lines.append(f"| {r['size']} | {r['dtype']} | {r['rows']} | "
                         f"{r['forward']['ms']:.4f} | {r['backward']['ms']:.4f} | "
                         f"{r['floor_ms']:.4f} | {r['floor_fraction']:.0%} | "
                         f"{r['bitwise_repeatable']} |")
    return lines + errors(records)


VLM_VARIANTS = ("closed_form", "autograd", "closed_form_per_question", "authors_three_passes")


def _median(records: List[dict], name: str) -> Optional[float]:
    return next((r["stats"]["median"] for r in records if r.get("name") == name
                 and "stats" in r), None)


def step_section(records: List[dict], graph_status: Optional[str]) -> List[str]:
    """``graph_status``: the graph part's status line (pytest exits 4 or 5 when its ``-k``
    selects no benchmark, i.e. bench_step.py has no ``cuda_graph`` variant)."""
    timed = [r for r in records if "stats" in r]
    lines = [group_tables(timed, "fused") if timed else "no step benchmark finished", ""]
    sizes = sorted({r["name"].split("[", 1)[1].rstrip("]") for r in timed if "[" in r["name"]})
    for size in sizes:
        fused = _median(timed, f"test_step_fused[{size}]")
        shared = _median(timed, f"test_step_vectorized_shared[{size}]")
        graph = next((r["stats"]["median"] for r in timed if "cuda_graph" in r["name"]
                      and r["name"].endswith(f"[{size}]")), None)
        if fused and shared:
            lines.append(f"- {size}: fused step {shared / fused:.2f}x plain autograd on the "
                         "shared-input model")
        if fused and graph:
            lines.append(f"- {size}: CUDA-graph step {fused / graph:.2f}x the eager fused step")
    for width in sorted({r["name"].split("-")[-1].rstrip("]") for r in timed
                         if r["name"].startswith("test_vlm_step[")}):
        step = {v: _median(timed, f"test_vlm_step[{v}-{width}]") for v in VLM_VARIANTS}
        if step["closed_form"]:
            lines.append(f"- decoder VLM {width}: closed-form step " + ", ".join(
                f"{step[v] / step['closed_form']:.2f}x {v}" for v in VLM_VARIANTS[1:]
                if step[v]))
    if not any("cuda_graph" in r.get("name", "") for r in records):
        if graph_status and graph_status.startswith(("exit 4 ", "exit 5 ")):
            lines.append("- CUDA-graph step: not measured, bench_step.py has no `cuda_graph` "
                         f"benchmark (pytest selected none: graph part {graph_status})")
        else:
            lines.append(f"- CUDA-graph step: no result (graph part: {graph_status or 'absent'})")
    lines += [f"- failed: {r['name']}: {r['error']}" for r in records if "error" in r]
    return lines


def head_section(records: List[dict]) -> List[str]:
    autograd: Dict[str, float] = {r["dtype"]: r["ms"] for r in records
                                  if r.get("path") == "autograd" and "ms" in r}
    lines = ["| dtype | path | Triton kernel | T | fwd+bwd ms | autograd / this | "
             "error vs fp64 | within tolerance |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in records:
        if "ms" in r:
            base = autograd.get(r["dtype"])
            speedup = f"{base / r['ms']:.2f}x" if base else "-"
            lines.append(f"| {r['dtype']} | {r['path']} | {r['kernel']} | {r['rows']} | "
                         f"{r['ms']:.3f} | {speedup} | {r['err']:.2e} | {r['ok']} |")
    return lines + errors(records)


def tests_section(lines: List[str]) -> List[str]:
    outcomes = {m[1]: m[2] for m in map(TEST_LINE.match, lines) if m}
    counts = Counter(outcomes.values())
    out = [", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())) or "no test ran"]
    out += [f"- {k}" for k, v in outcomes.items() if v in ("FAILED", "ERROR")][:20]
    return out


def train_section(lines: List[str]) -> List[str]:
    m = next((m for m in map(TRAIN_LINE.search, lines) if m), None)
    if m is None:
        return ["the training run did not finish its steps"]
    steps, seconds = int(m[1]), float(m[2])
    return [f"{steps} steps in {seconds:.1f} s ({steps / max(seconds, 1e-9):.1f} steps/s)"]


def summary(out: str) -> str:
    log = read_lines(os.path.join(out, "log.txt"))
    # the header: the first lines, before the build's status line
    env = list(itertools.takewhile(lambda line: not PART_LINE.match(line), log))[:3]
    sections = [
        ("gpu.sh summary", env + [""] + parts_section(log)),
        ("Loss kernels against the HBM floor", loss_section(
            read_jsonl(os.path.join(out, "loss.jsonl")))),
        ("SOrT step", step_section(read_jsonl(os.path.join(out, "step.jsonl")),
                                   part_status(log).get("graph"))),
        ("Head Grad-CAM (Pythia classifier)", head_section(
            read_jsonl(os.path.join(out, "head.jsonl")))),
        ("CUDA tests", tests_section(read_lines(os.path.join(out, "tests.txt")))),
        ("Training", train_section(read_lines(os.path.join(out, "train.txt")))),
    ]
    return "\n".join(f"## {title}\n\n" + "\n".join(body) + "\n" for title, body in sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the output folder of gpu.sh")
    print(summary(parser.parse_args().out))


if __name__ == "__main__":
    main()
