"""Figures of a model's predictions on the test set: confusion matrices and a grid of samples.
matplotlib with the Agg backend (no display needed); every file is written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from common.integrity import write_atomically

MAX_INCHES = 12.0  # at dpi 100: at most 1200 x 1200 pixels
DPI = 100


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64 counts: row = true class, column = predicted class."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels, y_pred {y_pred.size}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"{name} holds labels outside 0..{k - 1}")
    return np.bincount(y_true.astype(np.int64) * k + y_pred.astype(np.int64), minlength=k * k).reshape(k, k)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """A reader never sees a half-written PNG, and a full disk leaves none behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=DPI, format="png")
    finally:
        _pyplot().close(fig)
    write_atomically(path, [png.getvalue()])
    return path


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Loss (train and test) and test accuracy (digit and sum) per epoch, side by side."""
    plt = _pyplot()
    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    ax_loss.plot(epochs, [m["test_loss"] for m in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss (CE digit + CE sum)", yscale="log", title="Loss")
    ax_acc.plot(epochs, [100 * m["test_digit_acc"] for m in history], "o-", label="digit")
    ax_acc.plot(epochs, [100 * m["test_sum_acc"] for m in history], "o-", label="sum")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, labels: Sequence, title: str, path: str | Path) -> Path:
    """A heat map of counts (rows true, columns predicted) with every cell's count written in."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    k = len(labels)
    if matrix.shape != (k, k):
        raise ValueError(f"matrix is {matrix.shape}, labels give {k} classes")
    side = min(MAX_INCHES, 2.5 + 0.45 * k)  # 10 classes: 7 in; 19 sums: 11 in
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    shown = np.log1p(matrix)  # the diagonal dwarfs the mistakes on a linear scale
    ax.imshow(shown, cmap="Blues")
    total = matrix.sum()
    accuracy = np.trace(matrix) / total if total else float("nan")
    ax.set_title(f"{title}\naccuracy {100 * accuracy:.2f}% of {total} (colour: log count)")
    ax.set_xticks(range(k), [str(x) for x in labels])
    ax.set_yticks(range(k), [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fontsize = 9 if k <= 12 else 7
    threshold = shown.max() / 2 if shown.max() > 0 else 1
    for i in range(k):
        for j in range(k):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=fontsize,
                        color="white" if shown[i, j] > threshold else ("crimson" if i != j else "black"))
    fig.tight_layout()
    return _save(fig, path)


def plot_samples(images: np.ndarray, numbers: np.ndarray, digit_pred: np.ndarray, sum_pred: np.ndarray,
                 labels: np.ndarray, path: str | Path, n: int = 32) -> Path:
    """The first `n` images in a grid, each titled "r=<number>  d=<digit> s=<sum>"; a title is
    red, and the image framed in red, where the digit or the sum is wrong."""
    plt = _pyplot()
    images = np.asarray(images)
    n = min(n, len(images))
    if n <= 0:
        raise ValueError("no images to plot")
    numbers, digit_pred, sum_pred, labels = (np.asarray(a)[:n] for a in (numbers, digit_pred, sum_pred, labels))
    cols = min(8, n)
    rows = -(-n // cols)
    width = min(MAX_INCHES, 1.5 * cols)
    height = min(MAX_INCHES, 1.9 * rows + 0.6)
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    wrong_digits = wrong_sums = 0
    for idx, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if idx >= n:
            ax.axis("off")
            continue
        ax.imshow(images[idx], cmap="gray_r", vmin=0, vmax=255)
        digit_ok = digit_pred[idx] == labels[idx]
        sum_ok = sum_pred[idx] == labels[idx] + numbers[idx]
        wrong_digits += not digit_ok
        wrong_sums += not sum_ok
        colour = "black" if digit_ok and sum_ok else "red"
        title = f"r={numbers[idx]}  d={digit_pred[idx]} s={sum_pred[idx]}"
        if colour == "red":
            title += f"\ntrue {labels[idx]}, {labels[idx] + numbers[idx]}"
        ax.set_title(title, fontsize=8, color=colour)
        if colour == "red":
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2.5)
    fig.suptitle(f"{n} test images: r = number, d = predicted digit, s = predicted sum (red: wrong; "
                 f"{wrong_digits} digits, {wrong_sums} sums)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))  # room for the suptitle
    return _save(fig, path)
