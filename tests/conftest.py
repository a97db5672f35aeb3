"""Shared pytest configuration: fixtures live in tests/fixtures/ and are registered here.

The end-to-end demos (``tests/e2e``) run last, side by side (``tests/e2e/demos.py``);
the integration tests run first, then the unit tests. (Starting the demos at collection,
beside the integration tests, saved ~3 min but a loaded machine made a healthy canary
time out and roll back in one CI run of three.)
"""

from __future__ import annotations

import sys

import pytest

pytest_plugins = ["tests.fixtures.prefect", "tests.fixtures.world"]


def _is_e2e(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is not None


def _order(item: pytest.Item) -> int:
    """Integration tests first (they mostly wait on servers: they leave the background
    demos CPU), then the unit tests (CPU-bound, short), the e2e tests last."""
    if _is_e2e(item):
        return 2
    return 0 if "integration" in item.path.parts else 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(_is_e2e(i) for i in items):
        items.sort(key=_order)  # stable: each group keeps its order


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    demos = sys.modules.get("tests.e2e.demos")
    if demos is None:
        return
    problems = demos.stop_if_running()
    if problems:
        print("\n".join(["end-to-end demos left running:", *problems]))
