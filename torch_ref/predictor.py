"""A PyTorch run's model, loaded for prediction from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import Config
from common.predictor import Predictor, softmax
from torch_ref import checkpoint
from torch_ref.model import SumNet
from torch_ref.train import predict_logits, resolve_device

CHUNK = 1024  # images per forward pass: bounds the activations' memory on large calls


def load(run_dir: str | Path, cfg: Config) -> Predictor:
    """The run's model from RUN_DIR/checkpoint.pt, on `cfg.torch_device` (auto: CUDA when PyTorch sees a
    GPU); problems raise CheckpointError (one line)."""
    model = SumNet(cfg)
    # With --ema the run evaluated with its weight average: prediction uses it too.
    step = checkpoint.load_params(Path(run_dir) / checkpoint.FILE, model, "ema" if cfg.ema else "model")
    model.to(resolve_device(cfg.torch_device)).eval()

    def predict(images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        digit, summ = predict_logits(model, np.asarray(images, np.uint8), np.asarray(numbers), CHUNK)
        return softmax(digit), softmax(summ)

    return Predictor("torch", step, predict)
