"""Orbax checkpoints of the training state (parameters + optimiser) and its position, one folder
per training step (RUN_DIR/checkpoints/<step>/), each with a SHA256SUMS of its files
(common/integrity.py) that is checked before anything reads the checkpoint.

`save` blocks until the step is complete; `restore` gives the whole state back (resume),
`load_params` the model's weights alone (prediction)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from common.errors import CheckpointError, first_line
from common.integrity import has_manifest, require_same_shapes, verify_manifest, write_manifest

TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes step N into N.orbax-checkpoint-tmp..., then renames it
# The layout of a step folder, saved in its metadata ("format"; none: 0, the versions before,
# which had the same layout). A newer one is refused on resume, whose saves would mix layouts.
FORMAT = 1


def manager(directory: Path, keep: int = 3) -> ocp.CheckpointManager:
    # Synchronous saves: a step is complete (and checksummed) when `save` returns, and a failed
    # write raises there, not later in a background thread. An epoch's checkpoint takes
    # milliseconds, so nothing worth overlapping is lost. Leftovers of a killed save are removed.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (any pytree of arrays) and `meta` (JSON) as training step `step`, with its
    SHA256SUMS, and returns once both are on disk.

    A step below the latest one is refused (CheckpointError: another run's checkpoints?), where
    Orbax alone would skip it; the latest step itself is replaced (the same training state, a
    later position). A failed write (an OSError such as a full disk) removes what this save wrote
    and raises the OSError, errno intact; the other checkpoints stay as they were."""
    latest = mngr.latest_step()
    if latest is not None and step < latest:
        raise CheckpointError(f"{mngr.directory}: holds step {latest}, later than step {step} being saved "
                              "(checkpoints of another run?)")
    if step == latest:
        mngr.delete(step)
    try:
        with orbax_quiet():
            saved = mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave({**meta, "format": FORMAT})))
            mngr.wait_until_finished()
        if not saved:  # Orbax skips a step it thinks it should not save; never silently
            raise CheckpointError(f"{mngr.directory}: Orbax declined to save step {step}")
        if jax.process_index() == 0:  # the step folder is shared: one process checksums it
            write_manifest(step_folder(mngr, step))
    except Exception as e:
        remove_unfinished(mngr, step)
        error = as_os_error(e, step_folder(mngr, step))
        if error is e:
            raise
        raise error from e


def restore(mngr: ocp.CheckpointManager, like: Any) -> tuple[Any, dict] | None:
    """The latest checkpoint's state, shaped (and placed) like `like`, and its metadata; None if
    there is no checkpoint. A checkpoint that fails its checksums raises CheckpointError. A
    latest step without SHA256SUMS is a save that was killed before it finished: it is deleted,
    like Orbax's own unfinished folders, and the step before it restored."""
    latest = mngr.latest_step()
    if latest is not None and not has_manifest(step_folder(mngr, latest)):
        mngr.delete(latest)
    step = mngr.latest_step()
    if step is None:
        return None
    folder = step_folder(mngr, step)
    verify_manifest(folder)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        with orbax_quiet():
            restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - checksums passed: a layout this code does not know
        raise CheckpointError(f"{folder}: cannot restore the checkpoint ({type(e).__name__}: {first_line(e)})") from None
    meta = dict(restored["meta"])
    if meta.get("format", 0) not in (0, FORMAT):
        raise CheckpointError(f"{folder}: checkpoint format {meta['format']!r}, this version reads {FORMAT} (written "
                              "by a newer version? resume it with that one)")
    meta.pop("format", None)
    return restored["state"], meta


def load_params(directory: Path, like: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(weights, training step) of the latest checkpoint in `directory`: the entries of the saved
    state that `like` names ("params", and "batch_stats" or "ema" where the run has them), each a
    pytree of jax.ShapeDtypeStruct. Checked against its SHA256SUMS and against the names and
    shapes of `like`, placed on the first device. The optimiser state stays on disk. Every
    problem is a CheckpointError."""
    directory = Path(directory).absolute()
    steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise CheckpointError(f"{directory.parent}: no checkpoint (expected {directory}/<step>/; "
                              "did training finish an epoch?)")
    if len(steps) > 1 and not has_manifest(directory / str(steps[-1])):
        steps.pop()  # being saved right now, or a killed save: the step before it is complete
    folder = directory / str(steps[-1])
    verify_manifest(folder)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        with orbax_quiet():
            stored = checkpointer.metadata(folder / "state").item_metadata.tree
        stored = {name: stored[name] for name in like if name in stored}
    except Exception as e:  # noqa: BLE001 - checksums passed: a layout this code does not know
        raise CheckpointError(f"{folder}: corrupted checkpoint, no parameters found "
                              f"({type(e).__name__}: {first_line(e)})") from None
    require_same_shapes(str(folder), shapes(like), shapes(stored))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), like)
    try:
        with orbax_quiet():
            args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                          partial_restore=True)
            weights = checkpointer.restore(folder / "state", args=args)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot restore the parameters ({type(e).__name__}: {first_line(e)})") from None
    if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(weights)):
        raise CheckpointError(f"{folder}: the checkpoint holds non-finite parameters")
    return weights, steps[-1]


def shapes(tree: Any) -> dict[str, tuple]:
    """{"conv1.kernel.value": shape, ...}: leaf names that read the same for a model's State and
    for Orbax's metadata of it."""
    def name(path) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def step_folder(mngr: ocp.CheckpointManager, step: int) -> Path:
    return Path(mngr.directory) / str(step)


def remove_unfinished(mngr: ocp.CheckpointManager, step: int) -> None:
    """Removes Orbax's temporary folders of `step` and the step folder itself if it lacks its
    SHA256SUMS: what a failed save leaves."""
    directory = Path(mngr.directory)
    for tmp in directory.glob(f"{step}{TMP_MARK}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    folder = step_folder(mngr, step)
    if folder.is_dir() and not has_manifest(folder) and jax.process_index() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    mngr.reload()


def as_os_error(e: Exception, where: Path) -> Exception:
    """Orbax reports tensorstore's failed writes as ValueError("... [os_error_code='28']"): an
    OSError with that errno, so a full disk reads the same from either framework."""
    if isinstance(e, OSError):
        return e
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code is None:
        return e
    number = int(code.group(1))
    return OSError(number, os.strerror(number), str(where))


@contextlib.contextmanager
def orbax_quiet():
    """Keeps a failed Orbax read or write to the one exception it raises here. Orbax logs the
    failure with a traceback from its own threads first (absl, asyncio), and after a failed write
    tensorstore's remaining writes report to the event loop Orbax has closed ("Event loop is
    closed", through sys.unraisablehook), some of them after the exception reached us: after a
    failure the muting stays, for a process that is about to report the error and stop."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    previous_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            previous_hook(unraisable)

    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        gc.collect()  # asyncio logs a failed task's unread exception when the task is collected
        raise
    sys.unraisablehook = previous_hook
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)
