"""What the plots of an evaluation and of training runs show (python -m sort_fast.training.plots):
the plotted values of known inputs, read back from the matplotlib figures."""
import json

import numpy as np
import pytest

from saved_figures import saved_figures, suptitle
from sort_fast.layout import ROLE_IRRELEVANT, ROLE_REASONING, ROLE_SUB
from sort_fast.training.eval_result import EvalResult, Example
from sort_fast.training.plots import CURVES, PLOTS, main, plot_all

METRICS = {"consistency": 0.61, "reasoning_accuracy": 0.6, "sub_accuracy": 0.7, "mp1": 0.4,
           "mrr": 0.5, "map": 0.45, "ranking_accuracy": 0.2}
LABELS = ["consistency", "reasoning acc.", "sub-question acc.", "MP@1", "MRR", "MAP",
          "ranking acc."]


def fake_run(folder, method, consistency):
    folder.mkdir()
    lines = [{"event": "train", "step": s, "epoch": 0, "lr": 1e-3, "loss": 2.0 / s,
              "contrastive": 0.3 / s, "groups_per_s": 10.0} for s in range(1, 11)]
    metrics = {**METRICS, "consistency": consistency}
    lines += [{"event": "eval", "step": s, **metrics} for s in (5, 10)]
    (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"method": method, "metrics": metrics}))
    return folder


def test_curves_show_the_logged_losses_and_evaluations(tmp_path):
    a = fake_run(tmp_path / "a", "Pythia + SOrT", 0.61)
    with saved_figures() as figures:
        assert main(["curves", str(a)]) == 0
    assert (a / CURVES).read_bytes()[:4] == b"\x89PNG"
    (figure,) = figures
    loss_ax, eval_ax = figure.axes
    assert suptitle(figure) == str(a)
    steps = np.arange(1, 11)
    losses = {line.get_label(): line for line in loss_ax.lines}
    assert set(losses) == {"loss", "contrastive"}  # step, epoch, lr and speed are not losses
    np.testing.assert_allclose(losses["loss"].get_xdata(), steps)
    np.testing.assert_allclose(losses["loss"].get_ydata(), 2.0 / steps)
    np.testing.assert_allclose(losses["contrastive"].get_ydata(), 0.3 / steps)
    assert [line.get_label() for line in eval_ax.lines] == LABELS
    for line, value in zip(eval_ax.lines, METRICS.values()):
        np.testing.assert_allclose(line.get_xdata(), [5, 10])
        np.testing.assert_allclose(line.get_ydata(), [100 * value] * 2)


def test_comparison_shows_one_bar_per_run_and_metric(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "Pythia + SOrT", 0.61)
    b = fake_run(tmp_path / "b", "Pythia", 0.55)
    out = tmp_path / "compare.png"
    with saved_figures() as figures:
        assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (Pythia + SOrT)",
                                                                  "b (Pythia)"]
    heights = [bar.get_height() for bar in ax.patches]
    assert len(heights) == 2 * len(METRICS)
    expected = [100 * v for v in METRICS.values()]
    np.testing.assert_allclose(heights, [*expected, 55.0, *expected[1:]])
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


def _result():
    """An evaluation of two groups: quadrants, cosines per role and one example group whose
    cosines rank the irrelevant question above the sub-question."""
    metrics = {"r_right_s_right": 0.5, "r_right_s_wrong": 0.25, "r_wrong_s_right": 0.125,
               "r_wrong_s_wrong": 0.125, "consistency": 2 / 3}
    roles = np.array([ROLE_REASONING, ROLE_SUB, ROLE_SUB, ROLE_IRRELEVANT] * 2)
    similarity = np.array([1.0, 0.52, 0.32, -0.42, 1.0, 0.72, 0.12, -0.22])  # mid-bin
    cam = np.array([1.0, 3.0])
    boxes = np.array([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])
    example = Example(questions=["is it washable?", "is the cup clean?", "is there a dog?"],
                      roles=np.array([ROLE_REASONING, ROLE_SUB, ROLE_IRRELEVANT]),
                      similarity=np.array([1.0, -0.1, 0.2]), predicted=["yes", "no", "yes"],
                      correct=np.array([True, False, True]), cam=cam, boxes=boxes,
                      grounding=None)
    return EvalResult(metrics, similarity, roles, [example])


def test_evaluation_plots_show_quadrants_cosines_and_ranked_examples(tmp_path):
    with saved_figures() as figures:
        plot_all(_result(), tmp_path, "Pythia + SOrT")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PLOTS)  # no log.jsonl: no curves
    quadrants, histogram, examples = figures
    (ax,) = quadrants.axes
    assert ax.get_title() == "Pythia + SOrT: consistency 66.7%"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["R✓S✓", "R✓S✗", "R✗S✓", "R✗S✗"]
    np.testing.assert_allclose([bar.get_height() for bar in ax.patches], [50, 25, 12.5, 12.5])
    assert [t.get_text() for t in ax.texts] == ["50.0", "25.0", "12.5", "12.5"]

    (ax,) = histogram.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "sub-questions (mean 0.42)", "irrelevant (mean -0.32)"]
    bars = ax.patches
    assert len(bars) == 2 * 40  # 40 bins over [-1, 1] per role
    width = 2 / 40  # a density histogram: each role's bars hold its 4 and 2 cosines
    assert sum(bar.get_height() for bar in bars[:40]) * width == pytest.approx(1.0)
    filled = [round(bar.get_x(), 6) for bar in bars if bar.get_height() > 0]
    assert filled == [0.1, 0.3, 0.5, 0.7, -0.45, -0.25]

    text_ax, cam_ax, truth_ax = examples.axes[:3]
    assert [t.get_text() for t in text_ax.texts] == [
        "R  is it washable? → yes (right)",
        "I  +0.20  is there a dog? → yes (right)",  # ranked by cosine, highest first
        "S  -0.10  is the cup clean? → no (wrong)"]
    heat = cam_ax.get_images()[0].get_array()
    assert heat.max() == pytest.approx(1.0)  # normalised to its maximum
    assert heat[:, -1].mean() == pytest.approx(1.0) and heat[:, 0].mean() == pytest.approx(1 / 3)
    assert truth_ax.get_title() == "no grounding"
    assert truth_ax.get_images()[0].get_array().max() == 0


def test_evaluation_plots_add_the_curves_of_a_training_run(tmp_path):
    run = fake_run(tmp_path / "run", "Pythia", 0.5)
    with saved_figures() as figures:
        plot_all(_result(), run, "Pythia")
    assert len(figures) == len(PLOTS) + 1
    assert suptitle(figures[-1]) == "Pythia"
    assert (run / CURVES).exists()
