"""The epoch loop both frameworks share: batch order, progress, metrics, checkpoints.
A framework plugs in through the small `Trainer` interface."""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
from tqdm import tqdm

from common import data as D
from common.config import Config
from common.metrics import score
from common.runlog import RunLog


class Trainer(Protocol):
    def train_steps(self, batch_indices: np.ndarray, shifts: np.ndarray | None) -> np.ndarray:
        """Runs one step per row of indices into the training split, translating each image
        by its crop offset in `shifts` (None: no augmentation); returns the losses."""

    def predict(self, images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(digit logits, sum logits) for uint8 images and their numbers."""

    def save(self, epoch: int) -> None:
        """Checkpoints the state reached at the end of `epoch`."""


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    return 5 if cfg.dry_run else n_train // cfg.batch_size


def fit(cfg: Config, trainer: Trainer, train: D.Split, test: D.Split, log: RunLog, steps_per_call: int = 1) -> list[dict]:
    epochs = 1 if cfg.dry_run else cfg.epochs
    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        batches, shifts = epoch_plan(cfg, len(train), epoch)
        losses = []
        with tqdm(total=len(batches), desc=f"epoch {epoch}/{epochs}", leave=False, unit="step") as bar:
            for i in range(0, len(batches), steps_per_call):
                chunk = trainer.train_steps(batches[i : i + steps_per_call], None if shifts is None else shifts[i : i + steps_per_call])
                losses.append(chunk)
                bar.update(len(chunk))
                bar.set_postfix(loss=f"{chunk[-1]:.4f}")
        train_loss = float(np.concatenate(losses).mean())
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"epoch {epoch}: training loss is {train_loss}; stopped, the last good checkpoint is kept")
        metrics = {"epoch": epoch, "train_loss": train_loss,
                   **score(*trainer.predict(test.images, test.numbers), test.labels, test.numbers),
                   "epoch_time_s": time.perf_counter() - start}
        log.log_epoch(metrics)
        trainer.save(epoch)
        history.append(metrics)
        tqdm.write(f"epoch {epoch:3d}  train loss {train_loss:.4f}  test loss {metrics['test_loss']:.4f}  "
                   f"digit {100 * metrics['test_digit_acc']:.2f}%  sum {100 * metrics['test_sum_acc']:.2f}%  "
                   f"{metrics['epoch_time_s']:.1f}s")
    return history


def epoch_plan(cfg: Config, n_train: int, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The batches of one epoch and, with augmentation, every image's crop offset."""
    batches = D.epoch_batches(n_train, cfg.batch_size, cfg.seed, epoch)[: steps_per_epoch(cfg, n_train)]
    shifts = D.epoch_shifts(len(batches), cfg.batch_size, cfg.shift, cfg.seed, epoch) if cfg.shift else None
    return batches, shifts


def load_splits(cfg: Config) -> tuple[D.Split, D.Split]:
    train, test = D.make_splits(D.load_mnist(D.locate(cfg.data_dir)), cfg.seed)
    if cfg.dry_run:
        test = D.Split(test.images[:500], test.labels[:500], test.numbers[:500])
    return train, test
