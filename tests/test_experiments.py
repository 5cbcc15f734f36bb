"""``python -m sort_fast.experiments.table1`` on a tiny protocol (in-process, one job)."""
from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

from saved_figures import markers, saved_figures, suptitle
from sort_fast import evaluate as evaluate_cli
from sort_fast import train as train_cli
from sort_fast.experiments import table1
from sort_fast.experiments.columns import SHORT_NAMES
from sort_fast.experiments.protocol import check_protocol
from sort_fast.experiments.table1 import (
    METHODS,
    METRICS,
    PAPER,
    PRIMARY,
    PRIOR,
    PROBES,
    build_parser,
    main,
    markdown,
    plot,
    protocol_flags,
    run_tag,
    val_score,
)

TINY = ["--jobs", "1", "--seeds", "2", "--tune-seeds", "1", "--probe-seeds", "1",
        "--pretrain-epochs", "2", "--finetune-epochs", "1", "--rows", *METHODS,
        "--attention-grid", "0.1", "10", "--bce-grid", "2.27", "--irrelevant-grid", "3e-4", "1",
        "--hidden-dim", "16", "--joint-dim", "32", "--batch-groups", "16",
        "--synthetic-train-groups", "48", "--synthetic-val-groups", "24",
        "--synthetic-test-groups", "20"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("table1")
    argv = ["--out", str(root / "runs"), "--json", str(root / "table1.json"),
            "--figure", str(root / "table1.png"), *TINY]
    assert main(argv) == 0
    return root, argv, json.loads((root / "table1.json").read_text())


def test_results_have_every_row_seed_and_metric(tiny):
    _, argv, results = tiny
    assert set(results["methods"]) == set(METHODS)
    keys = {key for key, *_ in METRICS} | set(PRIMARY) | {"per_template"}
    for rows in [*results["methods"].values(), results["pretrained"]]:
        assert [r["seed"] for r in rows] == [0, 1]
        for r in rows:
            assert keys <= set(r) and 0.0 <= r["consistency"] <= 1.0
            quadrants = sum(r[k] for k in ("r_right_s_right", "r_right_s_wrong",
                                           "r_wrong_s_right", "r_wrong_s_wrong"))
            assert quadrants == pytest.approx(1.0)
            assert "sort_fast.evaluate" in r["test_command"]
    assert set(results["probes"]) == set(PROBES)
    assert [r["seed"] for r in results["probes"]["text_only"]] == [0]
    assert "--input-ablation text-only" in results["probes"]["text_only"][0]["train_command"]
    assert results["split"] == "test" and results["paper"] == PAPER
    assert results["command"].endswith(shlex.join(argv))
    assert results["commit"] is None or len(results["commit"]) == 40


def test_lambda_is_the_best_val_score_of_its_grid(tiny):
    root, _, results = tiny
    runs = root / "runs"
    assert len(results["tuning"]["squint"]) == 2 and len(results["tuning"]["sort"]) == 2
    for row, scored in results["tuning"].items():
        for entry in scored:  # tuned on seed 2, after the reported seeds 0 and 1
            tag = run_tag(entry["lambdas"])
            val = json.loads((runs / "finetune" / row / tag / "seed2" / "metrics.json")
                             .read_text())["metrics"]
            assert entry["val_score"] == pytest.approx(val_score(val))
            assert [v["seed"] for v in entry["val"]] == [2]
        best = max(scored, key=lambda e: e["val_score"])
        assert results["lambdas"][row] == best["lambdas"]
    lambdas = results["lambdas"]
    assert lambdas["baseline"] == {}
    assert lambdas["control"] == lambdas["sort_margin"] == lambdas["sort"]
    assert lambdas["sort_sq_paper"]["lambda_irrelevant"] == 0.0
    margin = results["methods"]["sort_margin"][0]["train_command"]
    assert "--margin 0.25" in margin and "--loss sort " in margin
    assert "--loss role-bce" in results["methods"]["control"][0]["train_command"]


def test_reported_numbers_come_from_the_test_split(tiny):
    root, _, results = tiny
    for row, lam in results["lambdas"].items():
        run = root / "runs" / "finetune" / row / run_tag(lam) / "seed1"
        test = json.loads((run / "test" / "metrics.json").read_text())["metrics"]
        assert test["groups"] == 20  # --synthetic-test-groups, not the 24 val groups
        assert results["methods"][row][1]["consistency"] == test["consistency"]
        # every row of a seed starts from that seed's plain model
        assert json.loads((run / "metrics.json").read_text())["metrics"]["groups"] == 24


def _rerun(command: str, replace: dict) -> list:
    """The recorded command's argv (after ``-m module``) with some values replaced."""
    argv = shlex.split(command)[3:]
    return [replace.get(a, a) for a in argv]


def test_a_recorded_number_is_reproduced_from_its_commands(tiny, tmp_path):
    # Rerun the plain model, the fine-tuning and the test evaluation of one seed of full SOrT
    # from the commands recorded in the JSON, into fresh directories: the same numbers, bit
    # for bit (same machine, one thread).
    root, _, results = tiny
    entry = results["methods"]["sort"][1]
    old_pretrain = str(root / "runs" / "pretrain" / "seed1")
    old_run = str(root / "runs" / "finetune" / "sort" / run_tag(results["lambdas"]["sort"])
                  / "seed1")
    new_pretrain, new_run = str(tmp_path / "pretrain"), str(tmp_path / "sort")
    assert train_cli.main(_rerun(entry["init_command"], {old_pretrain: new_pretrain})) == 0
    assert train_cli.main(_rerun(entry["train_command"], {
        old_run: new_run, f"{old_pretrain}/checkpoint.pt": f"{new_pretrain}/checkpoint.pt"})) == 0
    assert evaluate_cli.main(_rerun(entry["test_command"], {
        f"{old_run}/checkpoint.pt": f"{new_run}/checkpoint.pt",
        f"{old_run}/test": f"{new_run}/test"})) == 0
    again = json.loads((tmp_path / "sort" / "test" / "metrics.json").read_text())["metrics"]
    for key, value in again.items():
        assert entry[key] == value, key


def test_statistics_compare_every_row_with_the_baseline_and_the_control(tiny):
    _, _, results = tiny
    vs_baseline = results["stats"]["vs_baseline"]
    assert set(vs_baseline) == set(METHODS) - {"baseline"}
    for row, comparisons in vs_baseline.items():
        # a metric is left out only where some seed has no value for it
        rows = [*results["methods"][row], *results["methods"]["baseline"]]
        assert set(comparisons) == {key for key in PRIMARY
                                    if all(r[key] is not None for r in rows)}
        d = comparisons["consistency"]
        base = [r["consistency"] for r in results["methods"]["baseline"]]
        mine = [r["consistency"] for r in results["methods"][row]]
        assert d["n"] == 2 and d["mean"] == pytest.approx(np.mean(np.subtract(mine, base)))
        assert d["p"] is None or d["p_holm"] >= d["p"]
    assert set(results["stats"]["vs_control"]) == {"sort", "sort_sq", "sort_sq_paper",
                                                   "sort_margin"}


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


def test_figure_and_table(tiny, tmp_path):
    root, _, results = tiny
    assert (root / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with saved_figures() as figures:
        plot(results, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == (root / "table1.png").read_bytes()
    rows = {"pretrained": results["pretrained"], **results["methods"]}
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes][:4] == ["Consistency% ↑",
                                                   "Coupling over the mode answer ↑",
                                                   "Reas. Accuracy% ↑", "Sub-question accuracy ↑"]
    for ax, key in zip(axes, ("consistency", "coupling_over_mode", "reasoning_accuracy",
                              "sub_accuracy", "mp1", "mrr", "map", "wpr_over_range")):
        seeds = [[100 * r[key] for r in per_seed if r[key] is not None]
                 for per_seed in rows.values()]
        np.testing.assert_allclose([bar.get_height() for bar in ax.patches],
                                   [np.mean(v) for v in seeds])
        np.testing.assert_allclose(np.concatenate([d.get_ydata() for d in markers(ax, "o")]),
                                   np.concatenate(seeds))
        assert [t.get_text() for t in ax.get_xticklabels()] == [SHORT_NAMES[r] for r in rows]
    table = markdown(results)
    assert table == (root / "runs" / "table1.md").read_text().strip()
    assert "Pythia + SOrT (SQ + IQ)" in table and "*paper: Pythia + SQuINT*" in table
    assert "71.81" in table and "Paired difference from the baseline" in table
    assert "Paired difference from the control" in table
    assert "per template" in table and "probe: text_only" in table
    assert any(f", {k}/2" in table for k in range(3))


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--rows", "baseline", "control"]) == 2
    assert "--tune-seeds" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--rows", "sort", "--tune-seeds", "0"]) == 2
    assert "baseline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--bce-grid", "-1"])
    assert "error" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--seeds", "--tune-seeds", "--jobs", "--bce-grid", "--irrelevant-grid",
                 "--attention-grid", "--finetune-epochs", "--synthetic-test-groups", "--rows",
                 "--probe-seeds", "--margin", "--image-glimpses", "--synthetic-design"):
        assert flag in text


