"""The network: an MNIST image and a number r in 0..9 in; digit logits (10) and sum logits (19) out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import Config
from common.data import NUM_DIGITS, NUM_SUMS


def max_pool_2x2(x: jax.Array) -> jax.Array:
    # A reshape and a max: XLA's CPU backend runs this several times faster
    # (forward and backward) than reduce_window (benchmarks/README.md).
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SumNet(nnx.Module):
    """conv3x3 -> relu -> pool -> conv3x3 -> relu -> pool -> flatten, then, by `design`:

    - "flatten" (the assignment's): concat one-hot(r) -> fc -> relu -> digit head and sum head.
    - "digit": fc -> relu -> digit head; a small adder MLP reads softmax(digit logits)
      next to one-hot(r), so the sum is built from what the digit head knows.
    """

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.design = cfg.design
        flat = 7 * 7 * cfg.conv2
        self.conv1 = nnx.Conv(1, cfg.conv1, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(cfg.conv1, cfg.conv2, (3, 3), padding="SAME", rngs=rngs)
        fc_in = flat + NUM_DIGITS if cfg.design == "flatten" else flat
        self.fc = nnx.Linear(fc_in, cfg.hidden, rngs=rngs)
        self.digit_head = nnx.Linear(cfg.hidden, NUM_DIGITS, rngs=rngs)
        if cfg.design == "digit":
            self.adder = nnx.Linear(2 * NUM_DIGITS, cfg.adder_hidden, rngs=rngs)
        self.sum_head = nnx.Linear(cfg.hidden if cfg.design == "flatten" else cfg.adder_hidden, NUM_SUMS, rngs=rngs)

    def __call__(self, images: jax.Array, numbers: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (n, 28, 28, 1) normalised float32; numbers (n,) int32 -> (digit logits, sum logits)."""
        x = max_pool_2x2(jax.nn.relu(self.conv1(images)))
        x = max_pool_2x2(jax.nn.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        one_hot = jax.nn.one_hot(numbers, NUM_DIGITS, dtype=x.dtype)
        if self.design == "flatten":
            h = jax.nn.relu(self.fc(jnp.concatenate([x, one_hot], axis=-1)))
            return self.digit_head(h), self.sum_head(h)
        digit_logits = self.digit_head(jax.nn.relu(self.fc(x)))
        adder_in = jnp.concatenate([jax.nn.softmax(digit_logits), one_hot], axis=-1)
        return digit_logits, self.sum_head(jax.nn.relu(self.adder(adder_in)))
