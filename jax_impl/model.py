"""The network: an MNIST image and a number r in 0..9 in; digit logits (10) and sum logits (19) out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import Config
from common.data import NUM_DIGITS, NUM_SUMS
# The pool and the fc layer on (x, one-hot r), written for speed; same math (ops.py says why).
from jax_impl.ops import dense_with_number, pool_2x2


class NumberLine(nnx.Module):
    """Sum logits from positions on one learned line: the digit sits at the learned position of
    the digit head's likeliest class, r at a learned position of its own, and their sum
    is read as the nearest of 19 learned sum positions (logits fall with the squared distance).
    Every position is learned from the sum labels; adding the two positions is the only
    structure, so a (digit, r) pair never trained on lands where the seen pairs put its sum.
    A line of one dimension: with more, the network had room to memorise pairs again
    (docs/results.md, "Unseen pairs")."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.1)  # small: the positions start together and spread in order
        self.digit_at = nnx.Param(init(rngs.params(), (NUM_DIGITS,)))
        self.number_at = nnx.Param(init(rngs.params(), (NUM_DIGITS,)))
        self.sum_at = nnx.Param(init(rngs.params(), (NUM_SUMS,)))
        self.log_sharpness = nnx.Param(jnp.zeros(()))

    def __call__(self, digit_logits: jax.Array, numbers: jax.Array) -> jax.Array:
        # The digit sits at the position of the digit head's decision, and the sum loss trains
        # only the line. At the softmax's expected position an unsure test digit fell between two
        # positions, on a wrong sum; with the sum loss also training the digit head, the digits
        # were worse (docs/results.md, "Unseen pairs").
        likeliest = jax.nn.one_hot(jax.lax.stop_gradient(digit_logits).argmax(-1), NUM_DIGITS, dtype=digit_logits.dtype)
        position = likeliest @ self.digit_at[...] + self.number_at[...][numbers]
        return -jnp.exp(self.log_sharpness[...]) * (position[:, None] - self.sum_at[...]) ** 2


class SumNet(nnx.Module):
    """conv -> relu -> pool -> conv -> relu -> pool -> flatten (3x3 kernels, padded, by default;
    `kernel1`, `kernel2` and `padding` choose others), then, by `design`:

    - "flatten" (the assignment's): concat one-hot(r) -> fc -> relu -> digit head and sum head.
    - "digit": fc -> relu -> digit head; a small adder MLP reads softmax(digit logits)
      next to one-hot(r), so the sum is built from what the digit head knows.
    - "numberline": the digit design's trunk; the digit head's decision and r added on a
      learned number line (`NumberLine`), so it generalises to unseen (digit, r) pairs.
    """

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.design = cfg.design
        flat = cfg.trunk_sizes()[1] ** 2 * cfg.conv2
        padding = cfg.padding.upper()
        self.conv1 = nnx.Conv(1, cfg.conv1, (cfg.kernel1, cfg.kernel1), padding=padding, rngs=rngs)
        self.conv2 = nnx.Conv(cfg.conv1, cfg.conv2, (cfg.kernel2, cfg.kernel2), padding=padding, rngs=rngs)
        fc_in = flat + NUM_DIGITS if cfg.design == "flatten" else flat
        self.fc = nnx.Linear(fc_in, cfg.hidden, rngs=rngs)
        self.digit_head = nnx.Linear(cfg.hidden, NUM_DIGITS, rngs=rngs)
        if cfg.design == "numberline":
            self.numberline = NumberLine(rngs)
            return
        if cfg.design == "digit":
            self.adder = nnx.Linear(2 * NUM_DIGITS, cfg.adder_hidden, rngs=rngs)
        self.sum_head = nnx.Linear(cfg.hidden if cfg.design == "flatten" else cfg.adder_hidden, NUM_SUMS, rngs=rngs)

    def __call__(self, images: jax.Array, numbers: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (n, 28, 28, 1) normalised float32; numbers (n,) int32 -> (digit logits, sum logits)."""
        # relu(max(.)) == max(relu(.)): relu after pooling touches a quarter of the values.
        x = jax.nn.relu(pool_2x2(self.conv1(images)))
        x = jax.nn.relu(pool_2x2(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        if self.design == "flatten":
            h = jax.nn.relu(dense_with_number(self.fc, x, numbers))
            return self.digit_head(h), self.sum_head(h)
        digit_logits = self.digit_head(jax.nn.relu(self.fc(x)))
        if self.design == "numberline":
            return digit_logits, self.numberline(digit_logits, numbers)
        one_hot = jax.nn.one_hot(numbers, NUM_DIGITS, dtype=x.dtype)
        adder_in = jnp.concatenate([jax.nn.softmax(digit_logits), one_hot], axis=-1)
        return digit_logits, self.sum_head(jax.nn.relu(self.adder(adder_in)))
