"""Run folders: a launch without --out gets a folder of its own, a folder holding a run is never
trained into by accident, two processes never train into one folder, a folder that cannot be
written is one line before training, and every numeric flag is checked before anything is
written (the flags of every script, each refused in one line)."""

from __future__ import annotations

import fcntl
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import MAX_SEED, resolve
from tests.test_resume import command, metrics

ROOT = Path(__file__).resolve().parents[1]
ROOT_ON_PATH = {**os.environ, "PYTHONPATH": str(ROOT)}  # for scripts given with -c, run from other folders
PLOTS = ("curves", "confusion_digit", "confusion_sum", "samples")


def train(*args: str, framework: str = "jax", cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(framework, *args), capture_output=True, text=True, timeout=600, cwd=cwd, **kwargs)


def one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def assert_complete_dry_run(run: Path) -> None:
    assert (run / "config.json").is_file()
    assert len(metrics(run)) == 1
    assert (run / "checkpoints" / "5").is_dir()
    for plot in PLOTS:
        assert (run / f"{plot}.png").stat().st_size > 0


@pytest.mark.slow
def test_default_out_twice_gives_two_complete_runs(tmp_path, mnist_dir):
    for _ in range(2):
        result = train("--dry-run", cwd=tmp_path, env={**os.environ, "MNIST_DIR": str(mnist_dir)})
        assert result.returncode == 0, result.stderr
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2
    for run in runs:
        assert re.fullmatch(r"\d{8}-\d{6}-default(-\d+)?", run.name), run.name
        assert_complete_dry_run(run)
    assert metrics(runs[0]) == metrics(runs[1])  # the same recipe and seed, each complete
    assert (tmp_path / "runs" / "latest").resolve() == runs[1].resolve()
    assert f"run folder: runs/{runs[1].name}" in result.stdout


