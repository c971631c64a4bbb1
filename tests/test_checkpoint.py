"""Checkpoints of both frameworks (jax_impl/checkpoint.py, torch_ref/checkpoint.py) on small real
models and real files: what a save writes and when it returns, the checksums that refuse a
damaged checkpoint on resume and on predict, what a failed write leaves, and the steps a save
refuses."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from common.errors import CheckpointError, UserError
from common.config import ADDED_LATER, CONFIG_FORMAT, Config
from common.integrity import MANIFEST
from jax_impl import checkpoint as jax_checkpoint
from jax_impl.train import init_model, make_optimizer
from torch_ref import checkpoint as torch_checkpoint
from torch_ref import train as torch_train
from torch_ref.model import SumNet

ROOT = Path(__file__).resolve().parents[1]
SMALL = Config(conv1=8, conv2=16, hidden=64, design="digit")
POSITION = {"epoch": 2, "step": 3, "losses": [0.5, 0.25, 0.125]}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@contextmanager
def file_size_limit(limit: int):
    """No file of this process can grow past `limit` bytes: writes fail with EFBIG, the way a full
    disk fails them with ENOSPC (Python ignores SIGXFSZ, so the write returns the error)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# --- JAX ----------------------------------------------------------------------------


def jax_state(seed: int) -> dict:
    _, params = nnx.split(init_model(replace(SMALL, seed=seed)))
    return {"params": params, "opt_state": make_optimizer(SMALL, 10).init(params)}


