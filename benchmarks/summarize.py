"""Markdown tables from a pytest-benchmark JSON file (``--benchmark-json``).

    python benchmarks/summarize.py bench.json [--reference fused]

One table per benchmark group: median and min time, the median's ratio to the group's
reference entry (the row whose name contains ``--reference``; default ``fused``, else
``extension``), and any ``extra_info`` (peak memory) the benchmark stored.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict, List


def tables(data: dict, reference: str) -> str:
    machine = data.get("machine_info", {})
    return (f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
            f"{machine.get('cpu', {}).get('count', '?')} cores; "
            f"{data.get('datetime', '')}\n\n" + group_tables(data["benchmarks"], reference))


def group_tables(benchmarks: List[dict], reference: str) -> str:
    """One table per group of ``benchmarks`` (entries of a ``--benchmark-json`` file)."""
    groups: Dict[str, List[dict]] = defaultdict(list)
    for bench in benchmarks:
        groups[bench["group"] or "ungrouped"].append(bench)
    lines = []
    for name in sorted(groups):
        rows = sorted(groups[name], key=lambda b: b["stats"]["median"])
        ref = next((b for b in rows if reference in b["name"]), None)
        ref = ref or next((b for b in rows if "extension" in b["name"]), rows[0])
        extra_keys = sorted({k for b in rows for k in b.get("extra_info", {})})
        lines.append(f"### {name}\n")
        header = ["benchmark", "median ms", "min ms",
                  "median / " + ref["name"], *extra_keys]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---" + "|---:" * (len(header) - 1) + "|")
        for b in rows:
            s = b["stats"]
            extras = [b.get("extra_info", {}).get(k, "") for k in extra_keys]
            extras = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in extras]
            cells = [b["name"], f"{s['median'] * 1e3:.2f}", f"{s['min'] * 1e3:.2f}",
                     f"{s['median'] / ref['stats']['median']:.2f}", *extras]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--reference", default="fused",
                        help="substring naming each group's reference row (default: fused)")
    args = parser.parse_args()
    with open(args.json) as f:
        print(tables(json.load(f), args.reference))


if __name__ == "__main__":
    main()
