"""The network: an MNIST image and a number r in 0..9 in; digit logits (10) and sum logits (19) out."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import Config
from common.data import NUM_DIGITS, NUM_SUMS
# The pool and the fc layer on (x, one-hot r), written for speed; same math (ops.py says why).
from jax_impl.ops import dense_with_number, mean_pool_2x2, pool_2x2


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


# Batch norm's constants, PyTorch's defaults, which torch_ref/model.py uses: the running
# statistics move a tenth of the way to each batch's.
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5


class BatchNorm(nnx.Module):
    """Batch norm over (n, h, w) with PyTorch's statistics rule, so both frameworks keep the same
    running statistics: normalise with the batch's biased variance, but move the running variance
    towards the unbiased one (n / (n - 1) times it). nnx.BatchNorm moves it towards the biased one
    and calls 1 - BN_MOMENTUM its momentum. Training uses the batch's statistics and updates the
    running ones; after `model.eval()` (`use_running_average`) the running ones are used."""

    def __init__(self, features: int):
        self.scale = nnx.Param(jnp.ones(features))
        self.bias = nnx.Param(jnp.zeros(features))
        self.mean = nnx.BatchStat(jnp.zeros(features))
        self.var = nnx.BatchStat(jnp.ones(features))
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            n = x.size // x.shape[-1]
            new_mean, new_var = jax.lax.stop_gradient((mean, var * n / (n - 1)))
            self.mean[...] = (1 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * new_mean
            self.var[...] = (1 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * new_var
        return (x - mean) * jax.lax.rsqrt(var + BN_EPSILON) * self.scale[...] + self.bias[...]


class SumNet(nnx.Module):
    """The trunk, by `trunk`:

    - "plain" (the assignment's): conv -> relu -> pool -> conv -> relu -> pool (3x3 kernels,
      padded, by default; `kernel1`, `kernel2` and `padding` choose others).
    - "deep": two blocks of (3x3 conv -> batch norm -> relu) x 2 -> 2x2 average pool, `conv1`
      then `conv2` channels: the depth and normalisation of the single networks that score
      highest on MNIST (docs/results.md), kept to two pools so the same 7x7 features reach the
      fc layer. Average, not max, pooling: batch norm maps MNIST's blank areas to windows of
      equal values, whose max-pool gradient goes to whichever comes first, and which comes first
      depends on the last bit of each framework's (and each XLA fusion's) rounding: the same
      JAX step compiled and run op by op differed by 10-50% in its float64 gradients.

    Then flatten and, by `design`:

    - "flatten" (the assignment's): concat one-hot(r) -> fc -> relu -> digit head and sum head.
    - "digit": fc -> relu -> digit head; a small adder MLP reads softmax(digit logits)
      next to one-hot(r), so the sum is built from what the digit head knows.
    - "numberline": the digit design's trunk; the digit head's decision and r added on a
      learned number line (`NumberLine`), so it generalises to unseen (digit, r) pairs.
    """

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.design = cfg.design
        flat = cfg.trunk_sizes()[1] ** 2 * cfg.conv2
        self.trunk = cfg.trunk
        if cfg.trunk == "deep":
            # No conv bias: the batch norm after each convolution subtracts its mean, bias and all,
            # and its own bias takes the role.
            conv = partial(nnx.Conv, kernel_size=(3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.conv1, self.norm1 = conv(1, cfg.conv1), BatchNorm(cfg.conv1)
            self.conv1b, self.norm1b = conv(cfg.conv1, cfg.conv1), BatchNorm(cfg.conv1)
            self.conv2, self.norm2 = conv(cfg.conv1, cfg.conv2), BatchNorm(cfg.conv2)
            self.conv2b, self.norm2b = conv(cfg.conv2, cfg.conv2), BatchNorm(cfg.conv2)
        else:
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
        x = self.features(images)
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

    def features(self, images: jax.Array) -> jax.Array:
        """The trunk's output, (n, side, side, conv2)."""
        # relu(max(.)) == max(relu(.)): relu after pooling touches a quarter of the values.
        if self.trunk == "plain":
            x = jax.nn.relu(pool_2x2(self.conv1(images)))
            return jax.nn.relu(pool_2x2(self.conv2(x)))
        x = jax.nn.relu(self.norm1(self.conv1(images)))
        x = mean_pool_2x2(jax.nn.relu(self.norm1b(self.conv1b(x))))
        x = jax.nn.relu(self.norm2(self.conv2(x)))
        return mean_pool_2x2(jax.nn.relu(self.norm2b(self.conv2b(x))))
