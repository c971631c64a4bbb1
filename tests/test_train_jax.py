"""The JAX model, its training step on real MNIST, and the training script's CLI and outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import data as D
from common.config import DESIGNS, PRESETS, Config, build_parser
from common.loop import next_steps
from common.metrics import score
from jax_impl import train as T

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, env: dict | None = None, script: str = "train_jax.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.parametrize("design", DESIGNS)
def test_model_output_shapes(design):
    model = T.init_model(replace(Config(), design=design))
    for n in (1, 7, 128):
        digit, summ = model(jnp.zeros((n, 28, 28, 1)), jnp.arange(n, dtype=jnp.int32) % 10)
        assert digit.shape == (n, 10) and summ.shape == (n, 19)


@pytest.mark.parametrize("design", DESIGNS)
def test_the_number_reaches_the_sum_head(design):
    model = T.init_model(replace(Config(), design=design))
    digit, summ = model(jnp.ones((2, 28, 28, 1)), jnp.array([0, 9], jnp.int32))
    assert not np.allclose(summ[0], summ[1])
    if design == "digit":  # the digit head never sees r in this design
        np.testing.assert_array_equal(digit[0], digit[1])


@pytest.mark.slow
def test_a_real_epoch_slice_learns(splits):
    """250 steps (about half an epoch) of the real train step on real MNIST."""
    train, test = splits
    cfg = replace(Config(), epochs=1, steps_per_call=5)
    steps = 250
    trainer = T.JaxTrainer(cfg, train, total_steps=steps)
    losses = np.concatenate([trainer.train_steps(b) for b in D.epoch_batches(len(train), cfg.batch_size, 0, 1)[:steps].reshape(-1, 5, cfg.batch_size)])
    assert losses[-20:].mean() < 0.5 * losses[:5].mean()
    m = score(*trainer.predict(test.images, test.numbers), test.labels, test.numbers)
    assert m["test_digit_acc"] > 0.96  # chance is 0.10; a broken pipeline stays near it
    # The flatten design's sum head starts slowly (24% seen here, 98% after 2 epochs); the
    # commonest sum, 9, is 10% of pairs, so > 18% already needs the number and the image.
    assert m["test_sum_acc"] > 0.18


DEEP = replace(Config(), trunk="deep", design="digit", conv1=8, conv2=16, hidden=32)


def test_the_deep_trunk_trains_its_parameters_and_carries_its_batch_statistics(splits):
    """The optimiser (and its weight decay) sees the parameters alone; the running statistics
    move with each training step, beside them in the state; evaluation uses them, so an
    example's logits do not depend on the examples evaluated with it."""
    train, test = splits
    trainer = T.JaxTrainer(replace(DEEP, weight_decay=0.1), train, total_steps=1)
    state = trainer.state
    assert set(state) == {"params", "opt_state", "batch_stats"}
    params, stats = jax.tree.leaves(state["params"]), jax.tree.leaves(state["batch_stats"])
    assert len(stats) == 8  # mean and variance of 4 batch norms
    mu = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]  # Adam's moments, no step counters
    assert [x.shape for x in mu] == 2 * [x.shape for x in params]
    before = [np.asarray(x) for x in stats]
    trainer.train_steps(D.epoch_batches(len(train), DEEP.batch_size, 0, 1)[:1])
    after = jax.tree.leaves(trainer.state["batch_stats"])
    assert all(not np.array_equal(a, b) for a, b in zip(after, before))
    together = trainer.predict(test.images[:64], test.numbers[:64])
    alone = trainer.predict(test.images[:1], test.numbers[:1])
    # float32: the padded call sizes differ (16 and 64), so the convolutions may sum in another order
    np.testing.assert_allclose(alone[0][0], together[0][0], rtol=1e-5, atol=1e-5)


