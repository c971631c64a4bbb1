"""Killed or interrupted training resumes to exactly what an uninterrupted run gives."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# A narrow network and big batches keep each epoch to seconds; the mechanism is the same.
SMALL = ["--epochs", "2", "--batch-size", "500", "--conv1", "8", "--conv2", "16", "--hidden", "64", "--seed", "3"]


def command(framework: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / f"train_{framework}.py"), *args]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in rows]  # timings differ run to run


def final_params(framework: str, run: Path) -> dict:
    if framework == "torch":
        from torch_ref import checkpoint

        return {k: v.numpy() for k, v in checkpoint.load(run / checkpoint.FILE)["model"].items()}
    import jax

    from jax_impl import checkpoint

    mngr = checkpoint.manager(run / "checkpoints")
    restored = mngr.restore(mngr.latest_step())  # raw pytree, no target needed for comparison
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(restored["state"])}


def stop_mid_epoch_2(framework: str, run: Path, sig: int) -> subprocess.CompletedProcess | None:
    """Starts a run, waits until epoch 1's checkpoint is complete and a few steps of epoch 2 ran, sends `sig`."""
    proc = subprocess.Popen(command(framework, *SMALL, "--out", str(run)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    epoch_1_saved = run / ("checkpoints/120" if framework == "jax" else "checkpoint.pt")  # 120 steps per epoch
    while not epoch_1_saved.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(1.0)  # into epoch 2
    assert proc.poll() is None, "the run ended before it could be stopped: make it longer"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = {}
    for framework in ("jax", "torch"):
        run = tmp_path_factory.mktemp(f"ref_{framework}")
        result = subprocess.run(command(framework, *SMALL, "--out", str(run)), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        runs[framework] = run
    return runs


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_sigkill_mid_epoch_then_resume_is_identical(framework, reference, tmp_path):
    run = tmp_path / "killed"
    result = stop_mid_epoch_2(framework, run, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    assert len(metrics(run)) == 1
    resumed = subprocess.run(command(framework, "--resume", str(run)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == metrics(reference[framework])
    want, got = final_params(framework, reference[framework]), final_params(framework, run)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # bit-identical on CPU


def test_ctrl_c_saves_mid_epoch_and_resumes_identically(reference, tmp_path):
    run = tmp_path / "interrupted"
    result = stop_mid_epoch_2("jax", run, signal.SIGINT)
    assert result.returncode == 130, result.stderr
    assert "saved epoch 2, step" in result.stdout + result.stderr
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] % 120 != 0  # a checkpoint inside epoch 2 (120 steps per epoch), not at its end
    resumed = subprocess.run(command("jax", "--resume", str(run)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == metrics(reference["jax"])
    want, got = final_params("jax", reference["jax"]), final_params("jax", run)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_same_seed_twice_gives_identical_metrics(tmp_path):
    for name in ("a", "b"):
        result = subprocess.run(command("jax", "--dry-run", "--seed", "5", "--out", str(tmp_path / name)),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_resume_of_a_missing_run_is_one_line(tmp_path):
    result = subprocess.run(command("jax", "--resume", str(tmp_path / "nothing")), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --resume") and len(result.stderr.strip().splitlines()) == 1


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "diverged"
    result = subprocess.run(command("jax", *SMALL, "--lr", "1e30", "--out", str(run)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "not finite" in result.stderr and "Traceback" not in result.stderr
