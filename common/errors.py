"""The errors a user may see, each shown as one line (common/images.py's ImageError is a
UserError that carries its image's path), and how an OSError is put in one line.
The bottom of the project: it imports nothing of it, and every module may import it. The exit
code each class gives is `common.cli.run_main`'s."""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """A problem the user can fix before training (a bad input file, a missing run folder...): exit code 2."""


class ConfigError(UserError):
    """An invalid setting."""


class DataError(UserError):
    """A problem with the data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or not this run's."""


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
