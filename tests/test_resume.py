"""Killed or interrupted training resumes to exactly what an uninterrupted run gives."""

from __future__ import annotations

import json
import resource
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
# The deep trunk and the weight average: batch norm's running statistics and the average are
# training state beside the parameters. With the record preset's warp, and the elastic field, whose
# draws a resumed epoch must repeat.
DEEP = [*SMALL, "--trunk", "deep", "--design", "digit", "--ema", "0.9", "--rotate", "10", "--scale", "0.1", "--elastic", "2"]


def command(framework: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / f"train_{framework}.py"), *args]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in rows]  # timings differ run to run


def final_params(framework: str, run: Path) -> dict:
    if framework == "torch":
        from torch_ref import checkpoint

        saved = checkpoint.load(run / checkpoint.FILE)
        return {f"{part}.{k}": v.numpy() for part in ("model", "ema") if part in saved for k, v in saved[part].items()}
    import jax

    from jax_impl import checkpoint

    mngr = checkpoint.manager(run / "checkpoints")
    restored = mngr.restore(mngr.latest_step())  # raw pytree, no target needed for comparison
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(restored["state"])}


def epoch_1_logged(run: Path) -> bool:
    """An epoch is logged after its checkpoint is committed: epoch 1 is saved."""
    return (run / "metrics.jsonl").exists() and bool((run / "metrics.jsonl").read_text().strip())


