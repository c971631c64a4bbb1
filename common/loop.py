"""The epoch loop both frameworks share: batch order, progress, metrics, checkpoints.
A framework plugs in through the `Trainer` protocol."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from common import data as D
from common import rundir, tfds_mnist
from common.config import Config
from common.errors import DataError, RunFailed, UserError, os_error_line
from common.metrics import score
from common.runlog import NullLog, RunLog, plot_predictions, remove_temp_files
from common.signals import during_steps, interrupted, raise_if_stopped, received


class Trainer(Protocol):
    """What a framework gives the loop (jax_impl/train.py:JaxTrainer, torch_ref/train.py:TorchTrainer)."""

    steps_per_call: int  # rows of indices the loop hands `train_steps` at once (the last call may get fewer)

    def train_steps(self, batch_indices: np.ndarray, augmentation: np.ndarray | None) -> np.ndarray:
        """Runs one step per row of indices into the training split, each image moved (and with
        --rotate/--scale warped) as `augmentation` says (`epoch_plan`; None: none); returns the
        losses."""

    def predict(self, images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(digit logits, sum logits) for uint8 images and their numbers."""

    def save(self, global_step: int, position: "Position") -> None:
        """Checkpoints the training state with `position` beside it (`Position.to_json`); returns
        once the checkpoint is committed. A failed write leaves no partial files and raises its OSError."""

    def restore(self) -> "Position | None":
        """Loads the latest checkpoint into the trainer; returns its position (None: there is none)."""

    def compile_seconds(self) -> float | None:
        """Seconds spent compiling since the last call (None: not measured), for metrics.jsonl."""

    def close(self) -> None:
        """Ends background work and closes files (called on every exit)."""

    # For timing (scripts/benchmark.py): steps run on the device asynchronously, and a warm-up
    # must not change the run that is then timed.

    def wait_until_compiled(self) -> None:
        """Blocks until any program compiling in the background is ready."""

    def synchronize(self) -> None:
        """Blocks until the device has finished every step handed to it."""

    def snapshot(self) -> object:
        """A copy of the training state (parameters, optimizer, schedule) for `restore_snapshot`."""

    def restore_snapshot(self, snapshot: object) -> None:
        """Puts a `snapshot` back, as if the steps since had not run."""

    def call_memory_mb(self, batch_indices: np.ndarray, augmentation: np.ndarray | None) -> float | None:
        """The device memory one call of `train_steps` over these batches needs, state included
        (None: this device does not say). It may run the call."""


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    return 5 if cfg.dry_run else n_train // cfg.batch_size


@dataclass
class Position:
    """Where training stands: the next step of `epoch` and that epoch's losses so far. Everything
    random is a function of (seed, epoch), so this is all a checkpoint needs to resume exactly.
    At the end of an epoch it carries the epoch's metrics too (for a log line lost after it)."""

    epoch: int = 1
    step: int = 0
    losses: list[float] = field(default_factory=list)
    metrics: dict | None = None

    def describe(self) -> str:
        if self.step:
            return f"epoch {self.epoch}, step {self.step}"
        return f"the end of epoch {self.epoch - 1}" if self.epoch > 1 else "the start"

    def to_json(self) -> dict:
        """The checkpoints' JSON (no "metrics" key mid-epoch, as every version wrote it)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, saved: dict) -> "Position":
        return cls(**saved)


class Checkpoints:
    """The trainer's saves, with what the last committed one holds (for the messages)."""

    def __init__(self, trainer: Trainer, run_dir: Path, last: Position | None):
        self.trainer, self.run_dir = trainer, run_dir
        self.last = None if last is None else last.describe()

    def kept(self) -> str:
        return f"the last checkpoint ({self.last}) is kept" if self.last else "no checkpoint was saved yet"

    def save(self, global_step: int, position: Position) -> None:
        try:
            self.trainer.save(global_step, position)
        except OSError as e:
            raise RunFailed(f"could not save {position.describe()}: {os_error_line(e, self.run_dir)}; "
                            f"{self.kept()}; fix that, then --resume {self.run_dir}") from None
        self.last = position.describe()

    def resume_hint(self) -> str:
        return f"{self.kept()}; --resume {self.run_dir} continues " + ("from it" if self.last else "from the start")


