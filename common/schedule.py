"""The learning-rate schedule as knots of a piecewise-linear curve, so Optax and PyTorch
build the very same curve from one description."""

from __future__ import annotations

import numpy as np

from common.config import Config


def lr_knots(cfg: Config, total_steps: int) -> tuple[list[int], list[float]]:
    """Linear warm-up from lr/10 to lr, then linear decay to 0 at the last step."""
    warmup = min(int(round(cfg.warmup_epochs * total_steps / max(cfg.epochs, 1))), total_steps - 1)
    if warmup <= 0:
        return [0, total_steps], [cfg.lr, 0.0]
    return [0, warmup, total_steps], [cfg.lr / 10, cfg.lr, 0.0]


def lr_at(step: int, knots: tuple[list[int], list[float]]) -> float:
    return float(np.interp(step, *knots))
