"""A PyTorch run's model, loaded for prediction from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.config import Config
from common.predictor import Predictor, softmax
from torch_ref import checkpoint
from torch_ref.model import SumNet
from torch_ref.train import preprocess

CHUNK = 1024  # images per forward pass: bounds the activations' memory on large calls


def load(run_dir: str | Path, cfg: Config) -> Predictor:
    """The run's model from RUN_DIR/checkpoint.pt; problems raise CheckpointError (one line)."""
    model = SumNet(cfg)
    step = checkpoint.load_params(Path(run_dir) / checkpoint.FILE, model)
    model.eval()

    @torch.no_grad()
    def predict(images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = torch.tensor(np.asarray(images, np.uint8))  # a copy: torch wants writable memory
        numbers = torch.tensor(np.asarray(numbers), dtype=torch.long)
        outs = [model(preprocess(images[i : i + CHUNK]), numbers[i : i + CHUNK]) for i in range(0, len(numbers), CHUNK)]
        digit, summ = (torch.cat([o[j] for o in outs]).numpy() for j in (0, 1))
        return softmax(digit), softmax(summ)

    return Predictor("torch", step, predict)