def fit(cfg: Config, trainer: Trainer, train: D.Split, test: D.Split, log: RunLog, resume: bool = False) -> list[dict]:
    """Trains epoch by epoch from where the run stands, and returns every epoch's metrics."""
    loop = EpochLoop(cfg, trainer, len(train), test, log)
    position = loop.start(resume)
    history = log.history()
    raise_if_stopped(loop.checkpoints.resume_hint())  # restoring took a while
    with during_steps():
        for epoch in range(position.epoch, loop.epochs + 1):
            start = time.perf_counter()
            losses = loop.train_epoch(position if epoch == position.epoch else Position(epoch))
            history.append(loop.end_epoch(epoch, losses, start))
            if received() and epoch < loop.epochs:
                raise interrupted(loop.checkpoints.last, log.dir)
    return history


class EpochLoop:
    """The pieces of `fit`: where to start, one epoch's steps, the end of an epoch."""

    def __init__(self, cfg: Config, trainer: Trainer, n_train: int, test: D.Split, log: RunLog):
        self.cfg, self.trainer, self.n_train, self.test, self.log = cfg, trainer, n_train, test, log
        self.epochs = 1 if cfg.dry_run else cfg.epochs
        held_out = D.holdout_pairs(cfg.holdout_pairs)
        self.unseen = D.is_held_out(test.labels, test.numbers, held_out) if held_out else None
        self.checkpoints = Checkpoints(trainer, log.dir, None)

    def start(self, resume: bool) -> Position:
        """The start, or on --resume the last checkpoint's position. Epochs logged after that
        checkpoint are dropped (they are redone). An epoch is logged only after its checkpoint is
        committed, so a log line lost between the two is written now, from the metrics the
        checkpoint carries."""
        position = self.trainer.restore() if resume else None
        if position is None:
            return Position()
        self.checkpoints = Checkpoints(self.trainer, self.log.dir, position)
        done = position.epoch - 1
        self.log.truncate(done)
        if len(self.log.history()) == done - 1 and position.metrics is not None:
            if done == self.epochs:
                plot_predictions(self.log.dir, self.test, *self.trainer.predict(self.test.images, self.test.numbers))
            self.log.log_epoch(position.metrics)
        return position

    def train_epoch(self, position: Position, stop: int | None = None) -> list[float]:
        """The epoch's steps from `position` on, `trainer.steps_per_call` per call; returns all the
        epoch's losses. `stop`: only the steps before it (the benchmark's short epochs and its
        evaluations within an epoch, bench/). After a signal: a mid-epoch checkpoint, then Interrupted."""
        epoch, per_call = position.epoch, self.trainer.steps_per_call
        batches, augmentation = epoch_plan(self.cfg, self.n_train, epoch)
        batches, augmentation = batches[:stop], None if augmentation is None else augmentation[:stop]
        losses = list(position.losses)
        with tqdm(total=len(batches), initial=position.step, desc=f"epoch {epoch}/{self.epochs}", leave=False,
                  unit="step") as bar:
            for step in range(position.step, len(batches), per_call):
                chunk = self.trainer.train_steps(batches[step : step + per_call],
                                                 None if augmentation is None else augmentation[step : step + per_call])
                if not np.isfinite(chunk).all():
                    raise FloatingPointError(f"epoch {epoch}, step {step}: the training loss is not finite; "
                                             f"stopped, {self.checkpoints.kept()}")
                losses.extend(chunk.tolist())
                bar.update(len(chunk))
                bar.set_postfix(loss=f"{chunk[-1]:.4f}")
                if received() and len(losses) < len(batches):
                    mid_epoch = Position(epoch, len(losses), losses)
                    self.checkpoints.save((epoch - 1) * len(batches) + len(losses), mid_epoch)
                    raise interrupted(mid_epoch.describe(), self.log.dir)
        return losses

    def end_epoch(self, epoch: int, losses: list[float], start: float) -> dict:
        """Evaluation, the checkpoint (carrying the metrics), the last epoch's plots, then the log
        line, last: a logged epoch has its checkpoint and its plots. Returns the metrics."""
        train_time = time.perf_counter() - start  # steps only (compilation included), not the evaluation
        test = self.test
        logits = self.trainer.predict(test.images, test.numbers)
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                   **score(*logits, test.labels, test.numbers, self.unseen),
                   "train_time_s": train_time, "epoch_time_s": time.perf_counter() - start}
        compile_seconds = self.trainer.compile_seconds()
        if compile_seconds is not None:  # how much of the epoch went to compiling
            metrics["compile_time_s"] = compile_seconds
        self.checkpoints.save(epoch * len(losses), Position(epoch + 1, metrics=metrics))
        if epoch == self.epochs:
            plot_predictions(self.log.dir, test, *logits)
        self.log.log_epoch(metrics)
        tqdm.write(f"epoch {epoch:3d}  train loss {metrics['train_loss']:.4f}  test loss {metrics['test_loss']:.4f}  "
                   f"digit {100 * metrics['test_digit_acc']:.2f}%  sum {100 * metrics['test_sum_acc']:.2f}%  "
                   + (f"(unseen pairs {100 * metrics['test_sum_acc_unseen']:.2f}%)  " if self.unseen is not None else "")
                   + f"{metrics['epoch_time_s']:.1f}s")
        warn_if_not_learning(self.cfg, len(losses), metrics)
        return metrics


