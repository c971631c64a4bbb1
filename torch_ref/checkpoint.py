"""PyTorch checkpoints: RUN_DIR/checkpoint.pt holds the model, optimiser, scheduler and position,
and the weight average under --ema.
The file is one header line, then what torch.save wrote:

    mnist-sum checkpoint step=<training step> sha256=<SHA-256 of the rest>

`load` checks the SHA-256 before torch reads a byte (torch.load alone cannot open the file).
`save` blocks until the file is on disk, `restore` gives the training state back (resume),
`load_params` the model's weights alone (prediction)."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

from common.errors import CheckpointError, first_line
from common.integrity import require_same_shapes, sha256_bytes, write_atomically

FILE = "checkpoint.pt"
# The layout of what torch.save writes, saved in it ("format"; none: 0, the versions before,
# which had the same layout). A newer one is refused on resume, whose saves would mix layouts.
FORMAT = 1
HEADER = re.compile(rb"mnist-sum checkpoint step=(\d+) sha256=([0-9a-f]{64})")


def save(path: Path, step: int, position: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
         sched: torch.optim.lr_scheduler.LRScheduler, ema: torch.nn.Module | None = None) -> None:
    """Writes the training state at `step` to `path`, atomically, and returns once it is on disk.
    A step below the one already in `path` is refused (CheckpointError: another run's checkpoint?);
    the same step is replaced. A failed write (an OSError such as a full disk) leaves the old file
    and no temporary one, and raises the OSError as it came."""
    if path.exists() and step < (existing := header(path)[0]):
        raise CheckpointError(f"{path}: holds step {existing}, later than step {step} being saved "
                              "(the checkpoint of another run?)")
    buffer = io.BytesIO()
    saved = {"format": FORMAT, "step": step, "position": position, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    if ema is not None:
        saved["ema"] = ema.state_dict()
    torch.save(saved, buffer)
    payload = buffer.getvalue()
    write_atomically(path, [b"mnist-sum checkpoint step=%d sha256=%s\n" % (step, sha256_bytes(payload).encode()), payload])


def restore(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, ema: torch.nn.Module | None = None) -> dict | None:
    """Loads the checkpoint at `path` into the model, optimiser, scheduler and weight average;
    returns its position (None: there is no checkpoint). A damaged checkpoint raises CheckpointError."""
    if not path.exists():
        return None
    saved = load(path)
    if saved.get("format", 0) not in (0, FORMAT):
        raise CheckpointError(f"{path}: checkpoint format {saved['format']!r}, this version reads {FORMAT} (written "
                              "by a newer version? resume it with that one)")
    try:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: not this run's training state ({type(e).__name__}: {first_line(e)})") from None
    return saved["position"]


def load_params(path: Path, model: torch.nn.Module, key: str = "model") -> int:
    """Loads the weights of the checkpoint at `path` into `model`, checked against its SHA-256 and
    the model's parameter names and shapes; returns its training step. `key`: "model", the
    trained weights, or "ema", the weight average of an --ema run. Every problem is a
    CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no checkpoint (expected {path}; did training finish an epoch?)")
    saved = load(path)
    if key not in saved:
        raise CheckpointError(f"{path}: the checkpoint holds no {key!r} weights (its run's config.json says it should)")
    weights = saved[key]
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    require_same_shapes(str(path), expected, {name: tuple(t.shape) for name, t in weights.items()})
    if not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
        raise CheckpointError(f"{path}: the checkpoint holds non-finite parameters")
    model.load_state_dict(weights)
    return int(saved["step"])


def header(path: Path) -> tuple[int, str]:
    """(step, SHA-256) from the first line of the checkpoint at `path`."""
    with open(path, "rb") as f:
        return parse_header(path, f.readline(200).rstrip(b"\n"))


def parse_header(path: Path, line: bytes) -> tuple[int, str]:
    match = HEADER.fullmatch(line)
    if match is None:
        raise CheckpointError(f"{path}: corrupted checkpoint (its first line is not a mnist-sum checkpoint header)")
    return int(match.group(1)), match.group(2).decode()


def load(path: Path) -> dict:
    """Everything `save` wrote into `path`, after checking its SHA-256, on the CPU."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror})") from None
    line, _, payload = data.partition(b"\n")
    _, digest = parse_header(path, line[:200])
    if sha256_bytes(payload) != digest:
        raise CheckpointError(f"{path}: corrupted checkpoint (its SHA-256 differs from the one in its header)")
    try:
        saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        if not {"step", "position", "model"} <= set(saved):
            raise KeyError("step, position and model")
        return saved
    except Exception as e:  # noqa: BLE001 - the SHA-256 matched: written by something else
        # torch's own advice on an unpickling error (load with weights_only=False) would run untrusted code
        detail = "not a PyTorch checkpoint" if isinstance(e, pickle.UnpicklingError) else first_line(e)
        raise CheckpointError(f"{path}: corrupted checkpoint ({type(e).__name__}: {detail})") from None
