"""The run folder a launch trains into, and the rules that keep every run safe: a fresh run
never writes into another run's folder (unless --overwrite, which deletes that run first), two
processes never train into one folder at the same time (a lock, held until the process ends),
and a launch that fails before training starts leaves no half-made run behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from common.config import Config
from common.errors import ConfigError, UserError, os_error_line
from common.runlog import read_metrics

RUNS = Path("runs")
LATEST = "latest"  # runs/latest: a link to the newest run made without --out
LOCK = ".lock"  # not part of the run: an empty file whose lock says a process trains here
GO, REFUSED, FINISHED = 0, 1, 2  # what process 0 tells the others


class RunFolder:
    """A claimed run folder. `finished`: a --resume of a run with every epoch logged."""

    def __init__(self, path: Path, fresh: bool, created: bool, default: bool, lock: int | None,
                 created_parent: bool = False):
        self.dir, self.fresh, self.created, self.default, self._lock = path, fresh, created, default, lock
        self.created_parent = created_parent  # runs/ itself was made for this launch
        self.finished = False
        self.history: list[dict] = []
        self.training = False

    def start_training(self) -> None:
        """From here on the folder holds a run to resume: failures no longer remove it."""
        self.training = True
        if self.default and self._lock is not None:
            point_latest_at(self.dir)

    def discard(self) -> None:
        """Removes what a fresh launch wrote before training started (nothing worth keeping)."""
        if self.created:
            remove_created(self)
        else:  # the folder was empty, or its old run deleted by --overwrite: all in it is ours
            remove_contents(self.dir)

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing releases the lock
            self._lock = None


@contextlib.contextmanager
def claim(cfg: Config, main: bool = True, processes: int = 1) -> Iterator[RunFolder]:
    """The run folder of this launch, checked and locked by process 0 (`main`); every process
    of a multi-process run gets process 0's verdict, so all refuse or all go on together.
    A fresh launch that fails before `start_training` leaves nothing behind."""
    require_out(cfg, processes)
    run = None
    try:
        if main:
            run = _claim(cfg)
    finally:
        verdict = REFUSED if main and run is None else (FINISHED if run and run.finished else GO)
        verdict = agree(verdict, processes)
    if not main:
        if verdict == REFUSED:
            raise UserError(f"process 0 refused the run folder {cfg.out} (see its message)")
        run = RunFolder(Path(cfg.out), fresh=cfg.resume is None, created=False, default=False, lock=None)
        run.finished = verdict == FINISHED
    try:
        yield run
    except BaseException:
        if main and run.fresh and not run.training:
            run.discard()
        raise
    finally:
        run.release()


def require_out(cfg: Config, processes: int) -> None:
    if cfg.out is None and processes > 1:
        raise ConfigError(f"{processes} processes need --out RUN_DIR on a filesystem they all see "
                          "(a default folder would be named differently by each)")


def _claim(cfg: Config) -> RunFolder:
    fresh = cfg.resume is None
    default = cfg.out is None
    created_parent = False
    if default:
        created_parent = not RUNS.exists()
        path, created = new_default_folder(cfg.preset), True
    else:
        path = Path(cfg.out)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path}: not a folder")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder: {os_error_line(e, path)}") from None
    try:
        if fresh and not created:
            refuse_foreign(path)  # before the lock file is made: a folder not ours gets no file of ours
    except OSError as e:
        raise UserError(f"cannot read the run folder: {os_error_line(e, path)}") from None
    run = RunFolder(path, fresh, created, default, None, created_parent)
    try:
        run._lock = take_lock(path)
        if fresh:
            make_room(path, cfg.overwrite)
        else:
            expected = 1 if cfg.dry_run else cfg.epochs
            try:
                run.history = read_metrics(path / "metrics.jsonl")
            except ValueError as e:
                raise UserError(f"--resume {path}: {e}") from None
            run.finished = len(run.history) >= expected
        if not run.finished:  # a finished run is left exactly as it is
            probe_writable(path)
    except OSError as e:
        release_after_failure(run)
        raise UserError(f"cannot use the run folder: {os_error_line(e, path)}") from None
    except BaseException:
        release_after_failure(run)
        raise
    return run


def release_after_failure(run: RunFolder) -> None:
    if run.created:
        remove_created(run)
    run.release()


def remove_created(run: RunFolder) -> None:
    """Deletes a folder this launch made, and runs/ if it made that too and nothing else is in it."""
    shutil.rmtree(run.dir, ignore_errors=True)
    if run.created_parent:
        with contextlib.suppress(OSError):  # not empty: another launch's run is in it now
            run.dir.parent.rmdir()


def new_default_folder(preset: str) -> Path:
    """runs/<date>-<time>-<preset>, with -2, -3... when that name is taken (two runs in one second)."""
    stem = time.strftime("%Y%m%d-%H%M%S-") + preset
    try:
        RUNS.mkdir(exist_ok=True)
        for n in range(1, 1000):
            path = RUNS / (stem if n == 1 else f"{stem}-{n}")
            try:
                path.mkdir()  # atomic: of two launches in the same second, each gets its own name
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f"cannot create a run folder in {RUNS.resolve()}: {os_error_line(e)}") from None
    raise UserError(f"{RUNS / stem}: 999 runs of that name already; choose --out RUN_DIR")


def take_lock(path: Path) -> int:
    """Locks RUN_DIR/.lock for as long as this process lives (the OS drops it when the process
    ends, however it ends); refuses when another process holds it."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write into the run folder: {os_error_line(e, path / LOCK)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{path}: another process is training in this folder (it holds {path / LOCK}); "
                        "wait for it to end or stop it first") from None
    except OSError as e:
        os.close(fd)
        raise UserError(f"cannot lock the run folder: {os_error_line(e, path / LOCK)}") from None
    return fd