@pytest.mark.slow
def test_a_fresh_run_into_a_run_is_refused_and_overwrite_replaces_it(tmp_path):
    run = tmp_path / "run"
    assert train("--dry-run", "--out", str(run)).returncode == 0
    before = {name: (run / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    first_metrics = metrics(run)
    refused = train("--dry-run", "--seed", "1", "--out", str(run))
    line = one_line_error(refused)
    assert "already holds a run" in line and f"--resume {run}" in line and "--overwrite" in line
    assert {name: (run / name).read_bytes() for name in before} == before  # untouched
    (run / "extra-file-of-the-old-run").write_text("x")
    replaced = train("--dry-run", "--seed", "1", "--out", str(run), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not (run / "extra-file-of-the-old-run").exists()  # the old run was removed first
    assert '"seed": 1' in (run / "config.json").read_text()
    assert metrics(run) != first_metrics  # another seed trained
    assert_complete_dry_run(run)


def test_a_folder_of_other_files_is_never_written_into_or_deleted(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        line = one_line_error(train("--dry-run", "--out", str(folder), *extra))
        assert "holds no run" in line
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_two_processes_never_train_in_one_folder(tmp_path):
    run = tmp_path / "run"
    assert train("--dry-run", "--out", str(run)).returncode == 0
    before = metrics(run)
    with open(run / ".lock") as lock:  # what a training process holds while it runs
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (["--resume", str(run)], ["--dry-run", "--out", str(run), "--overwrite"]):
            line = one_line_error(train(*args))
            assert "another process is training in this folder" in line
    assert metrics(run) == before and (run / "checkpoints" / "5").is_dir()


def test_a_failed_start_leaves_no_run_behind(tmp_path):
    """A launch that stops before training (here: no MNIST) leaves no config.json to mistake for a run."""
    for args in (["--out", str(tmp_path / "run")], []):
        line = one_line_error(train("--dry-run", "--data-dir", str(tmp_path / "no-mnist"), *args, cwd=tmp_path))
        assert "no-mnist" in line
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()  # the launch made runs/ for itself: it goes too


# A training script that receives SIGINT (as from Ctrl-C) while MNIST loads, before any step.
SIGNAL_WHILE_LOADING = """
import signal, sys
from common import loop
load_splits = loop.load_splits
def load_then_signal(cfg):
    splits = load_splits(cfg)
    signal.raise_signal(signal.SIGINT)
    return splits
loop.load_splits = load_then_signal
from common.cli import run_main
from scripts.train_jax import main
run_main(lambda: main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_signal_before_training_says_truly_what_is_left(tmp_path):
    """A fresh launch leaves nothing and says so; a resumed run is left as it was and says how to go on."""
    fresh = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_LOADING, "--dry-run"], cwd=tmp_path, env=ROOT_ON_PATH,
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 128 + signal.SIGINT, fresh.stderr
    assert fresh.stderr.strip() == "interrupted: SIGINT outside the training steps; nothing was saved"
    assert list(tmp_path.iterdir()) == []
    run = tmp_path / "run"
    assert train("--dry-run", "--out", str(run)).returncode == 0
    (run / "metrics.jsonl").unlink()  # as if stopped before its first epoch was logged: a run to resume
    # config.json records each launch's own flags (the resume rewrites it); nothing else may change.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "config.json"}
    resumed = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_LOADING, "--resume", str(run)], env=ROOT_ON_PATH,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 128 + signal.SIGINT, resumed.stderr
    assert resumed.stderr.strip() == (f"interrupted: SIGINT outside the training steps; the run is as it was; "
                                      f"--resume {run} continues it")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "config.json"} == before


def test_an_out_that_is_not_a_folder_is_one_line(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    line = one_line_error(train("--dry-run", "--out", str(file / "run")))
    assert str(file) in line and "Not a directory" in line
    assert "not a folder" in one_line_error(train("--dry-run", "--out", str(file)))


def no_file_writes() -> None:
    """A file-size limit of 0: every write into a file fails (EFBIG), as on a full disk or over
    quota; unlike a read-only mount it needs no privileges, and unlike chmod it stops root too."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_an_unwritable_out_is_one_line_before_training(tmp_path):
    for out in (tmp_path / "new", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        line = one_line_error(train("--dry-run", "--no-compile-cache", "--out", str(out), preexec_fn=no_file_writes))
        assert f"{out}/" in line and "File too large (EFBIG)" in line
    assert not (tmp_path / "new").exists()  # made by the launch, removed with what it wrote
    assert list((tmp_path / "empty").iterdir()) == [(tmp_path / "empty" / ".lock")]


def test_several_processes_need_an_explicit_out(tmp_path):
    line = one_line_error(train("--dry-run", "--coordinator", "127.0.0.1:1", "--num-processes", "2", cwd=tmp_path))
    assert "need --out" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_several_processes_refuse_a_run_folder_together(tmp_path):
    """Only process 0 checks and locks the folder; the others take its verdict and stop too,
    instead of waiting for it forever or writing checkpoints into another run."""
    from tests.test_sharding import cpu_devices, free_port

    run = tmp_path / "run"
    assert train("--dry-run", "--out", str(run)).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(command("jax", "--dry-run", "--out", str(run), "--coordinator", coordinator,
                                      "--num-processes", "2", "--process-id", str(i)),
                              env=cpu_devices(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errors
    assert "already holds a run" in errors[0].strip().splitlines()[-1]
    assert errors[1].strip().splitlines()[-1] == f"error: process 0 refused the run folder {run} (see its message)"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


BAD_NUMBERS = [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr=-1e-3"], "--lr must be in"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number"),
    (["--label-smoothing", "1"], "--label-smoothing must be below 1"),
    (["--sum-weight=-inf"], "--sum-weight must be a finite number"),
    (["--seed", "-1"], "--seed must be in 0..2147483647"),
    (["--seed", str(MAX_SEED + 1)], "--seed must be in 0..2147483647"),
    (["--seed", str(2**64)], "--seed must be in 0..2147483647"),
    (["--epochs", "0"], "--epochs must be in"),
    (["--batch-size", "100000"], "--batch-size must be in"),
    (["--shift", "-1"], "--shift must be in"),
    (["--holdout-pairs", "51"], "--holdout-pairs must be in"),
    (["--conv1", "0"], "--conv1 must be in"),
    (["--devices", "-1"], "--devices must be in"),
    (["--steps-per-call", "257"], "--steps-per-call must be in"),
    (["--num-processes", "0"], "--num-processes must be in"),
    (["--epochs", "nan"], "invalid int value"),
]


@pytest.mark.parametrize("args, message", BAD_NUMBERS)
def test_every_numeric_training_flag_rejects_nan_inf_and_out_of_range(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        resolve(args, "test")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_bad_number_is_refused_before_anything_is_written(framework, tmp_path):
    for args in (["--seed", "-1"], ["--seed", str(2**40)], ["--lr", "nan"]):
        assert "must be" in one_line_error(train(*args, "--dry-run", "--out", str(tmp_path / "run"), framework=framework))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be in"),
    (["--steps", "-5"], "--steps must be in"),
    (["--max-epochs", "0"], "--max-epochs must be in"),
    (["--batch-sizes", "32,0"], "--batch-sizes must each be in"),
    (["--batch-sizes", "100000"], "--batch-sizes must each be in"),
    (["--batch-sizes", "nan"], "--batch-sizes wants integers"),
    (["--steps", "nan"], "invalid int value"),
    (["--speedrun-preset", "speedrun,nope"], "--speedrun-preset wants one or more of"),
    (["--speedrun-preset", "fast,fast"], "--speedrun-preset wants one or more of"),
])
def test_benchmark_flag_errors_are_one_line(args, message, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args, "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert message in one_line_error(result)
    assert not out.exists()
