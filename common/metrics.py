"""Scores computed from logits in numpy, so both frameworks are measured by the same code."""

from __future__ import annotations

import numpy as np


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(targets)), targets]


def score(digit_logits: np.ndarray, sum_logits: np.ndarray, labels: np.ndarray, numbers: np.ndarray) -> dict:
    """Test loss (CE digit + CE sum, mean) and both accuracies."""
    sums = labels + numbers
    loss = cross_entropy(digit_logits, labels) + cross_entropy(sum_logits, sums)
    return {
        "test_loss": float(loss.mean()),
        "test_digit_acc": float((digit_logits.argmax(1) == labels).mean()),
        "test_sum_acc": float((sum_logits.argmax(1) == sums).mean()),
    }