def assert_resumes_identically(framework: str, run: Path, reference: Path) -> None:
    """`--resume run` ends with the very metrics and parameters of the uninterrupted `reference`."""
    resumed = subprocess.run(command(framework, "--resume", str(run)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == metrics(reference)
    want, got = final_params(framework, reference), final_params(framework, run)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def stop_mid_epoch_2(framework: str, run: Path, sig: int, flags: list[str] = SMALL) -> subprocess.CompletedProcess | None:
    """Starts a run, waits until epoch 1 is done (logged, so its checkpoint is committed) and a
    few steps of epoch 2 ran, sends `sig`."""
    proc = subprocess.Popen(command(framework, *flags, "--out", str(run)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not epoch_1_logged(run):
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


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_sigkill_mid_epoch_then_resume_is_identical(framework, reference, tmp_path):
    run = tmp_path / "killed"
    result = stop_mid_epoch_2(framework, run, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    assert len(metrics(run)) == 1
    assert_resumes_identically(framework, run, reference[framework])  # bit-identical on CPU


def last_line(stderr: str) -> str:
    """The last line of stderr, after the progress bars (which redraw themselves with \\r)."""
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_deep_trunk_run_with_a_weight_average_killed_mid_epoch_resumes_identically(framework, tmp_path):
    reference = tmp_path / "reference"
    result = subprocess.run(command(framework, *DEEP, "--out", str(reference)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "killed"
    assert stop_mid_epoch_2(framework, run, signal.SIGKILL, DEEP).returncode == -signal.SIGKILL
    assert_resumes_identically(framework, run, reference)
    names = " ".join(final_params(framework, run))
    assert "mean" in names and "var" in names and "ema" in names  # the statistics and the average were compared


# Each signal once and each framework once: the two signals take one path (common/signals.py,
# whose tests below send both).
@pytest.mark.slow
@pytest.mark.parametrize("framework, sig", [("jax", signal.SIGINT), ("torch", signal.SIGTERM)])
def test_ctrl_c_or_sigterm_saves_mid_epoch_and_resumes_identically(framework, sig, reference, tmp_path):
    run = tmp_path / "interrupted"
    result = stop_mid_epoch_2(framework, run, sig)
    assert result.returncode == 128 + sig, result.stderr  # 130 for Ctrl-C, 143 for SIGTERM
    line = last_line(result.stderr)
    assert line.startswith(f"interrupted: {signal.Signals(sig).name}; saved epoch 2, step "), line
    assert line.endswith(f"continue with --resume {run}") and "Traceback" not in result.stderr
    if framework == "jax":
        saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        assert saved[-1] % 120 != 0  # a checkpoint inside epoch 2 (120 steps per epoch), not at its end
    assert len(metrics(run)) == 1
    assert_resumes_identically(framework, run, reference[framework])


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resumes_identically(framework, reference, tmp_path):
    """From the end of epoch 1 on, no file can grow (a file-size limit of 0 set on the running
    process: EFBIG, the way a full disk gives ENOSPC, without privileges). Epoch 2's checkpoint
    fails: one line, exit 1, epoch 2 not logged, nothing half-written; the run resumes exactly."""
    run = tmp_path / "full"
    # No compilation cache: its writes would fail too, and each with its own warning.
    proc = subprocess.Popen(command(framework, *SMALL, "--no-compile-cache", "--out", str(run)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not epoch_1_logged(run):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, 0))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    line = last_line(err)
    assert line.startswith("error: ") and "File too large (EFBIG)" in line and str(run) in line, line
    assert f"--resume {run}" in line and "Traceback" not in err
    assert len(metrics(run)) == 1  # epoch 2 is not logged: its checkpoint was never committed
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name or "orbax-checkpoint-tmp" in p.name]
    assert leftovers == []
    if framework == "jax":
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["120"]
    assert_resumes_identically(framework, run, reference[framework])


@pytest.fixture
def own_signal_state():
    """The process's handlers and `common.signals`' record, put back after the test."""
    from common import signals

    handlers = {s: signal.getsignal(s) for s in signals.SIGNALS}
    yield signals
    signals._received = None
    for s, handler in handlers.items():
        signal.signal(s, handler)


def test_inside_the_steps_even_a_second_signal_only_records(own_signal_state):
    signals = own_signal_state
    before = signal.getsignal(signal.SIGTERM)
    with signals.during_steps():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)  # a second one: still no exception mid-step
        assert signals.received() == signal.SIGINT
        with pytest.raises(signals.Interrupted, match=r"^SIGINT; saved epoch 2, step 7; continue with --resume run$"):
            raise signals.interrupted("epoch 2, step 7", Path("run"))
    assert signal.getsignal(signal.SIGTERM) is before  # the handler before the loop is back


def test_outside_the_steps_a_signal_stops_at_the_next_check_and_a_second_at_once(own_signal_state):
    signals = own_signal_state
    signals.stop_on_signals()
    signals.raise_if_stopped()  # nothing arrived: no-op
    signal.raise_signal(signal.SIGTERM)  # recorded, not raised (it could land anywhere)
    with pytest.raises(signals.Interrupted, match="^SIGTERM outside the training steps") as stopped:
        signals.raise_if_stopped()
    assert stopped.value.signum == signal.SIGTERM
    with pytest.raises(signals.Interrupted):  # a start that hangs: the second one raises from the handler
        signal.raise_signal(signal.SIGINT)


# The training script, with the metrics log failing (a full disk) when epoch 2 is logged: after
# its checkpoint is committed, before its line is written.
LOG_FAILS_AT_EPOCH_2 = """
import errno, os, sys
from common import runlog
log_epoch = runlog.RunLog.log_epoch
def failing(self, metrics):
    if metrics["epoch"] == 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
    log_epoch(self, metrics)
runlog.RunLog.log_epoch = failing
from common.cli import run_main
from scripts.train_jax import main
run_main(lambda: main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_log_line_lost_after_its_checkpoint_is_written_on_resume(reference, tmp_path):
    run = tmp_path / "lost"
    result = subprocess.run([sys.executable, "-c", LOG_FAILS_AT_EPOCH_2, *SMALL, "--out", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"error: {run / 'metrics.jsonl'}: No space left on device (ENOSPC)"), line
    assert len(metrics(run)) == 1
    resumed = subprocess.run(command("jax", "--resume", str(run)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == metrics(reference["jax"])  # the line came from the checkpoint; no step was redone
    assert (run / "samples.png").exists()
    want, got = final_params("jax", reference["jax"]), final_params("jax", run)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path):
    run = tmp_path / "done"
    assert subprocess.run(command("jax", "--dry-run", "--out", str(run)), capture_output=True, timeout=600).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = subprocess.run(command("jax", "--resume", str(run)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{run}: this run is finished (1 of 1 epochs); nothing to resume"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    for flags, named in ((["--epochs", "3", "--lr", "0.5"], ["--epochs 3", "--lr 0.5"]), (["--overwrite"], ["--overwrite"])):
        refused = subprocess.run(command("jax", "--resume", str(run), *flags), capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and all(flag in lines[0] for flag in named), refused.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
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


def test_non_finite_loss_stops_with_a_one_line_message(tmp_path):
    run = tmp_path / "diverged"
    # Decoupled weight decay of lr * weight_decay = 100 per step multiplies the weights by -99
    # each step: they overflow within epoch 1.
    result = subprocess.run(command("jax", *SMALL, "--lr", "10", "--weight-decay", "10", "--out", str(run)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    line = last_line(result.stderr)
    assert "epoch 1" in line and "not finite" in line and "no checkpoint was saved yet" in line, line
    assert "Traceback" not in result.stderr and not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_run_that_diverges_without_a_nan_says_so_at_the_end_of_the_epoch(tmp_path):
    """lr 10 without weight decay: the loss jumps into the thousands, then the network collapses to
    a constant answer; every loss stays finite, so only this check speaks."""
    result = subprocess.run(command("jax", *SMALL, "--epochs", "1", "--lr", "10", "--out", str(tmp_path / "run")),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: epoch 1:")]
    assert len(warnings) == 1 and "training diverged or stalled; try a lower --lr (this run: 10)" in warnings[0], result.stderr


@pytest.mark.parametrize("train_loss, digit_acc, steps, warned", [
    (0.9, 0.97, 468, False),  # healthy
    (2399.0, 0.11, 120, True),  # the loss in the thousands
    (5.06, 0.11, 468, True),  # collapsed: the loss of a constant answer, below a uniform guess's, and 11% right
    (5.6, 0.30, 5, False),  # a dry run's five steps: too few to judge
])
def test_an_epoch_no_better_than_guessing_is_named_in_one_line(train_loss, digit_acc, steps, warned, capsys):
    from common.config import Config
    from common.loop import warn_if_not_learning

    warn_if_not_learning(Config(), steps, {"epoch": 3, "train_loss": train_loss, "test_digit_acc": digit_acc})
    err = capsys.readouterr().err
    assert (err.count("\n") == 1 and err.startswith("warning: epoch 3:")) if warned else err == ""
