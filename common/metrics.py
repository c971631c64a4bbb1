"""Scores computed from logits in numpy, so both frameworks are measured by the same code."""

from __future__ import annotations

import numpy as np


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(targets)), targets]


def score(digit_logits: np.ndarray, sum_logits: np.ndarray, labels: np.ndarray, numbers: np.ndarray,
          unseen: np.ndarray | None = None) -> dict:
    """Test loss (CE digit + CE sum, mean) and both accuracies; with an `unseen` mask (pairs
    held out of training), the sum accuracy on those pairs and on the others."""
    sums = labels + numbers
    loss = cross_entropy(digit_logits, labels) + cross_entropy(sum_logits, sums)
    sum_right = sum_logits.argmax(1) == sums
    scores = {
        "test_loss": float(loss.mean()),
        "test_digit_acc": float((digit_logits.argmax(1) == labels).mean()),
        "test_sum_acc": float(sum_right.mean()),
    }
    if unseen is not None:
        scores["test_sum_acc_unseen"] = float(sum_right[unseen].mean())
        scores["test_sum_acc_seen"] = float(sum_right[~unseen].mean())
    return scores
