"""What a training run leaves in RUN_DIR, the same for both frameworks:
config.json, metrics.jsonl (one object per epoch) and curves.png. Every file is replaced
whole (written beside it, then renamed), so a crash or a full disk never leaves half a file."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from common import plots
from common.config import CONFIG_FORMAT
from common.integrity import write_atomically

METRIC_KEYS = ("epoch", "train_loss", "test_loss", "test_digit_acc", "test_sum_acc", "train_time_s", "epoch_time_s")


def read_metrics(path: Path) -> list[dict]:
    """The epochs of a metrics.jsonl, as training writes them (blank lines are ignored); a
    ValueError names the first line that is not an epoch's metrics."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}, line {number}: not JSON") from None
        missing = [k for k in METRIC_KEYS if not isinstance(row, dict) or not is_number(row.get(k))]
        if missing:
            raise ValueError(f"{path}, line {number}: no number for {', '.join(missing)}")
        rows.append(row)
    return rows


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class RunLog:
    def __init__(self, run_dir: str | Path, config: dict, environment: dict, fresh: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        if fresh and self.metrics_path.exists():
            self.metrics_path.unlink()
        environment = {"python": platform.python_version(), "machine": platform.machine(), **environment}
        # "format" first: what a reader of another version needs before the rest (common/config.py)
        text = json.dumps({"format": CONFIG_FORMAT, "config": config, "environment": environment}, indent=2) + "\n"
        write_atomically(self.dir / "config.json", [text.encode()])

    def truncate(self, epochs: int) -> None:
        """Keeps the first `epochs` lines of metrics.jsonl (resuming redoes the rest)."""
        history = self.history()
        kept = [m for m in history if m["epoch"] <= epochs]
        if kept != history:
            self._write(kept)

    def history(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def log_epoch(self, metrics: dict) -> None:
        """Adds an epoch. Its line is written last, after the curves: a logged epoch is complete."""
        missing = set(METRIC_KEYS) - set(metrics)
        assert not missing, f"metrics lack {missing}"
        history = self.history() + [metrics]
        plots.plot_curves(history, self.dir / "curves.png")
        self._write(history)

    def _write(self, history: list[dict]) -> None:
        write_atomically(self.metrics_path, [(json.dumps(m) + "\n").encode() for m in history])


def remove_temp_files(run_dir: Path) -> None:
    """Deletes the *.tmp files a failed write left in RUN_DIR (common.integrity.write_atomically)."""
    for tmp in run_dir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)


class NullLog:
    """RunLog's interface, writing nothing (processes other than 0 of a multi-process run)."""

    def __init__(self, scratch: Path):
        self.dir = scratch  # the loop still draws its final plots into log.dir

    def truncate(self, epochs: int) -> None:
        pass

    def history(self) -> list[dict]:
        return []

    def log_epoch(self, metrics: dict) -> None:
        pass


def plot_predictions(run_dir: Path, test, digit_logits: np.ndarray, sum_logits: np.ndarray) -> None:
    """confusion_digit.png, confusion_sum.png and samples.png for the test set's predictions."""
    digit_pred, sum_pred = digit_logits.argmax(1), sum_logits.argmax(1)
    plots.plot_confusion(plots.confusion_matrix(test.labels, digit_pred, 10), range(10), "Digit (test set)",
                         run_dir / "confusion_digit.png")
    plots.plot_confusion(plots.confusion_matrix(test.sums, sum_pred, 19), range(19), "Digit + r (test set)",
                         run_dir / "confusion_sum.png")
    plots.plot_samples(test.images, test.numbers, digit_pred, sum_pred, test.labels, run_dir / "samples.png")
