"""Quick sizes by default: deselects the cases that :data:`common.FULL_ONLY` reserves for
``--benchmark-full`` (the option is defined in the root ``conftest.py``)."""
from __future__ import annotations

from typing import List

import pytest

from common import full_only


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if config.getoption("benchmark_full"):
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
