"""The network: an MNIST image and a number r in 0..9 in; digit logits (10) and sum logits (19) out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import Config
from common.data import NUM_DIGITS, NUM_SUMS


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, as a reshape and a max: XLA's CPU backend runs this several
    times faster than reduce_window (benchmarks/README.md)."""
    return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(saved: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    # The gradient goes to the FIRST maximum of each window in row-major order, PyTorch's rule.
    # Autodiff of max would split it among tied maxima instead (flat windows are common: blank
    # image areas), and its tie count costs about 1.5 ms per training step on CPU.
    x, y = saved
    hit = _windows(x) == y[:, :, None, :, None, :]
    top_left, top_right, bottom_left = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0]
    top_right = top_right & ~top_left
    bottom_left = bottom_left & ~(top_left | top_right)
    bottom_right = ~(top_left | top_right | bottom_left)
    first = jnp.stack([jnp.stack([top_left, top_right], 3), jnp.stack([bottom_left, bottom_right], 3)], 2)
    return (jnp.where(first, g[:, :, None, :, None, :], 0).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def dense_with_number(fc: nnx.Linear, x: jax.Array, numbers: jax.Array) -> jax.Array:
    """fc(concat(x, one_hot(numbers))) without building the concatenation: one-hot times a
    matrix is a row lookup. Same math, about 1 ms less per training step on CPU."""
    kernel = fc.kernel[...]
    return x @ kernel[: x.shape[-1]] + kernel[x.shape[-1] :][numbers] + fc.bias[...]


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
        # relu(max(.)) == max(relu(.)): relu after pooling touches a quarter of the values.
        x = jax.nn.relu(max_pool_2x2(self.conv1(images)))
        x = jax.nn.relu(max_pool_2x2(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        if self.design == "flatten":
            h = jax.nn.relu(dense_with_number(self.fc, x, numbers))
            return self.digit_head(h), self.sum_head(h)
        digit_logits = self.digit_head(jax.nn.relu(self.fc(x)))
        one_hot = jax.nn.one_hot(numbers, NUM_DIGITS, dtype=x.dtype)
        adder_in = jnp.concatenate([jax.nn.softmax(digit_logits), one_hot], axis=-1)
        return digit_logits, self.sum_head(jax.nn.relu(self.adder(adder_in)))
