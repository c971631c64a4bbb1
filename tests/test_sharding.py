"""Data parallelism over several devices and processes, bfloat16 compute, and their flags.

This process already runs JAX with one CPU device, so the several-device runs happen in child
processes that set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing JAX
(`python -m tests.test_sharding`, below, is the child that trains on several devices)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from common import data as D
from common.config import Config
from tests.test_resume import metrics  # metrics.jsonl without the timings

ROOT = Path(__file__).resolve().parents[1]
# A narrow network keeps each step to milliseconds on two cores; the sharding is the same.
SMALL = replace(Config(), conv1=8, conv2=16, hidden=64, batch_size=128, seed=3, epochs=1)
SMALL_FLAGS = ["--conv1", "8", "--conv2", "16", "--hidden", "64", "--seed", "3"]
STEPS, PER_CALL = 20, 4


def cpu_devices(n: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def train_script(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train_jax.py"), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the child: the same steps on 1 and on N devices ------------------------------------


def child(subset: Path, devices: list[int]) -> None:
    """Trains SMALL for STEPS steps (with augmentation) from the same start on each device count;
    prints the losses and final parameters' differences as JSON."""
    import jax

    from jax_impl import train as T

    with np.load(subset) as f:
        split = D.Split(f["images"], f["labels"], f["numbers"])
    batches = D.epoch_batches(len(split), SMALL.batch_size, SMALL.seed, 1)[:STEPS]
    shifts = D.epoch_offsets(STEPS, SMALL.batch_size, SMALL.shift, SMALL.seed, 1)
    runs = {}
    for n in devices:
        trainer = T.JaxTrainer(replace(SMALL, jax_devices=n), split, total_steps=STEPS)
        losses = np.concatenate([trainer.train_steps(batches[i : i + PER_CALL], shifts[i : i + PER_CALL])
                                 for i in range(0, STEPS, PER_CALL)])
        params = T.distributed.local_copy(trainer.state["params"])
        runs[n] = {"losses": losses.tolist(), "mesh": trainer.mesh.size,
                   "param_sharding": str(jax.tree.leaves(trainer.state["params"])[0].sharding),
                   "params": [np.asarray(p) for p in jax.tree.leaves(params)]}
    first = runs[devices[0]]["params"]
    print(json.dumps({"device_count": jax.device_count(), **{
        str(n): {"losses": r["losses"], "mesh": r["mesh"], "param_sharding": r["param_sharding"],
                 "param_max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(r["params"], first))}
        for n, r in runs.items()}}))


def run_child(tmp_path: Path, train: D.Split, cpu_count: int, devices: list[int]) -> dict:
    subset = tmp_path / "subset.npz"  # the first 8,192 real training pairs (the whole set, on 8 devices, is 8x 47 MB)
    np.savez(subset, images=train.images[:8192], labels=train.labels[:8192], numbers=train.numbers[:8192])
    result = subprocess.run([sys.executable, "-m", "tests.test_sharding", str(subset), *map(str, devices)],
                            cwd=ROOT, env=cpu_devices(cpu_count), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_devices_follow_the_single_device_losses(splits, tmp_path):
    out = run_child(tmp_path, splits[0], 8, [1, 8])
    assert out["device_count"] == 8
    one, eight = out["1"], out["8"]
    assert one["mesh"] == 1 and eight["mesh"] == 8 and "spec=P()" in eight["param_sharding"]  # parameters replicated
    # The only difference is the order of float32 summation: the batch mean of the loss and each
    # gradient are 8 partial sums of 16 examples, all-reduced, instead of one sum of 128. That
    # moves each by an ulp or two (~1e-7 relative; 2e-7 is the largest loss difference seen over
    # these 20 steps, 1e-7 the largest parameter difference), and 20 Adam steps barely amplify it.
    # 1e-5 leaves 50x headroom, while a real fault (a device averaging only its own 16 examples,
    # a device fed the wrong slice) changes the loss from the second step on by > 1e-3.
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=0)
    assert eight["param_max_abs_diff"] < 1e-5
    assert eight["losses"][-1] < 0.9 * eight["losses"][0]  # and it trains


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(tmp_path, mnist_dir):
    """Two processes on localhost, one CPU device each, joined through a coordinator, train a dry
    run together; process 0 alone writes the outputs. One process with two devices runs the very
    same computation (each device: half of each batch; one all-reduce of two partial sums,
    which is order-free), so its metrics are equal, exactly; one process on one device sums in
    another order, so its are equal up to float32 rounding."""
    run = tmp_path / "two_processes"
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(train_script("--dry-run", "--data-dir", str(mnist_dir), *SMALL_FLAGS, "--out", str(run), "--coordinator", coordinator,
                                           "--num-processes", "2", "--process-id", str(i)),
                              env=cpu_devices(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["num_processes"] == 2 and len(config["environment"]["devices"]) == 2
    assert len(metrics(run)) == 1  # one line: process 1 appended nothing
    assert (run / "checkpoints" / "5").is_dir()  # Orbax saved with both processes

    single = tmp_path / "one_process"
    result = subprocess.run(train_script("--dry-run", "--data-dir", str(mnist_dir), *SMALL_FLAGS, "--devices", "2", "--out", str(single)),
                            env=cpu_devices(2), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert metrics(run) == metrics(single)

    plain = tmp_path / "one_device"
    result = subprocess.run(train_script("--dry-run", "--data-dir", str(mnist_dir), *SMALL_FLAGS, "--out", str(plain)),
                            env=cpu_devices(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (got,), (want,) = metrics(run), metrics(plain)
    for key in ("train_loss", "test_loss"):  # 1e-8 relative seen; 1e-5 as in the 8-device test above
        assert got[key] == pytest.approx(want[key], rel=1e-5)
    for key in ("test_digit_acc", "test_sum_acc"):  # at most one of the 500 dry-run test pairs could flip
        assert got[key] == pytest.approx(want[key], abs=1 / 500)


@pytest.mark.slow
def test_bf16_trains_close_to_fp32(splits):
    import jax

    from jax_impl import train as T

    train, _ = splits
    cfg = replace(Config(), epochs=1)
    steps = 30
    batches = D.epoch_batches(len(train), cfg.batch_size, cfg.seed, 1)[:steps]
    shifts = D.epoch_offsets(steps, cfg.batch_size, cfg.shift, cfg.seed, 1)
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = T.JaxTrainer(replace(cfg, precision=precision), train, total_steps=steps)
        if precision == "bf16":  # the convolutions really run in bfloat16
            hlo = trainer._train.train.lower(trainer.state, trainer.dataset, *trainer.place_batch(batches[:5], shifts[:5])).as_text()
            assert any("convolution" in line and "bf16" in line for line in hlo.splitlines())
        losses[precision] = np.concatenate([trainer.train_steps(batches[i : i + 5], shifts[i : i + 5])
                                            for i in range(0, steps, 5)])
        assert {str(p.dtype) for p in jax.tree.leaves(trainer.state)} <= {"float32", "int32"}
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert bf16[-5:].mean() < 0.75 * bf16[:5].mean()  # it trains: ~35% down in 30 steps (fp32: the same)
    # bfloat16 keeps 8 significant bits: each weight, activation and product is off by up to
    # 2^-9 (0.2%) relative, but the errors of the many terms of each sum mostly cancel: the
    # first loss differs by 3e-5 relative (seen), the mean of the last 5 by 0.4% after 30 steps
    # from slightly different gradients. The bars (0.5%, 5%) leave 10x headroom or more, and
    # 5% is still far below the ~35% the loss falls by here: a bf16 path that stalls, or
    # mixes up a cast, fails.
    assert abs(bf16[0] - fp32[0]) < 0.005 * fp32[0]
    assert abs(bf16[-5:].mean() - fp32[-5:].mean()) < 0.05 * fp32[-5:].mean()


@pytest.mark.parametrize(
    "args, devices, message",
    [
        (["--precision", "xyz"], 1, "--precision must be one of fp32, bf16"),
        (["--devices", "2"], 1, "--devices 2: only 1 device(s) available"),
        (["--devices", "2", "--batch-size", "101"], 2, "--batch-size 101 must be divisible by the number of devices (2)"),
        (["--num-processes", "2"], 1, "--num-processes and --process-id need --coordinator"),
    ],
)
def test_bad_values_give_one_line_and_exit_2(args, devices, message, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(train_script(*args, "--out", str(out)), env=cpu_devices(devices),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()  # refused before any output


if __name__ == "__main__":
    child(Path(sys.argv[1]), [int(n) for n in sys.argv[2:]])
