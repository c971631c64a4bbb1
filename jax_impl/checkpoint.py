"""Orbax checkpoints of the training state (parameters + optimiser), one per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: Path, keep: int = 3) -> ocp.CheckpointManager:
    # Orbax writes each step to a temporary folder and renames it when complete,
    # so a crash never leaves a half-written checkpoint under a step's name.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (any pytree of arrays) and `meta` (JSON) as training step `step`."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[Any, dict]:
    """The state saved at `step` (default: latest), shaped like `like`, and its metadata."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]