def test_shifted_prior_world_reports_agreeing_and_conflicting_questions(tmp_path):
    """In the shift design every row's entry holds the prior breakdown under flat names, the
    paired statistics compare them, and the table and figure show them."""
    small = list(TINY)
    small[small.index("--rows") + 1:small.index("--attention-grid")] = ["baseline", "control",
                                                                         "sort"]
    small[small.index("--probe-seeds") + 1] = "0"
    argv = ["--out", str(tmp_path / "runs"), "--json", str(tmp_path / "t.json"), "--figure",
            str(tmp_path / "t.png"), "--synthetic-design", "shift", *small]
    assert main(argv) == 0
    results = json.loads((tmp_path / "t.json").read_text())
    for row in ("baseline", "control", "sort"):
        for entry in results["methods"][row]:
            breakdown = entry["prior_agreement"]
            assert entry["shortcut_gap"] == pytest.approx(
                breakdown["agreeing"]["reasoning_accuracy"]
                - breakdown["conflicting"]["reasoning_accuracy"])
            assert entry["conflicting_consistency"] == breakdown["conflicting"]["consistency"]
            assert set(PRIOR) <= set(entry)
    gap = results["stats"]["vs_baseline"]["sort"]["shortcut_gap"]
    diffs = [m["shortcut_gap"] - b["shortcut_gap"] for m, b in
             zip(results["methods"]["sort"], results["methods"]["baseline"])]
    assert gap["mean"] == pytest.approx(np.mean(diffs))
    table = markdown(results)
    assert "agrees or conflicts with the training prior" in table
    assert "conflicting_reasoning_accuracy" in table.split("Paired difference")[1]
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_balanced_world_has_no_prior_columns(tiny):
    _, _, results = tiny
    assert not any(key in entry for key in PRIOR for entry in results["methods"]["sort"])
    assert "training prior" not in markdown(results)


