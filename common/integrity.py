"""What both frameworks' checkpoints share: SHA-256 checksums written with every checkpoint and
checked before one is used, atomic writes, and the one-line error a bad checkpoint raises.

A checkpoint folder (Orbax's step folder) carries `SHA256SUMS` in the format of coreutils'
`sha256sum`, so `cd STEP && sha256sum -c SHA256SUMS` checks it by hand too."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from common.errors import CheckpointError

MANIFEST = "SHA256SUMS"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder` but the manifest, sorted by path."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {name: sha256_file(folder / name) for name in files if name != MANIFEST}


def write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Writes `chunks` to `path` through a temporary file, synced and then renamed over it: a
    crash leaves the old file or the new one, never half of one. On an OSError (a full disk)
    the temporary file is removed and the error raised as it came."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_manifest(folder: Path) -> None:
    """Records the SHA-256 of every file of `folder` in folder/SHA256SUMS."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in folder_digests(folder).items())
    write_atomically(folder / MANIFEST, [lines.encode()])


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def verify_manifest(folder: Path) -> None:
    """Raises CheckpointError unless `folder` holds exactly the files its SHA256SUMS lists, each
    with its recorded SHA-256."""
    where = f"{folder}: corrupted checkpoint"
    if not (folder / MANIFEST).exists():
        raise CheckpointError(f"{where} (no {MANIFEST}: its save did not finish, or the file was removed)")
    try:
        recorded = {}
        for line in (folder / MANIFEST).read_text().splitlines():
            digest, name = line.split("  ", 1)
            recorded[name] = digest
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where} (cannot read its {MANIFEST}: {type(e).__name__})") from None
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    missing, extra = sorted(set(recorded) - found), sorted(found - set(recorded))
    if missing or extra:
        raise CheckpointError(f"{where} (files missing: {', '.join(missing[:3]) or 'none'}; "
                              f"not in {MANIFEST}: {', '.join(extra[:3]) or 'none'})")
    for name, digest in recorded.items():
        if sha256_file(folder / name) != digest:
            raise CheckpointError(f"{where} ({name}: its SHA-256 differs from the one in {MANIFEST})")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def require_same_shapes(where: str, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """Raises a one-line CheckpointError naming the first difference of parameter names or shapes
    between the model (`expected`) and the checkpoint (`found`)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    prefix = f"{where}: the checkpoint does not match the model of the run's config.json"
    if missing or extra:
        raise CheckpointError(f"{prefix} (parameters missing: {', '.join(missing[:3]) or 'none'}; "
                              f"unexpected: {', '.join(extra[:3]) or 'none'})")
    for name, shape in expected.items():
        if tuple(shape) != tuple(found[name]):
            raise CheckpointError(f"{prefix} ({name} is {tuple(found[name])} in the checkpoint, {tuple(shape)} "
                                  "in the model; conv1/conv2/hidden/design differ?)")
