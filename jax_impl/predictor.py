"""A JAX run's model, loaded for prediction: the parameters of its latest checkpoint and one
compiled program per padded batch size, kept in the persistent compilation cache so that the
next process loads the program instead of compiling it."""

from __future__ import annotations

from pathlib import Path

import jax
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
    model = nnx.eval_shape(lambda: init_model(cfg))
    model.eval()  # batch norm with its running statistics
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    like = {"params": params, **({"batch_stats": batch_stats} if jax.tree.leaves(batch_stats) else {})}
    saved, step = checkpoint.load_params(Path(run_dir) / "checkpoints", {"ema": like} if cfg.ema else like)
    weights = saved["ema"] if cfg.ema else saved  # the weight average, which the run evaluated with
    logits = make_predict(graphdef, chunk=MAX_BATCH)

    def predict(images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        digit, summ = logits(weights, images, numbers)
        return softmax(digit), softmax(summ)

    return Predictor("jax", step, predict)

