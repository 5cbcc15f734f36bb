"""Hooks of the benchmark suites.

* Quick sizes by default: deselects the cases that :data:`common.FULL_ONLY` reserves for
  ``--benchmark-full`` (the option is defined in the root ``conftest.py``).
* ``SORT_BENCH_JSONL=PATH``: every benchmark appends one JSON line to ``PATH`` as soon as it
  ends (pytest-benchmark's ``--benchmark-json`` writes only when the whole session ends, so a
  session stopped by a time limit would leave nothing). The line holds what
  ``--benchmark-json`` stores per benchmark (``name``, ``group``, ``params``, ``extra_info``,
  ``stats`` in seconds), or ``name`` and ``error`` for a benchmark that failed.
* ``SORT_BENCH_SMOKE=1``: the smoke sizes of :data:`common.SMOKE_SIZES` and at most
  :data:`common.SMOKE_ROUNDS` rounds per benchmark (``gpu.sh --dry-run``).
"""
from __future__ import annotations

import os
from typing import Iterator, List

import pytest

from common import SMOKE_ROUNDS, SMOKE_SIZES, append_jsonl, full_only, smoke

JSONL_ENV = "SORT_BENCH_JSONL"


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if config.getoption("benchmark_full", default=False):
        return
    keep: List[pytest.Item] = []
    drop: List[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        (drop if full_only(item.path.name, params) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keeps each phase's report on the item (``item.report_call``) for the fixture below."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def benchmark(benchmark, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[object]:
    """pytest-benchmark's fixture, at the smoke sizes under ``SORT_BENCH_SMOKE=1`` and
    recording its result under ``SORT_BENCH_JSONL``."""
    if smoke():
        for name, value in SMOKE_SIZES.get(request.path.name, {}).items():
            monkeypatch.setattr(request.module, name, value)
        pedantic = benchmark.pedantic

        def capped(*args, rounds: int = 1, warmup_rounds: int = 0, **kwargs):
            return pedantic(*args, rounds=min(rounds, SMOKE_ROUNDS),
                            warmup_rounds=min(warmup_rounds, SMOKE_ROUNDS), **kwargs)

        monkeypatch.setattr(benchmark, "pedantic", capped)
    yield benchmark
    path = os.environ.get(JSONL_ENV)
    if not path:
        return
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = (crash.message if crash is not None else str(report.longrepr)).strip()
        append_jsonl(path, {"name": request.node.name,
                            "error": message.splitlines()[0] if message else "failed"})
    elif benchmark.stats is not None:
        append_jsonl(path, benchmark.stats.as_dict(include_data=False))