# An epoch this short still sits near the random start, whose loss is a little above a
# uniform guess's: too early to judge.
MIN_STEPS_TO_JUDGE = 20
GUESSING = 2 / D.NUM_DIGITS  # a digit accuracy below twice a guess's means nothing was learned


def uniform_guess_loss(cfg: Config) -> float:
    """The training loss of a network that gives every class the same probability (label
    smoothing leaves it unchanged): CE(digit) + sum_weight * CE(sum) = ln 10 + w ln 19."""
    return math.log(D.NUM_DIGITS) + cfg.sum_weight * math.log(D.NUM_SUMS)


def warn_if_not_learning(cfg: Config, steps: int, metrics: dict) -> None:
    """One line on stderr when an epoch trained no better than guessing. A run can diverge
    without a NaN: a too-high --lr sends the loss into the thousands, then the network collapses
    to a constant answer (a finite loss, 10% accuracy), and the loop's NaN check never fires."""
    guess = uniform_guess_loss(cfg)
    if steps < MIN_STEPS_TO_JUDGE or (metrics["train_loss"] < guess and metrics["test_digit_acc"] >= GUESSING):
        return
    print(f"warning: epoch {metrics['epoch']}: training loss {metrics['train_loss']:.4g} (a uniform guess: "
          f"{guess:.2f}), test digit accuracy {100 * metrics['test_digit_acc']:.1f}%: training diverged or stalled; "
          f"try a lower --lr (this run: {cfg.lr:g})", file=sys.stderr)


