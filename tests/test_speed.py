"""jax_impl/speed.py: the cold-start path (one-step program while the fused one compiles) trains
exactly as the fused program does, so when the switch happens cannot change a run. (The loop
forms and the CPU-only settings are tested in tests/test_devices.py, which a GPU runs too.)"""

from __future__ import annotations

from dataclasses import replace

import jax
import numpy as np
import pytest

from common.config import Config
from common.loop import epoch_plan
from jax_impl.train import JaxTrainer

# A narrow network keeps each compile and step short; the mechanism is the same.
SMALL = replace(Config(), conv1=8, conv2=16, hidden=32, steps_per_call=4)


def train(splits, steps: int, chunk: int, wait: bool) -> tuple[np.ndarray, list]:
    train_split, _ = splits
    trainer = JaxTrainer(SMALL, train_split, 100)
    batches, shifts = epoch_plan(SMALL, len(train_split), 1)
    losses = []
    for i in range(0, steps, chunk):
        j = min(i + chunk, steps)
        losses.append(trainer.train_steps(batches[i:j], shifts[i:j]))
        if wait:
            trainer.wait_until_compiled()
    trainer.close()
    return np.concatenate(losses), [np.asarray(x) for x in jax.tree.leaves(trainer.state["params"])]


@pytest.mark.slow
def test_one_step_and_fused_programs_train_bit_identically(splits):
    fused_losses, fused_params = train(splits, 14, 4, wait=True)  # fused from the second chunk on; last chunk of 2 step by step
    single_losses, single_params = train(splits, 14, 1, wait=False)  # the one-step program only
    np.testing.assert_array_equal(fused_losses, single_losses)
    for a, b in zip(fused_params, single_params):
        np.testing.assert_array_equal(a, b)
    assert len(fused_losses) == 14 and fused_losses[-1] < fused_losses[0]


def test_chunks_before_the_fused_program_is_ready_run_step_by_step(splits):
    train_split, _ = splits
    trainer = JaxTrainer(SMALL, train_split, 100)
    batches, shifts = epoch_plan(SMALL, len(train_split), 1)
    first = trainer.train_steps(batches[:4], shifts[:4])  # the fused compile has just started
    assert first.shape == (4,) and np.isfinite(first).all()
    trainer.wait_until_compiled()
    assert trainer._train._fused.done() and trainer._train._fused.exception() is None
    trainer.close()


def test_on_a_cpu_the_default_trains_one_step_per_call_and_compiles_nothing_fused(splits):
    """The CPU default (--steps-per-call 0): fusing saves little there and compiling the fused
    program delayed a cold start's first epoch, so nothing compiles in the background."""
    trainer = JaxTrainer(replace(SMALL, steps_per_call=0), splits[0], 100)
    batches, shifts = epoch_plan(SMALL, len(splits[0]), 1)
    assert trainer.steps_per_call == 1
    for i in range(3):
        trainer.train_steps(batches[i : i + 1], shifts[i : i + 1])
    assert trainer._train._fused is None
    trainer.close()
    assert JaxTrainer(SMALL, splits[0], 100).steps_per_call == SMALL.steps_per_call  # a given number wins
