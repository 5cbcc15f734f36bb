"""Training-curve and run-comparison plots (python -m sort_fast.training.plots)."""
import json

from sort_fast.training.plots import CURVES, main


def fake_run(folder, method, consistency):
    folder.mkdir()
    lines = [{"event": "train", "step": s, "epoch": 0, "lr": 1e-3, "loss": 2.0 / s,
              "contrastive": 0.3 / s, "groups_per_s": 10.0} for s in range(1, 11)]
    metrics = {"consistency": consistency, "reasoning_accuracy": 0.6, "sub_accuracy": 0.7,
               "mp1": 0.4, "mrr": 0.5, "map": 0.45, "ranking_accuracy": 0.2}
    lines += [{"event": "eval", "step": s, **metrics} for s in (5, 10)]
    (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"method": method, "metrics": metrics}))
    return folder


def test_curves_and_comparison(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "Pythia + SOrT", 0.61)
    b = fake_run(tmp_path / "b", "Pythia", 0.55)
    assert main(["curves", str(a)]) == 0
    assert (a / CURVES).stat().st_size > 10_000
    out = tmp_path / "compare.png"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