def epoch_plan(cfg: Config, n_train: int, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The batches of one epoch and, with augmentation, each image's: its crop offset (steps, b, 2)
    int32, or with --rotate, --scale or --elastic its crop offset, angle and scale (steps, b, 4)
    float32, followed with --elastic by its control points' displacements (D.epoch_elastic)."""
    batches = D.epoch_batches(n_train, cfg.batch_size, cfg.seed, epoch)[: steps_per_epoch(cfg, n_train)]
    warped = cfg.rotate > 0 or cfg.scale > 0 or cfg.elastic > 0
    if not (cfg.shift or warped):
        return batches, None
    steps = len(batches)
    offsets = D.epoch_offsets(steps, cfg.batch_size, cfg.shift, cfg.seed, epoch)
    if not warped:
        return batches, offsets
    parts = [offsets.astype(np.float32), D.epoch_warps(steps, cfg.batch_size, cfg.rotate, cfg.scale, cfg.seed, epoch)]
    if cfg.elastic > 0:
        parts.append(D.epoch_elastic(steps, cfg.batch_size, cfg.elastic, cfg.seed, epoch))
    return batches, np.concatenate(parts, axis=-1)


def run_training(cfg: Config, make_trainer, environment: dict, write_outputs: bool = True, processes: int = 1) -> list[dict]:
    """Everything a training script does, for either framework: the run folder (`common.rundir`),
    data, trainer (`make_trainer(cfg, train_split, total_steps, run_dir)`), resume, the loop.
    `write_outputs=False` (processes 1.. of a multi-process run): the same steps and checkpoint
    saves, but no config.json, metrics or plots (those are drawn into a scratch folder).
    Problems before training are one-line errors with exit code 2, write failures during it 1."""
    resume = cfg.resume is not None
    # What a signal before the first step leaves: a fresh launch's folder is removed (rundir.claim).
    left = f"the run is as it was; --resume {cfg.resume} continues it" if resume else "nothing was saved"
    raise_if_stopped(left)  # the imports before this point took a while
    with rundir.claim(cfg, main=write_outputs, processes=processes) as run, tempfile.TemporaryDirectory() as scratch:
        if run.finished:
            if write_outputs:
                print(f"{run.dir}: this run is finished ({len(run.history)} of {len(run.history)} epochs); nothing to resume")
            return run.history
        cfg = replace(cfg, out=str(run.dir))
        trainer = None
        try:
            log = RunLog(run.dir, cfg.to_dict(), environment, fresh=not resume) if write_outputs else NullLog(Path(scratch))
            train, test = load_splits(cfg)
            raise_if_stopped(left)
            total_steps = steps_per_epoch(cfg, len(train)) * (1 if cfg.dry_run else cfg.epochs)
            trainer = make_trainer(cfg, train, total_steps, run.dir)
            raise_if_stopped(left)
            run.start_training()
            if run.default and write_outputs:
                print(f"run folder: {run.dir}")
            history = fit(cfg, trainer, train, test, log, resume=resume)
            if write_outputs:
                print(next_steps(run.dir))
            return history
        except OSError as e:  # a failed checkpoint is reported where it is saved (RunFailed)
            remove_temp_files(run.dir)
            if not run.training:
                raise UserError(f"cannot write into the run folder: {os_error_line(e, run.dir)}") from None
            raise RunFailed(f"{os_error_line(e, run.dir)}; the last checkpoint is kept; --resume {run.dir} "
                            "continues from it") from None
        except RunFailed:
            remove_temp_files(run.dir)
            raise
        finally:
            if trainer is not None:  # before a failed start's folder is removed: Orbax may still be looking at it
                trainer.close()


def next_steps(run_dir: Path) -> str:
    """What a finished run prints: where it is and what to do with it."""
    return (f"finished: {run_dir} (config.json, metrics.jsonl, the plots, the checkpoint)\n"
            f"  predict:   python scripts/predict.py --run {run_dir} --image DIGIT.png --number 3\n"
            f"  summarize: python scripts/summarize.py {run_dir}")


def load_arrays(source: str, data_dir: str | None, tfds_data_dir: str | None) -> dict[str, np.ndarray]:
    """The four MNIST arrays, in the IDX files' order, from `source`: "idx" (the files
    `common.data.locate` finds) or "tfds" (TensorFlow Datasets' mnist). Both give identical
    arrays, so identical runs."""
    if source == "idx":
        return D.load_mnist(D.locate(data_dir))
    if source == "tfds":
        return tfds_mnist.load_mnist(tfds_data_dir)
    raise DataError(f"unknown data source {source!r}: idx or tfds")


def load_splits(cfg: Config) -> tuple[D.Split, D.Split]:
    arrays = load_arrays(cfg.data_source, cfg.data_dir, cfg.tfds_data_dir)
    train, test = D.make_splits(arrays, cfg.seed, D.holdout_pairs(cfg.holdout_pairs))
    if cfg.dry_run:
        test = D.Split(test.images[:500], test.labels[:500], test.numbers[:500])
    return train, test