def test_the_weight_average_changes_what_is_evaluated_and_nothing_that_is_trained(splits):
    """--ema 0 (the default) keeps the state, the step and the checkpoints as they were; with a
    decay the average follows the parameters and batch statistics by its rule, and evaluation
    reads it. Decay 0.5 over 3 steps: w0 / 8 + w1 / 8 + w2 / 4 + w3 / 2."""
    train, test = splits
    batches = D.epoch_batches(len(train), DEEP.batch_size, 0, 1)[:3]
    plain, averaged = (T.JaxTrainer(replace(DEEP, ema=ema), train, total_steps=3) for ema in (0.0, 0.5))
    assert "ema" not in plain.state and set(averaged.state["ema"]) == {"params", "batch_stats"}
    seen = [jax.tree.map(np.asarray, T.model_weights(plain.state))]
    for k in range(3):
        np.testing.assert_array_equal(plain.train_steps(batches[k : k + 1]), averaged.train_steps(batches[k : k + 1]))
        seen.append(jax.tree.map(np.asarray, T.model_weights(plain.state)))
    for a, b in zip(jax.tree.leaves(T.model_weights(plain.state)), jax.tree.leaves(T.model_weights(averaged.state))):
        np.testing.assert_array_equal(a, b)  # the average never feeds back into training
    want = jax.tree.map(lambda w0, w1, w2, w3: w0 / 8 + w1 / 8 + w2 / 4 + w3 / 2, *seen)
    for got, expected in zip(jax.tree.leaves(averaged.state["ema"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)  # float32: another order of the same sums
    digit, _ = averaged.predict(test.images[:100], test.numbers[:100])
    assert not np.allclose(digit, plain.predict(test.images[:100], test.numbers[:100])[0])


def test_prediction_covers_every_test_example(splits):
    _, test = splits
    trainer = T.JaxTrainer(Config(), splits[0], total_steps=1)
    digit, summ = trainer.predict(test.images[:2345], test.numbers[:2345])  # not a multiple of the chunk
    assert digit.shape == (2345, 10) and summ.shape == (2345, 19)
    one_by_one = trainer.predict(test.images[2344:2345], test.numbers[2344:2345])
    np.testing.assert_allclose(one_by_one[0][0], digit[-1], rtol=1e-5, atol=1e-5)  # float32 batch-size effects


def test_dry_run_writes_every_output_and_says_what_next(tmp_path, mnist_dir):
    out = tmp_path / "run"
    result = run_script("--dry-run", "--out", str(out), "--data-dir", str(mnist_dir), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == next_steps(out).splitlines()
    assert f"--run {out}" in result.stdout  # the predict command names this run
    # --device is PyTorch's flag: a JAX run says so rather than ignore it in silence.
    assert "warning: --device cpu is PyTorch's (train_torch.py)" in result.stderr.splitlines()[0]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["dry_run"] is True and config["environment"]["jax"]
    cache = Path(config["environment"]["compile_cache"])  # compiled programs kept for the next start
    assert cache.is_dir() and any(cache.iterdir())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[0]) >= {"epoch", "train_loss", "test_loss", "test_digit_acc", "test_sum_acc", "train_time_s", "epoch_time_s"}
    for plot in ("curves", "confusion_digit", "confusion_sum", "samples"):
        assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "5").is_dir()  # Orbax steps count training steps: a dry run makes 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "-1"], "--epochs must be in 1..10000, got -1"),
        (["--batch-size", "0"], "--batch-size must be in 1..60000, got 0"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "abc"], "invalid float value"),
        (["--design", "middle"], "--design must be one of"),
        (["--data-dir", "/definitely/not/here"], "no such directory"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(args, message, tmp_path):
    result = run_script(*args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_lists_what_each_preset_sets():
    help_text = " ".join(build_parser("", Config()).format_help().split())
    for name, overrides in PRESETS.items():
        listed = help_text.split(f" {name}: ", 1)[1]
        for key, value in overrides.items():
            assert f"--{key.replace('_', '-')} {value}" in listed.split(";")[0], (name, key)


def test_the_torch_reference_refuses_jax_only_flags(tmp_path):
    result = run_script("--precision", "bf16", "--dry-run", "--out", str(tmp_path / "run"), script="train_torch.py")
    assert result.returncode == 2
    assert "for train_jax.py" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_corrupted_data_file_gives_one_line_and_exit_2(mnist_dir, tmp_path):
    from tests.test_data import copy_mnist, rewrite

    copy = copy_mnist(mnist_dir, tmp_path / "mnist")
    rewrite(copy / "train-labels-idx1-ubyte.gz", lambda raw: raw[:-7])
    result = run_script("--dry-run", "--data-dir", str(copy), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "train-labels-idx1-ubyte.gz: truncated" in result.stderr
