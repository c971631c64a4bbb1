"""Device selection and on-device data, tested on the CPU through the code paths a GPU takes.

PyTorch's trainer keeps the training set on its device and gathers and crops each batch there,
whatever the device, so comparing its batches with JAX's here checks the GPU's data path too.
JAX's accelerator default (steps in a lax.scan) is compared with the CPU's (unrolled) here too."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from common import data as D
from common.config import Config
from common.errors import ConfigError
from common.loop import epoch_plan
from jax_impl import speed
from jax_impl import train as jtrain
from parity import measure as P
from torch_ref import train as ttrain

ROOT = Path(__file__).resolve().parents[1]
SMALL = replace(Config(), conv1=4, conv2=8, hidden=16, batch_size=16, steps_per_call=4)  # shift 2, as the default recipe
# PyTorch's data path runs here on the CPU, and on a machine with a GPU on both.
TORCH_DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def small_split(splits, n: int = 2048) -> D.Split:
    train, _ = splits
    return D.Split(train.images[:n], train.labels[:n], train.numbers[:n])


# --- which device -------------------------------------------------------------------------


def test_auto_is_cuda_exactly_when_pytorch_sees_a_gpu(monkeypatch):
    assert ttrain.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert ttrain.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ttrain.resolve_device("auto") == torch.device("cuda")
    assert ttrain.resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ttrain.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda: PyTorch .* sees no CUDA device"):
        ttrain.resolve_device("cuda")


def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, mnist_dir):
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}  # no GPU, on any machine
    for script in ("train_torch.py", "benchmark.py", "parity_report.py"):
        args = ["--device", "cuda"] + (["--out", str(tmp_path / "run"), "--dry-run"] if script == "train_torch.py" else [])
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                                env=hidden, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "--device cuda" in lines[0], (script, result.stderr[-2000:])
    assert not (tmp_path / "run").exists()


def test_the_torch_trainer_and_its_data_live_on_its_device(splits):
    trainer = ttrain.TorchTrainer(replace(SMALL, torch_device="cpu"), small_split(splits), total_steps=10)
    assert trainer.device == torch.device("cpu")
    for t in (trainer.images, trainer.labels, trainer.numbers, *trainer.model.parameters()):
        assert t.device == trainer.device
    env = ttrain.environment(trainer.device)
    assert env["backend"] == "cpu" and env["device_name"] == "cpu"


def test_the_jax_environment_names_its_device():
    env = jtrain.environment()
    assert env["backend"] == jax.default_backend() and env["device_name"] == jax.devices()[0].device_kind


# --- the same batches and crops -------------------------------------------------------------


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_batches_and_crops_equal_jaxs(splits, device):
    """The images PyTorch's trainer feeds, gathered and cropped on its device, are JAX's."""
    split = small_split(splits)
    cfg = replace(SMALL, torch_device=device)
    trainer = ttrain.TorchTrainer(cfg, split, total_steps=10)
    batches, shifts = epoch_plan(cfg, len(split), 1)
    assert shifts is not None and len(np.unique(shifts)) == 2 * cfg.shift + 1  # every offset occurs
    for k in (0, 3):
        ours = trainer.batch_images(torch.from_numpy(batches[k]).to(trainer.device),
                                    torch.from_numpy(shifts[k]).long().to(trainer.device))
        theirs = jtrain.translate(jnp.asarray(split.images)[batches[k]], jnp.asarray(shifts[k]), cfg.shift)
        assert ours.device == trainer.device and ours.dtype == torch.uint8
        np.testing.assert_array_equal(ours.cpu().numpy(), np.asarray(theirs))
        assert not np.array_equal(np.asarray(theirs), split.images[batches[k]])  # the crops moved the images


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_a_torch_training_step_sees_exactly_those_images(splits, device):
    """train_steps gathers, crops and normalises the batch it is given, on its device: its loss is
    the loss of the JAX-cropped images under the same weights."""
    split = small_split(splits)
    cfg = replace(SMALL, torch_device=device)
    trainer = ttrain.TorchTrainer(cfg, split, total_steps=10)
    batches, shifts = epoch_plan(cfg, len(split), 1)
    images = np.array(jtrain.translate(jnp.asarray(split.images)[batches[1]], jnp.asarray(shifts[1]), cfg.shift))
    on_device = lambda a: torch.from_numpy(a).to(trainer.device)  # noqa: E731
    with P.exact_float32(), torch.no_grad():
        expected = ttrain.loss_fn(trainer.model, ttrain.preprocess(on_device(images)), on_device(split.numbers[batches[1]]).long(),
                                  on_device(split.labels[batches[1]]).long()).item()
    with P.exact_float32():
        losses = trainer.train_steps(batches[1:3], shifts[1:3])  # one chunk: two steps, one read of the losses
    assert losses.shape == (2,) and losses.dtype == np.float64
    assert losses[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_chunks_change_nothing(splits, device):
    """Reading the losses once per chunk instead of once per step trains alike (exactly on a CPU;
    a GPU's backward sums may be ordered differently from run to run)."""
    split = small_split(splits)
    cfg = replace(SMALL, torch_device=device)
    batches, shifts = epoch_plan(cfg, len(split), 1)
    chunked, stepwise = (ttrain.TorchTrainer(cfg, split, total_steps=10) for _ in range(2))
    with P.exact_float32():
        a = chunked.train_steps(batches[:4], shifts[:4])
        b = np.concatenate([stepwise.train_steps(batches[i : i + 1], shifts[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(a, b, rtol=0 if device == "cpu" else 1e-6)


# --- JAX: the loop form of an accelerator, and CPU-only settings -------------------------------


def test_steps_in_a_scan_train_as_the_unrolled_steps(splits):
    """The accelerators' default loop (lax.scan) and the CPU's (unrolled) compute the same steps."""
    split = small_split(splits)
    batches, shifts = epoch_plan(SMALL, len(split), 1)
    cfg = replace(SMALL, steps_per_call=2)
    runs = {}
    for loop in speed.LOOPS:
        trainer = jtrain.JaxTrainer(cfg, split, total_steps=10, loop=loop)
        with P.exact_float32():  # a GPU's TF32 would swamp the comparison
            trainer.train_steps(batches[:2], shifts[:2])  # the fused program compiles meanwhile (speed.py)
            trainer.wait_until_compiled()
            losses = trainer.train_steps(batches[2:4], shifts[2:4])
        runs[loop] = losses, jax.tree.leaves(trainer.state["params"])
        trainer.close()
    np.testing.assert_allclose(runs["scan"][0], runs["unroll"][0], rtol=1e-6)
    for a, b in zip(runs["scan"][1], runs["unroll"][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert speed.default_loop() == ("unroll" if jax.default_backend() == "cpu" else "scan")
    with pytest.raises(ValueError, match="loop"):
        speed.compile_steps(None, None, loop="while")


@pytest.mark.slow
def test_the_background_compile_keeps_float64(splits):
    """The fused program compiles on another thread; it must see the caller's float64, which JAX
    keeps per thread, or the float64 parity check breaks (its call raises a TypeError)."""
    split = small_split(splits, 256)
    cfg = replace(SMALL, shift=0, steps_per_call=2)
    batches, _ = epoch_plan(cfg, len(split), 1)
    params = P.pretrained_params(cfg, split, steps=1)
    with P.float64(), P.exact_float32():
        pair = P.Pair(cfg, split, params, total_steps=10)
        pair.jax.train_steps(batches[:2])
        pair.jax.wait_until_compiled()
        losses = pair.jax.train_steps(batches[2:4])  # the fused program, compiled on the other thread
        assert losses.dtype == np.float64 and np.isfinite(losses).all()
        assert pair.jax_params()["fc"]["kernel"].dtype == np.float64
        pair.jax.close()


def test_the_background_compile_traces_with_the_callers_settings():
    seen = []

    @jax.jit
    def train(state, dataset, idx, shifts):  # records the settings it is traced under
        seen.append((jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision))
        return state, jnp.zeros(idx.shape[0])

    fused = speed.FusedWhenReady(train, 2, lambda idx, shifts: (jnp.asarray(idx), None))
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        fused(jnp.zeros(2), None, np.zeros((2, 3), np.int32), None)  # one step at a time while the fused one compiles
        fused.wait_until_compiled()
    fused.close()
    assert seen and set(seen) == {(True, "highest")}  # the fused trace on the thread (and the one-step one here)


def test_cpu_settings_stay_off_other_backends(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert speed.compiler_options() == {}
    assert not speed.runs_on_calling_thread()
    assert speed.default_loop() == "scan"
    monkeypatch.setattr(speed, "cpu_will_compute", lambda: False)
    applied = []
    monkeypatch.setattr(speed, "keep_freed_memory", lambda: applied.append("malloc"))
    monkeypatch.setattr(speed, "run_on_calling_thread", lambda: applied.append("thread"))
    assert speed.tune_cpu_process() is False and applied == []
    monkeypatch.setattr(speed, "cpu_will_compute", lambda: True)
    assert speed.tune_cpu_process() is True and applied == ["thread", "malloc"]


def test_jax_platforms_decides_before_jax_starts():
    before = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "cuda,cpu")  # read only when JAX starts, which it has here
        assert not speed.cpu_will_compute()
        jax.config.update("jax_platforms", "cpu")
        assert speed.cpu_will_compute()
    finally:
        jax.config.update("jax_platforms", before)


def test_torch_runs_keep_freed_memory_only_on_the_cpu(monkeypatch):
    calls = {}
    monkeypatch.setattr(ttrain, "keep_freed_memory", lambda: calls.setdefault("malloc", True))
    monkeypatch.setattr(ttrain, "run_training", lambda cfg, make, env: calls.update(env=env))
    ttrain.run(replace(Config(), torch_device="cpu"))
    assert calls == {"malloc": True, "env": ttrain.environment(torch.device("cpu"))}


def test_the_torch_trainer_takes_one_step_per_call_on_a_cpu_unless_told(splits):
    """The loop hands a trainer `steps_per_call` batches at once: on a CPU one (the default 0),
    else the number given."""
    for given, expected in ((0, 1), (7, 7)):
        cfg = replace(Config(), torch_device="cpu", steps_per_call=given)
        assert ttrain.TorchTrainer(cfg, splits[0], 10).steps_per_call == expected


# --- TF32 off for parity --------------------------------------------------------------------


def test_exact_float32_turns_tf32_off_on_both_sides_and_back():
    ttrain.allow_tf32(True)
    try:
        with P.exact_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert jax.config.jax_default_matmul_precision == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert jax.config.jax_default_matmul_precision is None
    finally:
        ttrain.allow_tf32(False)
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's own default
