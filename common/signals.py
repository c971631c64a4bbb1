"""Ctrl-C and SIGTERM (a timeout, SLURM, Kubernetes) stop a training script the same way,
wherever they arrive: the handler only records the signal, and the program stops where
stopping is safe. Inside the training steps that is after the current call, with a checkpoint
(`common.loop`): JAX donates the old state to the step, so cutting a call in half could lose
it. Outside them it is the next `raise_if_stopped`. Raising from the handler itself could land
in a garbage-collector callback or an import's `except:`, which print a traceback or swallow
it; outside the steps a second signal does raise at once, for a start that hangs."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None
_in_steps = False  # inside `during_steps`: even a second signal waits for the call to end


class Interrupted(BaseException):
    """Stopped by a signal, after saving what there was to save. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _handle(signum: int, frame: object) -> None:
    global _received
    again = _received is not None
    _received = signum
    if again and not _in_steps:
        raise_if_stopped()


def stop_on_signals() -> None:
    """Installs the handler for the whole process (the training scripts, first thing)."""
    for s in SIGNALS:
        signal.signal(s, _handle)


def received() -> int | None:
    """The signal that arrived, if any."""
    return _received


def raise_if_stopped(left: str = "nothing new was saved") -> None:
    """Raises Interrupted if a signal arrived (outside the steps: nothing new to save). `left`
    tells the user what is on disk now; the caller knows it, this module does not."""
    if _received is not None:
        raise Interrupted(f"{signal.Signals(_received).name} outside the training steps; {left}", _received)


def interrupted(saved: str, run_dir: Path) -> Interrupted:
    """The exception the loop raises once it has saved `saved` after a signal."""
    assert _received is not None
    return Interrupted(f"{signal.Signals(_received).name}; saved {saved}; continue with --resume {run_dir}", _received)


@contextmanager
def during_steps() -> Iterator[None]:
    """The training loop: signals are only recorded (the handler is installed here too, for a
    loop run without `stop_on_signals`, as in the tests), and the loop checks `received()`
    between calls."""
    global _in_steps
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _in_steps = True
    try:
        yield
    finally:
        _in_steps = False
        for s, handler in previous.items():
            signal.signal(s, handler)
