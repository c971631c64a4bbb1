"""A JAX run's model, loaded for prediction: the parameters of its latest checkpoint and one
compiled program per padded batch size, kept in the persistent compilation cache so that the
next process loads the program instead of compiling it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from common.config import Config
from common.predictor import Predictor, softmax
from jax_impl import checkpoint
from jax_impl.train import enable_compile_cache, init_model, make_predict

# Batches are padded to a power of two in MIN_BATCH..MAX_BATCH, so a few compiled programs serve
# every call; larger ones run in chunks of MAX_BATCH. A padded image costs next to nothing.
MIN_BATCH, MAX_BATCH = 16, 1024


def load(run_dir: str | Path, cfg: Config) -> Predictor:
    """The run's model from RUN_DIR/checkpoints; problems raise CheckpointError (one line)."""
    enable_compile_cache()
    # Shapes only: initialising the weights for real costs seconds of op-by-op compilation.
    graphdef, like = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    params, step = checkpoint.load_params(Path(run_dir) / "checkpoints", like)
    logits = make_predict(graphdef, chunk=MAX_BATCH)

    def predict(images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(numbers)
        extra = padded_size(n) - n
        images = np.concatenate([np.asarray(images, np.uint8), np.zeros((extra, 28, 28), np.uint8)])
        numbers = np.concatenate([np.asarray(numbers, np.int32), np.zeros(extra, np.int32)])
        digit, summ = logits(params, images, numbers)
        return softmax(digit[:n]), softmax(summ[:n])

    return Predictor("jax", step, predict)


def padded_size(n: int) -> int:
    if n > MAX_BATCH:
        return n  # make_predict pads the last chunk itself
    return max(MIN_BATCH, 1 << max(n - 1, 0).bit_length())
