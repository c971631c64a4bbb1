"""What every script does on start (tune malloc) and with errors a user can fix (one line on
stderr, exit code 2)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Callable

from common.config import ConfigError
from common.data import DataError


class UserError(Exception):
    """Any other problem the user can fix (bad input file, missing run directory...)."""


def run_main(main: Callable[[], object]) -> None:
    try:
        main()
    except (ConfigError, DataError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory instead of returning it to the OS, so that the
    large buffers every training step needs are reused rather than mapped afresh and page-faulted
    in (zeroed by the kernel) each time. Both training scripts and the benchmark apply it.

    PyTorch eager otherwise page-faults its activations back in every step (6,390 minor faults
    per step at batch 128) and its step time depends on the allocator's history (27.5-34.6 ms;
    28.7-29.6 with this). XLA's scratch buffer needs `jax_impl.train.run_on_calling_thread` as
    well. The process keeps its peak memory until it exits. Returns whether it applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to tune
        return False


def train_main(module: str, description: str, argv: list[str] | None = None) -> None:
    """Entry point of the training scripts: parse flags, then import the framework and train."""
    import importlib

    from common.config import resolve

    def main() -> None:
        cfg = resolve(argv, description)
        keep_freed_memory()
        importlib.import_module(module).run(cfg)  # imported after parsing: --help and bad flags answer at once

    run_main(main)
