"""Presets and held-out (digit, r) pairs: which pairs, how training avoids them, how they are scored."""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from common import data as D
from common.config import DESIGNS, MAX_HOLDOUT_PAIRS, PRESETS, Config, resolve
from common.loop import load_splits, run_training
from common.metrics import score
from jax_impl.model import NumberLine
from tests.test_train_jax import run_script


def test_held_out_pairs_are_fixed_and_leave_every_class_trained():
    for k in (1, 10, 25, MAX_HOLDOUT_PAIRS):
        held = D.holdout_pairs(k)
        assert len(held) == k and held == D.holdout_pairs(k)  # the same pairs every time
        assert D.holdout_pairs(k - 1) < held  # a larger K holds out more of the same order
        kept = {(d, r) for d in range(10) for r in range(10)} - held
        assert {d for d, _ in kept} == {r for _, r in kept} == set(range(10))
        assert {d + r for d, r in kept} == set(range(19))
        assert (0, 0) not in held and (9, 9) not in held  # the only pairs for the sums 0 and 18
    assert D.holdout_pairs(0) == frozenset()


def test_too_many_held_out_pairs_is_a_clear_error():
    with pytest.raises(D.DataError, match="can be held out"):
        D.holdout_pairs(82)  # 19 pairs must stay for the 19 sums; the constraints bind before that


def test_training_never_sees_a_held_out_pair(mnist_arrays):
    held = D.holdout_pairs(10)
    plain_train, plain_test = D.make_splits(mnist_arrays, seed=3)
    train, test = D.make_splits(mnist_arrays, seed=3, held_out=held)
    assert not D.is_held_out(train.labels, train.numbers, held).any()
    assert len(train) == 60_000 and np.array_equal(train.labels, plain_train.labels)
    was_held = D.is_held_out(plain_train.labels, plain_train.numbers, held)
    assert 0.08 < was_held.mean() < 0.12  # about 10 of 100 pairs
    np.testing.assert_array_equal(train.numbers[~was_held], plain_train.numbers[~was_held])  # only those redrawn
    np.testing.assert_array_equal(test.numbers, plain_test.numbers)  # the test set keeps every pair
    assert D.is_held_out(test.labels, test.numbers, held).sum() > 800


def test_sum_accuracy_is_split_into_seen_and_unseen_pairs():
    labels, numbers = np.array([1, 2, 3, 4]), np.array([0, 0, 0, 0])
    sum_logits = np.eye(19)[[1, 2, 0, 0]]  # right, right, wrong, wrong
    unseen = np.array([False, True, True, True])
    s = score(np.eye(10)[labels], sum_logits, labels, numbers, unseen)
    assert s["test_sum_acc"] == 0.5 and s["test_sum_acc_seen"] == 1.0 and s["test_sum_acc_unseen"] == pytest.approx(1 / 3)
    assert "test_sum_acc_unseen" not in score(np.eye(10)[labels], sum_logits, labels, numbers)


def test_a_preset_sets_defaults_and_flags_still_win():
    for name, overrides in PRESETS.items():
        cfg = resolve(["--preset", name], "test")
        assert cfg.preset == name
        for field, value in overrides.items():
            assert getattr(cfg, field) == value
    fast = resolve(["--preset", "fast", "--epochs", "7"], "test")
    assert fast.epochs == 7 and fast.preset == "fast"
    assert resolve([], "test") == Config()


@pytest.mark.parametrize("flags, sides", [([], (14, 7)), (["--kernel1", "5", "--padding", "valid"], (12, 5)),
                                          (["--kernel2", "5", "--padding", "valid"], (13, 4)),
                                          (["--trunk", "deep"], (14, 7))])
def test_kernels_padding_and_trunk_size_the_fc_layer_in_both_frameworks(flags, sides):
    """28 - 2 (3x3, unpadded) = 26 pools to 13, an odd side: 13 - 4 = 9 pools to 4, the last row
    and column dropped, as PyTorch's pool drops them."""
    from jax_impl.train import init_model
    from torch_ref.model import SumNet

    cfg = resolve(["--design", "digit", *flags], "test")
    assert cfg.trunk_sizes() == sides
    assert init_model(cfg).fc.kernel[...].shape[0] == SumNet(cfg).fc.in_features == sides[1] ** 2 * cfg.conv2


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_jax.py", "train_torch.py"])
def test_the_speedrun_preset_reaches_99_percent_in_its_one_epoch(script, tmp_path, mnist_dir):
    """Seed 0 of the recipe judged over 10 seeds (docs/results.md, "Speedrun"). The bound is the
    recipe's per-seed floor, 98.8%: seed 0 measured 99.02-99.24% on both heads in both frameworks,
    and another CPU's float32 rounding moves a seed by hundredths, not tenths."""
    out = tmp_path / "run"
    result = run_script("--preset", "speedrun", "--out", str(out), "--data-dir", str(mnist_dir), script=script)
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert min(metrics["test_digit_acc"], metrics["test_sum_acc"]) >= 0.988, metrics


def test_holdout_run_reports_unseen_pairs(tmp_path, mnist_dir):
    out = tmp_path / "run"
    result = run_script("--dry-run", "--holdout-pairs", "10", "--out", str(out), "--data-dir", str(mnist_dir))
    assert result.returncode == 0, result.stderr
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= metrics["test_sum_acc_unseen"] <= 1 and 0 <= metrics["test_sum_acc_seen"] <= 1
    assert "unseen pairs" in result.stdout


