"""What every script does on start and with its errors: one line on stderr, never
a traceback; exit code 2 for what the user can fix before training, 1 once training has started,
128 + the signal's number when a signal stopped it."""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable

from common.config import ConfigError
from common.data import DataError
from common.signals import Interrupted, stop_on_signals


class UserError(Exception):
    """Any other problem the user can fix (bad input file, missing run directory...)."""


class RunFailed(Exception):
    """Training started but cannot go on (a checkpoint could not be written...): exit code 1."""


def os_error_line(e: OSError, path: object = None) -> str:
    """'PATH: cause (ENAME)' for an OSError, naming the file the OS names, else `path`."""
    where = e.filename if e.filename is not None else path
    cause = (e.strerror or os.strerror(e.errno)) if e.errno else str(e)
    name = errno.errorcode.get(e.errno or 0)
    return (f"{where}: " if where is not None else "") + cause + (f" ({name})" if name else "")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's can run to pages), for a one-line error."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no details"


def run_main(main: Callable[[], object]) -> None:
    try:
        main()
    except (ConfigError, DataError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (RunFailed, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except OSError as e:  # one the program did not foresee: still one line
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)


def train_main(module: str, description: str, argv: list[str] | None = None) -> None:
    """Entry point of the training scripts: parse flags, then import the framework and train."""
    import importlib

    from common.config import resolve
    from common.rundir import require_out

    def main() -> None:
        stop_on_signals()
        cfg = resolve(argv, description)
        require_out(cfg, cfg.num_processes)  # before joining the other processes, which waits for them
        importlib.import_module(module).run(cfg)  # imported after parsing: --help and bad flags answer at once

    run_main(main)
