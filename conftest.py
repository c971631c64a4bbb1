"""Shared fixtures: the real MNIST, found as the programs find it (MNIST_DIR, then the user
cache, else downloaded and verified; CI sets MNIST_DIR). A missing data set is an error, never a skip."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from common import data as D


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    try:
        return D.locate(None).resolve()  # absolute: some tests start scripts from other folders
    except D.DataError as e:
        pytest.fail(f"MNIST not found: {e}")


@pytest.fixture(scope="session")
def mnist_arrays(mnist_dir) -> dict:
    return D.load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def splits(mnist_arrays) -> tuple[D.Split, D.Split]:
    return D.make_splits(mnist_arrays, seed=0)


ACCELERATOR_CHECK = Path(__file__).resolve().parent / "scripts" / "accelerator_check.sh"
NO_GPU = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}  # the smoke mode, even where a GPU is


def accelerator_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ACCELERATOR_CHECK), str(out)], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, **NO_GPU, **env})


@pytest.fixture(scope="session")
def accelerator_smoke(tmp_path_factory, mnist_dir) -> tuple[subprocess.CompletedProcess, Path]:
    """scripts/accelerator_check.sh in smoke mode, run once: its result and OUT_DIR. Its own test
    and the benchmark's read it (its benchmark stage is `benchmark.py --quick`)."""
    out = tmp_path_factory.mktemp("accelerator_check") / "check"
    return accelerator_check(out, MNIST_DIR=str(mnist_dir)), out


# Opt-in markers and their options: full training runs (minutes), and the TFDS test (needs
# TensorFlow, which no extra installs: .ci/run runs it in its own step).
OPT_IN = {"slow": "--runslow", "tfds": "--run-tfds"}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (full training runs)")
    parser.addoption("--run-tfds", action="store_true", help="also run the tests marked tfds (need TensorFlow and the tfds extra)")


def pytest_collection_modifyitems(config, items):
    """Opt-in tests are deselected (and counted as such) unless asked for, never silently skipped."""
    off = [marker for marker, option in OPT_IN.items() if not config.getoption(option)]
    kept, opted_out = [], []
    for item in items:
        (opted_out if any(item.get_closest_marker(marker) for marker in off) else kept).append(item)
    if opted_out:
        config.hook.pytest_deselected(items=opted_out)
        items[:] = kept