@pytest.mark.parametrize("args, message", [(["--preset", "fastest"], "--preset must be one of"),
                                           (["--holdout-pairs", "60"], "--holdout-pairs must be in 0..50"),
                                           (["--kernel1", "4"], "--kernel1 must be one of 3, 5, got 4"),
                                           (["--padding", "full"], "--padding must be one of same, valid"),
                                           (["--trunk", "deep", "--kernel1", "5"], "--trunk deep has 3x3 padded"),
                                           (["--trunk", "deep", "--precision", "bf16"], "--trunk deep trains in float32")])
def test_bad_recipe_flags_give_one_line_and_exit_2(args, message, tmp_path):
    result = run_script(*args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_explains_every_flag_in_its_group():
    """--help is one source for both trainers: every Config field a flag with its own line of help,
    the choices where there are choices, under its group."""
    from dataclasses import fields

    from common.config import GROUPS, build_parser, flag

    parser = build_parser("train", Config())
    titles = {group.title: group for group in parser._action_groups}
    assert set(GROUPS.values()) <= titles.keys()
    for f in fields(Config):
        name = flag(f.name)
        action = next(a for a in titles[GROUPS[f.metadata["group"]]]._group_actions if name in a.option_strings)
        assert len(action.help) > 15 and action.dest == f.name, name
        if f.metadata["choices"]:
            assert all(str(choice) in action.metavar for choice in f.metadata["choices"]), name
    text = parser.format_help()
    assert "--design {flatten,digit,numberline}" in text and "--preset {" + ",".join(PRESETS) + "}" in text
    assert "speedrun-99.5: --design digit --conv1 32 --conv2 64" in " ".join(text.split())  # what each preset sets


@pytest.mark.parametrize("design", DESIGNS)
def test_no_design_is_trained_on_a_held_out_pair(design, tmp_path, mnist_dir):
    """Every batch each design's train step is given in a run with 50 pairs held out (the most
    allowed) holds no held-out pair."""
    from jax_impl.train import JaxTrainer

    given = []

    class Recording(JaxTrainer):
        def train_steps(self, batch_indices, shifts=None):
            given.append(np.asarray(batch_indices))
            return super().train_steps(batch_indices, shifts)

    cfg = replace(Config(), design=design, conv1=8, conv2=16, hidden=32, holdout_pairs=MAX_HOLDOUT_PAIRS,
                  dry_run=True, out=str(tmp_path / "run"), data_dir=str(mnist_dir))
    run_training(cfg, Recording, {})
    train, _ = load_splits(cfg)
    trained = np.concatenate(given).ravel()
    assert len(trained) == 5 * cfg.batch_size  # the dry run's five steps, all recorded
    assert not D.is_held_out(train.labels[trained], train.numbers[trained], D.holdout_pairs(MAX_HOLDOUT_PAIRS)).any()


def _train_sum_head(head, seen: np.ndarray, steps: int = 3000) -> nnx.Module:
    """Trains a sum head alone on the seen (digit, r) pairs, the digit given as sure logits."""
    graphdef, params = nnx.split(head)
    tx = optax.adam(3e-3)
    digits, numbers, sums = jnp.asarray(seen[:, 0]), jnp.asarray(seen[:, 1]), jnp.asarray(seen.sum(1))

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            logits = nnx.merge(graphdef, params)(SURE * jax.nn.one_hot(digits, 10), numbers)
            return optax.softmax_cross_entropy_with_integer_labels(logits, sums).mean()

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return nnx.merge(graphdef, params)


SURE = 10.0  # digit logits this far apart are a softmax of 0.9996 on the digit


class _Adder(nnx.Module):  # the digit design's sum head: an MLP over (softmax(digit logits), one-hot r)
    def __init__(self, rngs: nnx.Rngs):
        self.hidden, self.out = nnx.Linear(20, 64, rngs=rngs), nnx.Linear(64, 19, rngs=rngs)

    def __call__(self, digit_logits, numbers):
        adder_in = jnp.concatenate([jax.nn.softmax(digit_logits), jax.nn.one_hot(numbers, 10)], -1)
        return self.out(jax.nn.relu(self.hidden(adder_in)))


@pytest.mark.parametrize("k", [10, 30])
def test_the_number_line_adds_pairs_it_never_saw_and_an_mlp_adder_does_not(k):
    """The sum heads alone, trained on the seen pairs: the number line answers every held-out
    pair (measured: all, over 3 seeds each for K = 10 and 30), the digit design's MLP adder none
    (it memorises the pairs it saw). At K = 50 the number line does not always find the order
    (docs/results.md)."""
    held = D.holdout_pairs(k)
    pairs = np.array([(d, r) for d in range(10) for r in range(10)])
    is_held = np.array([tuple(p) in held for p in pairs])
    for make in (NumberLine, _Adder):
        head = _train_sum_head(make(nnx.Rngs(0)), pairs[~is_held])
        right = np.asarray(head(SURE * jax.nn.one_hot(pairs[:, 0], 10), jnp.asarray(pairs[:, 1])).argmax(-1) == pairs.sum(1))
        assert right[~is_held].all(), make.__name__  # the seen pairs are learned by both
        unseen = right[is_held].mean()
        assert unseen == 1.0 if make is NumberLine else unseen < 0.2, (make.__name__, unseen)