def assert_same_tree(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def param_shapes() -> dict:
    """What prediction reads from a checkpoint of SMALL's state (no batch norm, no average)."""
    return {"params": nnx.split(nnx.eval_shape(lambda: init_model(SMALL)))[1]}


def test_jax_save_is_complete_and_checksummed_when_it_returns_and_restores_exactly(tmp_path):
    mngr = jax_checkpoint.manager(tmp_path / "checkpoints")
    state = jax_state(0)
    jax_checkpoint.save(mngr, 7, state, POSITION)
    # Nothing left in flight: no temporary folder, and the checksums cover every file written.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["7"]
    folder = tmp_path / "checkpoints" / "7"
    lines = (folder / MANIFEST).read_text().splitlines()
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert [line.split("  ")[1] for line in lines] == files and any(f.startswith("state/") for f in files)
    for line in lines:  # the format of coreutils' sha256sum
        digest, name = line.split("  ")
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    restored, meta = jax_checkpoint.restore(jax_checkpoint.manager(tmp_path / "checkpoints"), jax_state(1))
    assert meta == POSITION
    assert_same_tree(restored, state)
    weights, step = jax_checkpoint.load_params(tmp_path / "checkpoints", param_shapes())
    assert step == 7
    assert_same_tree(weights["params"], state["params"])


def test_jax_a_flipped_byte_is_refused_on_resume_and_on_predict(tmp_path):
    mngr = jax_checkpoint.manager(tmp_path / "checkpoints")
    jax_checkpoint.save(mngr, 7, jax_state(0), POSITION)
    folder = tmp_path / "checkpoints" / "7"
    data = largest_file(folder / "state")
    flip_a_byte(data)
    message = f"{folder}: corrupted checkpoint ({data.relative_to(folder)}: its SHA-256 differs"
    with pytest.raises(CheckpointError) as resumed:
        jax_checkpoint.restore(jax_checkpoint.manager(tmp_path / "checkpoints"), jax_state(1))
    assert str(resumed.value).startswith(message) and isinstance(resumed.value, UserError)
    with pytest.raises(CheckpointError) as predicted:
        jax_checkpoint.load_params(tmp_path / "checkpoints", param_shapes())
    assert str(predicted.value).startswith(message)


def test_jax_a_save_killed_before_its_checksums_is_not_used(tmp_path):
    mngr = jax_checkpoint.manager(tmp_path / "checkpoints")
    state = jax_state(0)
    jax_checkpoint.save(mngr, 5, state, {"epoch": 1, "step": 5, "losses": []})
    jax_checkpoint.save(mngr, 10, jax_state(1), {"epoch": 2, "step": 0, "losses": []})
    (tmp_path / "checkpoints" / "10" / MANIFEST).unlink()  # as if killed between Orbax's commit and the checksums
    assert jax_checkpoint.load_params(tmp_path / "checkpoints", param_shapes())[1] == 5
    mngr = jax_checkpoint.manager(tmp_path / "checkpoints")
    restored, meta = jax_checkpoint.restore(mngr, jax_state(2))
    assert meta["epoch"] == 1
    assert_same_tree(restored, state)
    assert mngr.all_steps() == [5]  # the unfinished step is gone, so the resumed run can save it again
    jax_checkpoint.save(mngr, 10, jax_state(1), {"epoch": 2, "step": 0, "losses": []})
    assert mngr.all_steps() == [5, 10]
    # The very first save killed that way: nothing to predict with, and a resume starts afresh.
    (tmp_path / "checkpoints" / "5" / MANIFEST).unlink()
    (tmp_path / "checkpoints" / "10" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"5: corrupted checkpoint \\(no {MANIFEST}: its save did not finish"):
        jax_checkpoint.load_params(tmp_path / "checkpoints", param_shapes())
    mngr = jax_checkpoint.manager(tmp_path / "checkpoints")
    mngr.delete(10)
    assert jax_checkpoint.restore(mngr, jax_state(2)) is None and mngr.all_steps() == []


def test_jax_a_checkpoint_says_its_format_and_a_newer_one_is_refused_on_resume(tmp_path, monkeypatch):
    """The format rides in the step's metadata beside the position; resume hands back the position
    alone. A newer format is refused where resuming would add this version's saves beside it;
    prediction still reads it (the parameters' names and shapes are checked either way)."""
    mngr = jax_checkpoint.manager(tmp_path / "checkpoints")
    jax_checkpoint.save(mngr, 7, jax_state(0), POSITION)
    restored = jax_checkpoint.manager(tmp_path / "checkpoints").restore(7)
    assert restored["meta"]["format"] == jax_checkpoint.FORMAT == 1
    assert jax_checkpoint.restore(jax_checkpoint.manager(tmp_path / "checkpoints"), jax_state(1))[1] == POSITION
    monkeypatch.setattr(jax_checkpoint, "FORMAT", 2)  # as a newer version would save
    jax_checkpoint.save(mngr, 8, jax_state(0), POSITION)
    monkeypatch.setattr(jax_checkpoint, "FORMAT", 1)
    with pytest.raises(CheckpointError, match="8: checkpoint format 2, this version reads 1"):
        jax_checkpoint.restore(jax_checkpoint.manager(tmp_path / "checkpoints"), jax_state(1))
    assert jax_checkpoint.load_params(tmp_path / "checkpoints", param_shapes())[1] == 8


def test_jax_a_lower_step_is_refused_and_the_same_step_replaced(tmp_path):
    mngr = jax_checkpoint.manager(tmp_path / "checkpoints")
    jax_checkpoint.save(mngr, 10, jax_state(0), POSITION)
    with pytest.raises(CheckpointError, match="holds step 10, later than step 5"):
        jax_checkpoint.save(mngr, 5, jax_state(0), POSITION)  # Orbax alone would skip it and return
    later = {"epoch": 3, "step": 0, "losses": []}
    jax_checkpoint.save(mngr, 10, jax_state(0), later)
    assert mngr.all_steps() == [10]
    assert jax_checkpoint.restore(jax_checkpoint.manager(tmp_path / "checkpoints"), jax_state(1))[1] == later


def test_jax_a_failed_write_raises_its_os_error_and_leaves_only_the_earlier_checkpoints(tmp_path):
    mngr = jax_checkpoint.manager(tmp_path / "checkpoints")
    state = jax_state(0)
    jax_checkpoint.save(mngr, 5, state, POSITION)
    with file_size_limit(64_000), pytest.raises(OSError) as failed:  # the fc kernel alone is 200 kB
        jax_checkpoint.save(mngr, 10, jax_state(1), POSITION)
    assert failed.value.errno == errno.EFBIG and str(tmp_path / "checkpoints" / "10") in str(failed.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["5"]  # no temporary folders
    restored, _ = jax_checkpoint.restore(jax_checkpoint.manager(tmp_path / "checkpoints"), jax_state(2))
    assert_same_tree(restored, state)
    jax_checkpoint.save(mngr, 10, jax_state(1), POSITION)  # once there is room again, the same manager saves
    assert mngr.all_steps() == [5, 10]


def test_jax_a_failed_write_prints_nothing(tmp_path):
    """Orbax logs the failure from its threads and tensorstore reports to a closed event loop:
    none of it may reach stderr, so the training script's one-line error stays one line."""
    script = f"""
import resource
from flax import nnx
from common.config import Config
from jax_impl import checkpoint
from jax_impl.train import init_model
_, params = nnx.split(init_model(Config(conv1=8, conv2=16, hidden=64)))
mngr = checkpoint.manager({str(tmp_path / "checkpoints")!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, resource.RLIM_INFINITY))
try:
    checkpoint.save(mngr, 5, params, {{}})
except OSError as e:
    print(e.errno)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == str(errno.EFBIG) and result.stderr == "", result.stderr[-3000:]


# --- PyTorch --------------------------------------------------------------------------


def torch_training(seed: int) -> tuple:
    torch.manual_seed(seed)
    model = SumNet(SMALL)
    opt, sched = torch_train.make_optimizer(SMALL, model, 10)
    loss = torch_train.loss_fn(model, torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))
    loss.backward()
    opt.step()  # Adam's moments and the scheduler's position are not zeros
    sched.step()
    return model, opt, sched


def assert_same_state_dicts(got, want) -> None:
    """Equal, tensor for tensor, bit for bit (a model's, an optimiser's or a scheduler's state)."""
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_state_dicts(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same_state_dicts(a, b)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:
        assert got == want


def test_torch_save_carries_its_checksum_and_restores_exactly(tmp_path):
    path = tmp_path / torch_checkpoint.FILE
    model, opt, sched = torch_training(0)
    torch_checkpoint.save(path, 7, POSITION, model, opt, sched)
    header, payload = path.read_bytes().split(b"\n", 1)
    assert header == f"mnist-sum checkpoint step=7 sha256={hashlib.sha256(payload).hexdigest()}".encode()
    assert [p.name for p in tmp_path.iterdir()] == [torch_checkpoint.FILE]  # no temporary file
    other = torch_training(1)
    assert torch_checkpoint.restore(path, *other) == POSITION
    for got, want in zip(other, (model, opt, sched)):
        assert_same_state_dicts(got.state_dict(), want.state_dict())
    fresh = SumNet(SMALL)
    assert torch_checkpoint.load_params(path, fresh) == 7
    assert_same_state_dicts(fresh.state_dict(), model.state_dict())
    assert torch_checkpoint.restore(tmp_path / "none.pt", *other) is None


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "header"])
def test_torch_a_damaged_checkpoint_is_refused_on_resume_and_on_predict(damage, tmp_path):
    path = tmp_path / torch_checkpoint.FILE
    torch_checkpoint.save(path, 7, POSITION, *torch_training(0))
    if damage == "flipped_byte":
        flip_a_byte(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    else:
        path.write_bytes(b"\0" * 10 + path.read_bytes()[10:])
    with pytest.raises(CheckpointError, match=f"^{path}: corrupted checkpoint"):
        torch_checkpoint.restore(path, *torch_training(1))
    with pytest.raises(CheckpointError, match=f"^{path}: corrupted checkpoint"):
        torch_checkpoint.load_params(path, SumNet(SMALL))


def test_torch_a_checkpoint_says_its_format_and_a_newer_one_is_refused_on_resume(tmp_path, monkeypatch):
    path = tmp_path / torch_checkpoint.FILE
    torch_checkpoint.save(path, 7, POSITION, *torch_training(0))
    assert torch_checkpoint.load(path)["format"] == torch_checkpoint.FORMAT == 1
    monkeypatch.setattr(torch_checkpoint, "FORMAT", 2)  # as a newer version would save
    torch_checkpoint.save(path, 8, POSITION, *torch_training(0))
    monkeypatch.setattr(torch_checkpoint, "FORMAT", 1)
    with pytest.raises(CheckpointError, match=f"^{path}: checkpoint format 2, this version reads 1"):
        torch_checkpoint.restore(path, *torch_training(1))
    assert torch_checkpoint.load_params(path, SumNet(SMALL)) == 8  # prediction checks names and shapes instead


def test_torch_a_lower_step_is_refused_and_the_same_step_replaced(tmp_path):
    path = tmp_path / torch_checkpoint.FILE
    training = torch_training(0)
    torch_checkpoint.save(path, 10, POSITION, *training)
    with pytest.raises(CheckpointError, match="holds step 10, later than step 5"):
        torch_checkpoint.save(path, 5, POSITION, *training)
    later = {"epoch": 3, "step": 0, "losses": []}
    torch_checkpoint.save(path, 10, later, *training)
    assert torch_checkpoint.restore(path, *torch_training(1)) == later


def test_torch_a_failed_write_raises_its_os_error_and_keeps_the_old_file(tmp_path):
    path = tmp_path / torch_checkpoint.FILE
    training = torch_training(0)
    torch_checkpoint.save(path, 5, POSITION, *training)
    before = path.read_bytes()
    with file_size_limit(64_000), pytest.raises(OSError) as failed:
        torch_checkpoint.save(path, 10, POSITION, *training)
    assert failed.value.errno == errno.EFBIG
    assert [p.name for p in tmp_path.iterdir()] == [torch_checkpoint.FILE] and path.read_bytes() == before


# --- resume from the command line -------------------------------------------------


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory, mnist_dir) -> dict[str, Path]:
    """One finished dry run per framework (5 steps of the small model)."""
    base = tmp_path_factory.mktemp("dry")
    procs = {}
    for framework in ("jax", "torch"):
        cmd = [sys.executable, str(ROOT / "scripts" / f"train_{framework}.py"), "--dry-run", "--conv1", "8", "--conv2", "16",
               "--hidden", "64", "--data-dir", str(mnist_dir), "--out", str(base / framework)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if framework == "torch" else None  # two cores, two runs
        procs[framework] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for framework, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    return {framework: base / framework for framework in procs}


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_resume_from_a_flipped_byte_is_one_line(framework, dry_runs, tmp_path):
    """The run killed after its checkpoint was written but before its epoch was logged (so there
    is something to resume), then one byte of the checkpoint's data flipped."""
    run = Path(shutil.copytree(dry_runs[framework], tmp_path / framework))
    (run / "metrics.jsonl").write_text("")
    damaged = largest_file(run / "checkpoints") if framework == "jax" else run / torch_checkpoint.FILE
    flip_a_byte(damaged)
    damaged_bytes = damaged.read_bytes()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / f"train_{framework}.py"), "--resume", str(run)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    checkpoint_name = run / "checkpoints" / "5" if framework == "jax" else damaged
    assert lines == [lines[0]] and lines[0].startswith(f"error: {checkpoint_name}: corrupted checkpoint"), result.stderr
    assert damaged.read_bytes() == damaged_bytes and (run / "metrics.jsonl").read_text() == ""  # nothing touched


def resume(framework: str, run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"train_{framework}.py"), "--resume", str(run)],
                          capture_output=True, text=True, timeout=300)


