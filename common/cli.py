"""What every script does on start and with its errors: one line on stderr, never
a traceback; exit code 2 for what the user can fix before training, 1 once training has started,
128 + the signal's number when a signal stopped it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from common.config import Config, resolve
from common.errors import RunFailed, UserError, os_error_line
from common.rundir import require_out
from common.signals import Interrupted, stop_on_signals


def run_main(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as e:  # ConfigError, DataError, CheckpointError... too
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


def launch(argv: list[str] | None, description: str) -> Config:
    """The start of a training script, before its framework is imported (so --help and a bad flag
    answer at once): signals handled from here on, the flags (and on --resume the saved run)
    resolved into one Config."""
    stop_on_signals()
    cfg = resolve(argv, description)
    require_out(cfg, cfg.num_processes)  # before joining the other processes, which waits for them
    return cfg
