"""benchmarks/count_launches.py: the census of one trainer step, split by phase."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import count_launches  # noqa: E402


def test_count_launches_split_sums_to_the_step(capsys):
    census = count_launches.count_step()
    rows = count_launches.table(census, us_per_launch=5.0)
    total = rows[-1]
    assert total["phase"] == "total"
    assert sum(r["ops"] for r in rows[:-1]) == total["ops"] == census.kernels()
    assert set(census.phases()) <= set(count_launches.PHASES)  # no operator left unassigned
    assert all(r["ops"] > 0 for r in rows)
    assert abs(total["overhead_ms"] - total["ops"] * 5e-3) < 1e-9
    assert census.transfers == []  # a CPU step: every tensor on one device
    foreach = count_launches.count_step(foreach=True)
    assert foreach.kernels("optimizer") < census.kernels("optimizer")
    assert foreach.kernels() - foreach.kernels("optimizer") == \
        census.kernels() - census.kernels("optimizer")
    assert count_launches.main([]) == 0
    assert "total" in capsys.readouterr().out
