"""Repository-wide pytest hooks: the benchmark entry point.

* ``pytest``: the tests in ``tests/`` only (pyproject ``testpaths``), as before.
* ``pytest --benchmark-only``: every benchmark suite in ``benchmarks/`` (``bench_*.py``) at its
  quick sizes, instead of the tests (which ``--benchmark-only`` would all skip);
  ``--benchmark-full`` selects the full sizes (the quick/full table is in
  ``benchmarks/common.py``).
* A ``--benchmark-only`` run that selects no benchmark fails (exit status 4) instead of passing
  with every test skipped.

Explicit paths (``pytest benchmarks/bench_loss.py --benchmark-only``) are collected as given.
"""
from __future__ import annotations

import pytest

BENCHMARK_DIR = "benchmarks"


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here rather than in benchmarks/conftest.py: that file is only loaded once collection
    # reaches benchmarks/, after the command line has been parsed.
    parser.addoption(
        "--benchmark-full",
        action="store_true",
        default=False,
        help="benchmarks/: run every suite at its full sizes (default: the quick sizes; "
        "see benchmarks/common.py)",
    )


def _benchmark_only(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", default=False))


def pytest_configure(config: pytest.Config) -> None:
    if _benchmark_only(config) and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.args[:] = [str(config.rootpath / BENCHMARK_DIR)]


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if not _benchmark_only(config) or config.option.collectonly:
        return
    if not any("benchmark" in getattr(item, "fixturenames", ()) for item in session.items):
        raise pytest.UsageError(
            f"--benchmark-only selected no benchmark among {len(session.items)} collected "
            f"item(s) from {' '.join(map(str, config.args))}; run `pytest --benchmark-only` at "
            f"the repository root (all suites) or name a benchmarks/bench_*.py file"
        )
