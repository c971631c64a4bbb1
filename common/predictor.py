"""A trained run, loaded for prediction: its config.json read and checked here (no framework
imported), its checkpoint by the framework that wrote it (jax_impl/predictor.py,
torch_ref/predictor.py)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.errors import UserError
from common.config import Config, read_saved_run

LOADERS = {"jax": "jax_impl.predictor", "torch": "torch_ref.predictor"}


@dataclass
class Run:
    dir: Path
    config: Config
    framework: str
    warning: str | None = None  # one line about what of config.json was not read (a newer version's)


@dataclass
class Predictor:
    """predict(images uint8 (n, 28, 28), numbers int (n,)) -> (digit probs (n, 10), sum probs (n, 19))."""

    framework: str
    step: int  # training steps behind the checkpoint
    predict: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

    def __call__(self, images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.predict(images, numbers)


def read_run(run_dir: str | Path) -> Run:
    """RUN_DIR/config.json, checked (common/config.py: read_saved_run); every problem is a one-line
    error. Settings this version does not know are left out, with `Run.warning` saying so."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"--run {run_dir}: no such directory")
    saved = read_saved_run(path)
    if saved.framework not in LOADERS:
        raise UserError(f"{saved.path}: unknown framework {saved.framework!r} (expected {' or '.join(LOADERS)})")
    return Run(path, saved.config, saved.framework, saved.warning())


def load_predictor(run: Run) -> Predictor:
    """The run's model from its latest checkpoint; a checkpoint that is missing, damaged or not
    this model's raises CheckpointError (one line)."""
    return importlib.import_module(LOADERS[run.framework]).load(run.dir, run.config)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)
