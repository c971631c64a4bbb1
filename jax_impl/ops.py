"""Two layers of SumNet written for speed: the 2x2 max-pool with its gradient by hand, and the
fully connected layer on concat(x, one_hot(r)) without the concatenation. Each computes exactly
what its plain form does; the rows of benchmarks/README.md named below hold the measurements."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, NHWC. A reshape and a max, because XLA's CPU backend runs that
    several times faster than `reduce_window` (benchmarks/README.md, row "2x2 max-pool as
    `reshape` + `max`"); on a GPU the two are alike."""
    return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(saved: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    # The gradient goes to the FIRST maximum of each window in row-major order, PyTorch's rule.
    # Autodiff of max would split it among tied maxima instead (flat windows are common: blank
    # image areas) and counts the ties, which costs time (row "max-pool gradient by hand").
    x, y = saved
    hit = _windows(x) == y[:, :, None, :, None, :]
    top_left, top_right, bottom_left = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0]
    top_right = top_right & ~top_left
    bottom_left = bottom_left & ~(top_left | top_right)
    bottom_right = ~(top_left | top_right | bottom_left)
    first = jnp.stack([jnp.stack([top_left, top_right], 3), jnp.stack([bottom_left, bottom_right], 3)], 2)
    return (jnp.where(first, g[:, :, None, :, None, :], 0).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def pool_2x2(x: jax.Array) -> jax.Array:
    """`max_pool_2x2` of any side: an odd last row or column is dropped, as PyTorch's pool does."""
    _, h, w, _ = x.shape
    return max_pool_2x2(x[:, : h - h % 2, : w - w % 2])


def mean_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, NHWC, even sides (the deep trunk's). Its gradient spreads
    evenly over each window, so unlike max-pooling's it does not hang on which of several equal
    values comes first (jax_impl/model.py says why that matters there)."""
    return _windows(x).mean(axis=(2, 4))


def dense_with_number(fc: nnx.Linear, x: jax.Array, numbers: jax.Array) -> jax.Array:
    """fc(concat(x, one_hot(numbers))) without building the concatenation: one-hot times a
    matrix is a row lookup (row "fc on `concat(x, one_hot(r))`" of benchmarks/README.md)."""
    kernel = fc.kernel[...]
    return x @ kernel[: x.shape[-1]] + kernel[x.shape[-1] :][numbers] + fc.bias[...]