# the protocol flags as the hand-kept list of the first protocol named them, in its order
RECORDED_PROTOCOL_FLAGS = (
    "seeds", "tune_seeds", "probe_seeds", "rows", "pretrain_epochs", "finetune_epochs",
    "attention_grid", "bce_grid", "irrelevant_grid", "margin", "hidden_dim", "joint_dim",
    "image_glimpses", "batch_groups", "lr", "synthetic_seed", "synthetic_design",
    "synthetic_train_groups", "synthetic_val_groups", "synthetic_test_groups", "device")


def test_protocol_flags_come_from_the_parser_in_the_recorded_order():
    assert protocol_flags(build_parser()) == RECORDED_PROTOCOL_FLAGS


def test_a_protocol_flag_added_to_the_parser_is_compared_on_a_rerun(tmp_path, monkeypatch,
                                                                     capsys):
    def with_knob():
        parser = build_parser()
        group = next(g for g in parser._action_groups if g.title == table1.PROTOCOL_GROUP)
        group.add_argument("--knob", type=int, default=1, help="a new protocol flag")
        return parser

    monkeypatch.setattr(table1, "build_parser", with_knob)
    root = tmp_path / "runs"
    argv = ["--out", str(root), "--json", "", "--figure", "", *TINY]
    stored = check_protocol(with_knob().parse_args(argv), root, protocol_flags(with_knob()))
    assert stored["knob"] == 1 and json.loads((root / "protocol.json").read_text()) == stored
    assert main([*argv, "--knob", "2"]) == 2
    err = capsys.readouterr().err
    assert "(--knob differ)" in err and err.count("\n") == 1


def _fake_results(prior: bool) -> dict:
    """Table 1 results of three rows and two seeds: row i, seed s scores 0.1 (i + 1) + 0.01 s
    on every metric; with ``prior`` also on the prior columns."""
    keys = ["consistency", "coupling_over_mode", "reasoning_accuracy", "sub_accuracy", "mp1",
            "mrr", "map", "wpr_over_range", *(PRIOR if prior else ())]
    rows = [[{"seed": s, **{k: 0.1 * (i + 1) + 0.01 * s for k in keys}} for s in (0, 1)]
            for i in range(3)]
    return {"pretrained": rows[0], "methods": {"baseline": rows[1], "sort": rows[2]},
            "paper": PAPER, "protocol": {"synthetic_design": "shift", "synthetic_seed": 3}}


@pytest.mark.parametrize("prior", [False, True])
def test_figure_shows_every_rows_mean_its_seeds_and_the_papers_value(tmp_path, prior):
    results = _fake_results(prior)
    with saved_figures() as figures:
        plot(results, tmp_path / "t.png")
    (figure,) = figures
    assert "shift design, world 3" in suptitle(figure)
    assert "2 seeds" in suptitle(figure)
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == (10 if prior else 8)
    assert ("Shortcut gap (agreeing − conflicting) ↓" in titles) == prior
    assert ("Reasoning acc., prior-conflicting ↑" in titles) == prior
    column = {header: key for key, _, header, *_ in METRICS}
    for ax in figure.axes:
        np.testing.assert_allclose([bar.get_height() for bar in ax.patches],
                                   [10.5, 20.5, 30.5])
        np.testing.assert_allclose([bar.get_x() + bar.get_width() / 2 for bar in ax.patches],
                                   [0, 1, 2])
        dots = markers(ax, "o")
        np.testing.assert_allclose([d.get_ydata() for d in dots], [[10, 11], [20, 21], [30, 31]])
        diamonds = markers(ax, "D")
        key = column.get(ax.get_title())
        if key is None:  # not a column of the paper's Table 1
            assert diamonds == []
        else:
            assert [(float(d.get_xdata()[0]), float(d.get_ydata()[0])) for d in diamonds] == [
                (1.0, pytest.approx(100 * PAPER["baseline"][key])),
                (2.0, pytest.approx(100 * PAPER["sort"][key]))]
