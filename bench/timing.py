"""The benchmark's clock: when the process started (for --time-budget), timed calls, and the
summary of their times."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

START = time.perf_counter()


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def over_budget(args: argparse.Namespace | None, share: float) -> bool:
    """Whether `share` of --time-budget has passed since the process started."""
    return args is not None and bool(args.time_budget) and time.perf_counter() - START > share * args.time_budget


def per_call_times(run: Callable[[int], None], per_call: int, calls: int) -> list[float]:
    """Times `calls` calls of `per_call` steps each, one sample (seconds per step) per call."""
    return [timed(lambda: run(per_call)) / per_call for _ in range(calls)]


def summary(times: list[float], batch: int) -> dict:
    """Median and p10-p90 of step times (ms), and the images per second of the median."""
    times = np.asarray(times)
    median = float(np.median(times))
    return {"step_ms_median": 1e3 * median, "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
            "step_ms_p90": 1e3 * float(np.percentile(times, 90)), "images_per_s": batch / median}
