"""``python -m sort_fast.experiments.table1`` on a tiny protocol (in-process, one job)."""
from __future__ import annotations

import json
import pytest

from sort_fast.experiments.table1 import (METHODS, METRICS, PAPER, main, markdown, run_tag,
                                         val_score)

TINY = ["--jobs", "1", "--seeds", "2", "--tune-seeds", "1", "--pretrain-epochs", "2",
        "--finetune-epochs", "1", "--attention-grid", "0.1", "10", "--bce-grid", "2.27",
        "--irrelevant-grid", "3e-4", "1", "--hidden-dim", "16", "--joint-dim", "32",
        "--batch-groups", "16", "--synthetic-train-groups", "48", "--synthetic-val-groups", "24",
        "--synthetic-test-groups", "20"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("table1")
    argv = ["--out", str(root / "runs"), "--json", str(root / "table1.json"),
            "--figure", str(root / "table1.png"), *TINY]
    assert main(argv) == 0
    return root, argv, json.loads((root / "table1.json").read_text())


def test_results_have_every_row_seed_and_metric(tiny):
    _, _, results = tiny
    assert set(results["methods"]) == set(METHODS) == {"baseline", "squint", "sort_sq", "sort"}
    keys = {key for key, *_ in METRICS}
    assert {"consistency", "mp1", "ranking_accuracy", "mrr", "wpr", "reasoning_accuracy",
            "vqa_accuracy", "grounding", "r_right_s_right", "r_right_s_wrong",
            "r_wrong_s_right", "r_wrong_s_wrong"} <= keys
    for rows in [*results["methods"].values(), results["pretrained"]]:
        assert [r["seed"] for r in rows] == [0, 1]
        for r in rows:
            assert keys <= set(r) and 0.0 <= r["consistency"] <= 1.0
            quadrants = sum(r[k] for k in ("r_right_s_right", "r_right_s_wrong",
                                           "r_wrong_s_right", "r_wrong_s_wrong"))
            assert quadrants == pytest.approx(1.0)
    assert results["split"] == "test" and results["paper"] == PAPER


def test_lambda_is_the_best_val_score_of_its_grid(tiny):
    root, _, results = tiny
    runs = root / "runs"
    assert len(results["tuning"]["squint"]) == 2 and len(results["tuning"]["sort"]) == 2
    for row, scored in results["tuning"].items():
        for entry in scored:  # the score is recomputed from the run's own val metrics
            tag = run_tag(entry["lambdas"])
            val = json.loads((runs / "finetune" / row / tag / "seed0" / "metrics.json")
                             .read_text())["metrics"]
            assert entry["val_score"] == pytest.approx(val_score(val))
        best = max(scored, key=lambda e: e["val_score"])
        assert results["lambdas"][row] == best["lambdas"]
    assert results["lambdas"]["baseline"] == {}


def test_reported_numbers_come_from_the_test_split(tiny):
    root, _, results = tiny
    for row, lam in results["lambdas"].items():
        run = root / "runs" / "finetune" / row / run_tag(lam) / "seed1"
        test = json.loads((run / "test" / "metrics.json").read_text())["metrics"]
        assert test["groups"] == 20  # --synthetic-test-groups, not the 24 val groups
        assert results["methods"][row][1]["consistency"] == test["consistency"]
        # every row of a seed starts from that seed's plain model
        assert json.loads((run / "metrics.json").read_text())["metrics"]["groups"] == 24


def test_rerun_reuses_finished_runs_and_refuses_another_protocol(tiny, capsys):
    root, argv, results = tiny
    stamps = {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("metrics.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("metrics.json")} == stamps
    assert json.loads((root / "table1.json").read_text())["methods"] == results["methods"]
    capsys.readouterr()
    changed = list(argv)
    changed[changed.index("--finetune-epochs") + 1] = "3"
    assert main(changed) == 2
    assert "--finetune-epochs" in capsys.readouterr().err


def test_figure_and_table(tiny):
    root, _, results = tiny
    assert (root / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown(results)
    assert table == (root / "runs" / "table1.md").read_text().strip()
    assert "Pythia + SOrT (SQ + IQ)" in table and "*paper: Pythia + SQuINT*" in table
    assert "71.81" in table and "Paired difference from the baseline" in table
    assert any(f"({k}/2)" in table for k in range(3))


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--seeds", "2", "--tune-seeds", "3"]) == 2
    assert "--tune-seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--bce-grid", "-1"])
    assert "error" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--seeds", "--tune-seeds", "--jobs", "--bce-grid", "--irrelevant-grid",
                 "--attention-grid", "--finetune-epochs", "--synthetic-test-groups"):
        assert flag in text
