"""The epoch loop both frameworks share: batch order, progress, metrics, checkpoints.
A framework plugs in through the small `Trainer` interface."""

from __future__ import annotations

import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from common import data as D
from common.config import Config
from common.metrics import score
from common.runlog import NullLog, RunLog, plot_predictions


class Trainer(Protocol):
    def train_steps(self, batch_indices: np.ndarray, shifts: np.ndarray | None) -> np.ndarray:
        """Runs one step per row of indices into the training split, translating each image
        by its crop offset in `shifts` (None: no augmentation); returns the losses."""

    def predict(self, images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(digit logits, sum logits) for uint8 images and their numbers."""

    def save(self, global_step: int, position: dict) -> None:
        """Checkpoints the training state, atomically, with `position` (JSON) beside it."""

    def restore(self) -> dict | None:
        """Loads the latest checkpoint into the trainer; returns its position (None: there is none)."""


class StopOnCtrlC:
    """Turns Ctrl-C into a flag the loop checks between steps, so a step is never cut in half
    (JAX donates the old state to the step: stopping mid-call could lose it)."""

    def __enter__(self) -> "StopOnCtrlC":
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pressed = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    return 5 if cfg.dry_run else n_train // cfg.batch_size


def fit(cfg: Config, trainer: Trainer, train: D.Split, test: D.Split, log: RunLog, steps_per_call: int = 1,
        resume: bool = False) -> list[dict]:
    """Trains epoch by epoch. Everything random is a function of (seed, epoch), so a position
    (epoch, step, the epoch's losses so far) is all a checkpoint needs to resume exactly."""
    epochs = 1 if cfg.dry_run else cfg.epochs
    per_epoch = steps_per_epoch(cfg, len(train))
    position = (trainer.restore() if resume else None) or {"epoch": 1, "step": 0, "losses": []}
    log.truncate(position["epoch"] - 1)  # epochs logged after the checkpoint are redone
    history = log.history()
    held_out = D.holdout_pairs(cfg.holdout_pairs)
    unseen = D.is_held_out(test.labels, test.numbers, held_out) if held_out else None
    with StopOnCtrlC() as ctrl_c:
        for epoch in range(position["epoch"], epochs + 1):
            start = time.perf_counter()
            batches, shifts = epoch_plan(cfg, len(train), epoch)
            first = position["step"] if epoch == position["epoch"] else 0
            losses = list(position["losses"]) if epoch == position["epoch"] else []
            with tqdm(total=len(batches), initial=first, desc=f"epoch {epoch}/{epochs}", leave=False, unit="step") as bar:
                for step in range(first, len(batches), steps_per_call):
                    chunk = trainer.train_steps(batches[step : step + steps_per_call],
                                                None if shifts is None else shifts[step : step + steps_per_call])
                    if not np.isfinite(chunk).all():
                        raise FloatingPointError(f"epoch {epoch}, step {step}: the training loss is not finite; "
                                                 "stopped, the last good checkpoint is kept")
                    losses.extend(chunk.tolist())
                    bar.update(len(chunk))
                    bar.set_postfix(loss=f"{chunk[-1]:.4f}")
                    if ctrl_c.pressed:
                        trainer.save((epoch - 1) * per_epoch + len(losses), {"epoch": epoch, "step": len(losses), "losses": losses})
                        tqdm.write(f"interrupted: saved epoch {epoch}, step {len(losses)}; continue with --resume {log.dir}")
                        raise KeyboardInterrupt
            train_loss = float(np.mean(losses))
            train_time = time.perf_counter() - start  # steps only (compilation included), not the evaluation
            logits = trainer.predict(test.images, test.numbers)
            metrics = {"epoch": epoch, "train_loss": train_loss, **score(*logits, test.labels, test.numbers, unseen),
                       "train_time_s": train_time, "epoch_time_s": time.perf_counter() - start}
            log.log_epoch(metrics)
            if epoch == epochs:
                plot_predictions(log.dir, test, *logits)
            trainer.save(epoch * per_epoch, {"epoch": epoch + 1, "step": 0, "losses": []})
            history.append(metrics)
            tqdm.write(f"epoch {epoch:3d}  train loss {train_loss:.4f}  test loss {metrics['test_loss']:.4f}  "
                       f"digit {100 * metrics['test_digit_acc']:.2f}%  sum {100 * metrics['test_sum_acc']:.2f}%  "
                       + (f"(unseen pairs {100 * metrics['test_sum_acc_unseen']:.2f}%)  " if held_out else "")
                       + f"{metrics['epoch_time_s']:.1f}s")
            if ctrl_c.pressed and epoch < epochs:
                tqdm.write(f"interrupted: saved the end of epoch {epoch}; continue with --resume {log.dir}")
                raise KeyboardInterrupt
    return history


def epoch_plan(cfg: Config, n_train: int, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The batches of one epoch and, with augmentation, every image's crop offset."""
    batches = D.epoch_batches(n_train, cfg.batch_size, cfg.seed, epoch)[: steps_per_epoch(cfg, n_train)]
    shifts = D.epoch_shifts(len(batches), cfg.batch_size, cfg.shift, cfg.seed, epoch) if cfg.shift else None
    return batches, shifts


def run_training(cfg: Config, make_trainer, environment: dict, steps_per_call: int = 1,
                 write_outputs: bool = True) -> list[dict]:
    """Everything a training script does, for either framework: data, run directory,
    trainer (`make_trainer(cfg, train_split, total_steps, run_dir)`), resume, the loop.
    `write_outputs=False` (processes 1.. of a multi-process run): the same steps and checkpoint
    saves, but no config.json, metrics or plots (those are drawn into a scratch folder)."""
    resume = cfg.resume is not None
    if cfg.out is None:
        cfg = replace(cfg, out=time.strftime(f"runs/%Y%m%d-%H%M%S-{cfg.preset}"))
    train, test = load_splits(cfg)
    total_steps = steps_per_epoch(cfg, len(train)) * (1 if cfg.dry_run else cfg.epochs)
    with tempfile.TemporaryDirectory() as scratch:
        log = RunLog(cfg.out, cfg.to_dict(), environment, fresh=not resume) if write_outputs else NullLog(Path(scratch))
        trainer = make_trainer(cfg, train, total_steps, Path(cfg.out))
        try:
            return fit(cfg, trainer, train, test, log, steps_per_call, resume=resume)
        finally:
            getattr(trainer, "close", lambda: None)()


def load_splits(cfg: Config) -> tuple[D.Split, D.Split]:
    train, test = D.make_splits(D.load_mnist(D.locate(cfg.data_dir)), cfg.seed, D.holdout_pairs(cfg.holdout_pairs))
    if cfg.dry_run:
        test = D.Split(test.images[:500], test.labels[:500], test.numbers[:500])
    return train, test