def make_room(path: Path, overwrite: bool) -> None:
    """A fresh run goes into an empty folder; --overwrite first deletes the run there. A folder
    with other files is never written into or deleted: it may be anything of the user's."""
    if not [p for p in path.iterdir() if p.name != LOCK]:
        return
    refuse_foreign(path)
    if not overwrite:
        raise UserError(f"--out {path} already holds a run; use --resume {path} to continue it, another --out, "
                        "or --overwrite to replace it (deletes it first)")
    try:
        remove_contents(path, strict=True)
    except OSError as e:
        raise UserError(f"--overwrite could not delete the old run: {os_error_line(e, path)}") from None


def refuse_foreign(path: Path) -> None:
    if any(p.name != LOCK for p in path.iterdir()) and not (path / "config.json").exists():
        raise UserError(f"--out {path} is not empty and holds no run (no config.json); choose another --out")


def remove_contents(path: Path, strict: bool = False) -> None:
    """Deletes everything in `path` but its lock file (which this process holds)."""
    for entry in path.iterdir():
        if entry.name == LOCK:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            if strict:
                raise


def probe_writable(path: Path) -> None:
    """Writes and deletes a small file, so a read-only or full disk is reported before the data
    is loaded rather than at the end of the first epoch."""
    probe = path / ".write-test"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write into the run folder: {os_error_line(e, probe)}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def point_latest_at(path: Path) -> None:
    """runs/latest -> the newest default run. Left alone if runs/latest is a real folder (a run
    made before runs were named by date): a link never replaces a run."""
    link = path.parent / LATEST
    if link.exists() and not link.is_symlink():
        return
    tmp = path.parent / f".{LATEST}.{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(path.name)
        os.replace(tmp, link)  # atomic: runs/latest always names some run
    except OSError:  # a convenience only (e.g. a filesystem without symlinks): the run goes on
        with contextlib.suppress(OSError):
            tmp.unlink()


def agree(verdict: int, processes: int) -> int:
    """Process 0's verdict, handed to every process of a multi-process run."""
    if processes == 1:
        return verdict
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(verdict)))
