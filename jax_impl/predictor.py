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

MAX_BATCH = 1024  # images per compiled call; `make_predict` pads smaller calls to a power of two


def load(run_dir: str | Path, cfg: Config) -> Predictor:
    """The run's model from RUN_DIR/checkpoints; problems raise CheckpointError (one line)."""
    enable_compile_cache()
    # Shapes only: initialising the weights for real costs seconds of op-by-op compilation.
    graphdef, like = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    params, step = checkpoint.load_params(Path(run_dir) / "checkpoints", like)
    logits = make_predict(graphdef, chunk=MAX_BATCH)

    def predict(images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        digit, summ = logits(params, images, numbers)
        return softmax(digit), softmax(summ)

    return Predictor("jax", step, predict)

