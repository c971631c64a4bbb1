"""What every script does with errors a user can fix: one line on stderr, exit code 2."""

from __future__ import annotations

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


def train_main(module: str, description: str, argv: list[str] | None = None) -> None:
    """Entry point of the training scripts: parse flags, then import the framework and train."""
    import importlib

    from common.config import parse_config

    def main() -> None:
        cfg = parse_config(argv, description)
        importlib.import_module(module).run(cfg)  # imported after parsing: --help and bad flags answer at once

    run_main(main)
