"""Shared fixtures: the real MNIST, found as the programs find it (MNIST_DIR, then the user
cache, else downloaded and verified; CI sets MNIST_DIR). A missing data set is an error, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import data as D


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    try:
        return D.locate(None)
    except D.DataError as e:
        pytest.fail(f"MNIST not found: {e}")


@pytest.fixture(scope="session")
def mnist_arrays(mnist_dir) -> dict:
    return D.load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def splits(mnist_arrays) -> tuple[D.Split, D.Split]:
    return D.make_splits(mnist_arrays, seed=0)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (full training runs)")


def pytest_collection_modifyitems(config, items):
    """Full training runs are opt-in: deselected (and counted as such), never silently skipped."""
    if config.getoption("--runslow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
