"""Shared fixtures: the real MNIST, found as the programs find it (MNIST_DIR, then the user
cache, else downloaded and verified; CI sets MNIST_DIR). A missing data set is an error, never a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


ROOT = Path(__file__).resolve().parent
# The device command of docs/devices.md, verbatim: the rehearsal runs exactly this string.
PREPARE_COMMAND = "bash scripts/accelerator_check.sh --prepare"
DEVICE_COMMAND = 'PYTHON=python3 bash scripts/accelerator_check.sh "$OUT" --full'


def copy_checkout(source: Path, target: Path, carry: tuple[str, ...] = ()) -> Path:
    """What the device tool sends: the files git tracks or does not ignore, and the ignored
    paths named in `carry`, into `target`, with nothing beside it (no ../shared)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in [n for n in listed if n and (source / n).is_file()] + [str(p.relative_to(source)) for c in carry
                                                                        for p in (source / c).rglob("*") if p.is_file()]:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)
    return target


def device_env(tmp: Path, **extra: str) -> dict:
    """The device machine's conditions, as far as a CPU machine can take them: the interpreter is
    `python3` on PATH (here a wrapper around this one: nothing installed into the copy), no
    MNIST_DIR or PYTHONPATH, an empty user cache and no MNIST mirror that answers."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    drop = {"MNIST_DIR", "PYTHONPATH", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "PYTHON", "ACCELERATOR_CHECK_STAND_IN"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "HOME": str(tmp / "home"), "XDG_CACHE_HOME": str(tmp / "home" / "cache"),
            "MNIST_MIRRORS": "http://127.0.0.1:9/", **extra}


def device_checkout(tmp: Path, mnist_dir: Path) -> Path:
    """The checkout as the device receives it: PREPARE_COMMAND run in a copy here (MNIST from
    `mnist_dir`, as CI's ../shared/data/mnist), then that copy sent with carry [".device"]."""
    here = copy_checkout(ROOT, tmp / "here" / "repo")
    subprocess.run(["bash", "-c", PREPARE_COMMAND], cwd=here, env={**os.environ, "MNIST_DIR": str(mnist_dir)},
                   check=True, capture_output=True)
    return copy_checkout(here, tmp / "device" / "repo", carry=(".device",))


def start_device_command(checkout: Path, out: Path, env: dict) -> subprocess.Popen:
    """DEVICE_COMMAND in `checkout`, in a session of its own (so that all of it can be killed)."""
    return subprocess.Popen(["bash", "-c", DEVICE_COMMAND], cwd=checkout, env={**env, "OUT": str(out)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="session")
def device_copy(tmp_path_factory, mnist_dir) -> Path:
    return device_checkout(tmp_path_factory.mktemp("device"), mnist_dir)


@pytest.fixture(scope="session")
def accelerator_rehearsal(tmp_path_factory, device_copy) -> tuple[int, str, Path]:
    """DEVICE_COMMAND run once through, with the CPU stand-in: its exit code, output and OUT.
    Its own tests and the benchmark's read it (its benchmark stages are `benchmark.py --quick`)."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    check = start_device_command(device_copy, tmp / "out", device_env(tmp, ACCELERATOR_CHECK_STAND_IN="cpu"))
    output, _ = check.communicate(timeout=1200)
    return check.returncode, output, tmp / "out"


# Opt-in markers and their options: the slow tests (the README's full command, CI's), whole
# default recipes (by hand only), and the TFDS test (needs TensorFlow, which no extra installs:
# .ci/run runs it in its own step).
OPT_IN = {"slow": "--runslow", "tfds": "--run-tfds", "full_run": "--run-full"}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (full training runs)")
    parser.addoption("--run-tfds", action="store_true", help="also run the tests marked tfds (need TensorFlow and the tfds extra)")
    parser.addoption("--run-full", action="store_true", help="also run the tests marked full_run (whole default recipes)")


def pytest_collection_modifyitems(config, items):
    """Opt-in tests are deselected (and counted as such) unless asked for, never silently skipped."""
    off = [marker for marker, option in OPT_IN.items() if not config.getoption(option)]
    kept, opted_out = [], []
    for item in items:
        (opted_out if any(item.get_closest_marker(marker) for marker in off) else kept).append(item)
    if opted_out:
        config.hook.pytest_deselected(items=opted_out)
        items[:] = kept