def edit_config(run: Path, edit) -> None:
    saved = json.loads((run / "config.json").read_text())
    edit(saved)
    (run / "config.json").write_text(json.dumps(saved))


@pytest.mark.parametrize("newer", ["unknown_setting", "newer_format"])
def test_resume_of_a_run_written_by_a_newer_version_is_one_line_and_touches_nothing(newer, dry_runs, tmp_path):
    """Resuming would train without what this version does not know and rewrite config.json
    without it: refused, where prediction and summaries only warn."""
    run = Path(shutil.copytree(dry_runs["jax"], tmp_path / "jax"))
    (run / "metrics.jsonl").write_text("")  # something left to resume
    edit_config(run, (lambda s: s["config"].update(new_field_v2=1)) if newer == "unknown_setting"
                else (lambda s: s.update(format=CONFIG_FORMAT + 1)))
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = resume("jax", run)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    news = "holds settings this version does not know (new_field_v2)" if newer == "unknown_setting" else \
        f"was written by a newer version (config format {CONFIG_FORMAT + 1}; this one reads {CONFIG_FORMAT})"
    assert lines == [f"error: --resume {run}: {run / 'config.json'} {news}; resume it with the version that wrote it "
                     "(this one would train without what it does not know, and drop it from config.json)"], result.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def as_format_0(saved: dict) -> None:
    """config.json as the first versions wrote it: no "format", none of the settings added since."""
    del saved["format"]
    for name in ADDED_LATER:
        del saved["config"][name]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_an_older_run_resumes_with_the_fields_added_later_filled(framework, dry_runs, tmp_path):
    """A config.json of format 0 without the settings added since: resumed as those versions
    trained (no rotation, no held-out pairs...), without a word about flags nobody gave, and its
    config.json then written in this version's format."""
    run = Path(shutil.copytree(dry_runs[framework], tmp_path / framework))
    (run / "metrics.jsonl").write_text("")
    edit_config(run, as_format_0)
    result = resume(framework, run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning" not in result.stderr, result.stderr
    saved = json.loads((run / "config.json").read_text())
    filled = {name: value for name, (_, value) in ADDED_LATER.items() if name != "resume"}  # resume: this launch's
    assert saved["format"] == CONFIG_FORMAT and {name: saved["config"][name] for name in filled} == filled
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
