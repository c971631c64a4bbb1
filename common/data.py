"""MNIST for the digit+number task: framework-free numpy, shared by JAX and PyTorch.

Everything that decides *which* examples a model sees, and in which order,
lives here, so both frameworks see the same (image, r) pairs in the same
batches for the same seed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError

MEAN, STD = 0.1307, 0.3081
NUM_DIGITS, NUM_SUMS = 10, 19
# The test set's numbers never depend on the training seed, so every run and
# both frameworks are scored on the same 10,000 (image, r) pairs.
TEST_NUMBERS_SEED = 20_240_601

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the decompressed files (the .gz wrappers differ between mirrors).
SHA256 = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}
COUNTS = {"train": 60_000, "test": 10_000}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, 28, 28) uint8
    labels: np.ndarray  # (n,) int32 digit
    numbers: np.ndarray  # (n,) int32 r in 0..9

    @property
    def sums(self) -> np.ndarray:
        return self.labels + self.numbers

    def __len__(self) -> int:
        return len(self.labels)


# --- reading and validating IDX files ------------------------------------


def _read_raw(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def parse_idx(raw: bytes, name: str, ndim: int, count: int) -> np.ndarray:
    """Checks an IDX file's header against what MNIST must be and returns its array."""
    expected_magic = 0x0800 + ndim  # unsigned bytes, `ndim` dimensions
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{name}: truncated header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{name}: bad magic number {magic:#x}, expected {expected_magic:#x}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected_dims = [count] + [28, 28][: ndim - 1]
    if dims != expected_dims:
        raise DataError(f"{name}: dimensions {dims}, expected {expected_dims}")
    body = raw[4 + 4 * ndim :]
    size = int(np.prod(dims))
    if len(body) != size:
        what = "truncated" if len(body) < size else "has trailing bytes"
        raise DataError(f"{name}: {what}: {len(body)} data bytes, expected {size}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def load_file(directory: Path, stem: str, ndim: int, count: int) -> np.ndarray:
    path = _find(directory, stem)
    if path is None:
        raise DataError(f"{directory}: missing {stem}(.gz)")
    raw = _read_raw(path)
    array = parse_idx(raw, path.name, ndim, count)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256[stem]:
        raise DataError(f"{path.name}: SHA-256 of the decompressed bytes is {digest[:16]}..., not the MNIST file's {SHA256[stem][:16]}...")
    if ndim == 1 and array.max() > 9:
        raise DataError(f"{path.name}: label {array.max()} outside 0..9")
    return array


def load_mnist(directory: Path) -> dict[str, np.ndarray]:
    """The four MNIST arrays from a folder of IDX files (.gz or raw), verified."""
    out = {}
    for key, stem in FILES.items():
        split = key.split("_")[0]
        ndim = 3 if key.endswith("images") else 1
        out[key] = load_file(directory, stem, ndim, COUNTS[split])
    return out


# --- finding (or fetching) the files -------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-sum"


def _complete(directory: Path) -> bool:
    return all(_find(directory, stem) for stem in FILES.values())


def locate(data_dir: str | None) -> Path:
    """`--data-dir`, then $MNIST_DIR, then the user cache (downloading into it)."""
    for source, value in (("--data-dir", data_dir), ("MNIST_DIR", os.environ.get("MNIST_DIR"))):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise DataError(f"{source}={value}: no such directory")
            return path
    cache = cache_dir()
    if not _complete(cache):
        download(cache)
    return cache


def download(target: Path, mirrors: tuple[str, ...] | None = None) -> None:
    """Fetches the missing files into `target`; each lands by atomic rename once verified."""
    from tqdm import tqdm

    mirrors = mirrors or tuple(filter(None, os.environ.get("MNIST_MIRRORS", "").split())) or MIRRORS
    target.mkdir(parents=True, exist_ok=True)
    for stem in FILES.values():
        if _find(target, stem):
            continue
        errors = []
        for mirror in mirrors:
            url = f"{mirror.rstrip('/')}/{stem}.gz"
            fd, tmp = tempfile.mkstemp(dir=target, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=stem, leave=False) as bar:
                        while chunk := response.read(1 << 16):
                            out.write(chunk)
                            bar.update(len(chunk))
                with gzip.open(tmp, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                if digest != SHA256[stem]:
                    raise DataError("checksum mismatch")
                os.replace(tmp, target / f"{stem}.gz")
                break
            except (OSError, EOFError, DataError, ValueError) as e:
                errors.append(short_reason(e))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            # One short line: the cause, then the folder where files are picked up by themselves.
            raise DataError(f"could not download {stem}.gz ({errors[-1]}, {len(mirrors)} mirror(s) tried); "
                            f"put the four MNIST .gz files in {target} or pass --data-dir DIR")


def short_reason(e: BaseException) -> str:
    """Why a download failed, in a few words (urllib's own messages repeat the URL and nest)."""
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
    return str(getattr(reason, "strerror", None) or reason).strip()[:60]


# --- pairing images with numbers, and batch order ------------------------


def numbers_for(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, size=n, dtype=np.int32)


def test_numbers() -> np.ndarray:
    """The r of each test image: the same for every run, whatever its seed."""
    return numbers_for(COUNTS["test"], TEST_NUMBERS_SEED)


def make_splits(arrays: dict[str, np.ndarray], seed: int, held_out: frozenset = frozenset()) -> tuple[Split, Split]:
    """Pairs every image with a number r. Training examples whose (digit, r) is `held_out` get
    another r, drawn from the digit's remaining ones, so no held-out pair is ever trained on
    and the training set keeps all 60,000 images. The test set keeps every pair."""
    labels = arrays["train_labels"].astype(np.int32)
    numbers = numbers_for(COUNTS["train"], seed)
    if held_out:
        numbers = redraw_held_out(labels, numbers, held_out, seed)
    train = Split(arrays["train_images"], labels, numbers)
    test = Split(arrays["test_images"], arrays["test_labels"].astype(np.int32), test_numbers())
    return train, test


# --- held-out (digit, r) pairs: does the network learn addition? --------

HOLDOUT_SEED = 1234  # which pairs: fixed, so every design and seed is tested on the same unseen ones


def _covers_everything(pairs: set) -> bool:
    return ({d for d, _ in pairs} == set(range(NUM_DIGITS)) and {r for _, r in pairs} == set(range(NUM_DIGITS))
            and {d + r for d, r in pairs} == set(range(NUM_SUMS)))


def holdout_pairs(k: int) -> frozenset:
    """K (digit, r) pairs to keep out of training: taken in a fixed random order, skipping any
    whose removal would leave a digit, an r or a sum (0..18) without a training pair, so every
    output class is still trained and only the combination is new. (0, 0) and (9, 9) are the
    only pairs for the sums 0 and 18, so they are never held out."""
    kept = {(d, r) for d in range(NUM_DIGITS) for r in range(NUM_DIGITS)}
    held: list[tuple[int, int]] = []
    for i in np.random.default_rng(HOLDOUT_SEED).permutation(NUM_DIGITS * NUM_DIGITS):
        if len(held) == k:
            break
        pair = divmod(int(i), NUM_DIGITS)
        if _covers_everything(kept - {pair}):
            kept.discard(pair)
            held.append(pair)
    if len(held) < k:
        raise DataError(f"only {len(held)} pairs can be held out with every digit, r and sum still trained, not {k}")
    return frozenset(held)


def _held_table(held_out: frozenset) -> np.ndarray:
    """(10, 10) bool: table[digit, r] is True for a held-out pair."""
    table = np.zeros((NUM_DIGITS, NUM_DIGITS), bool)
    for digit, r in held_out:
        table[digit, r] = True
    return table


def redraw_held_out(labels: np.ndarray, numbers: np.ndarray, held_out: frozenset, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    table = _held_table(held_out)
    numbers = numbers.copy()
    redo = table[labels, numbers]
    for digit in range(NUM_DIGITS):
        here = redo & (labels == digit)
        numbers[here] = rng.choice(np.flatnonzero(~table[digit]).astype(np.int32), size=int(here.sum()))
    return numbers


def is_held_out(labels: np.ndarray, numbers: np.ndarray, held_out: frozenset) -> np.ndarray:
    return _held_table(held_out)[labels, numbers]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Indices of one epoch's batches, shape (steps, batch_size); the last partial batch is dropped
    so every step has the same shape (one compiled program)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def epoch_offsets(steps: int, batch_size: int, max_shift: int, seed: int, epoch: int) -> np.ndarray:
    """Per-example crop offsets in 0..2*max_shift for random translation, shape (steps, batch_size, 2).
    Drawn here, not inside a framework, so JAX and PyTorch shift every image alike."""
    rng = np.random.default_rng([seed, epoch, 1])
    return rng.integers(0, 2 * max_shift + 1, size=(steps, batch_size, 2), dtype=np.int32)


def epoch_warps(steps: int, batch_size: int, max_degrees: float, max_scale: float, seed: int, epoch: int) -> np.ndarray:
    """Per-example rotation (radians, up to max_degrees either way) and scale factor (1 +- max_scale),
    shape (steps, batch_size, 2), float32. Drawn here for the same reason as the crop offsets."""
    rng = np.random.default_rng([seed, epoch, 2])
    angles = np.deg2rad(max_degrees) * rng.uniform(-1, 1, size=(steps, batch_size))
    scales = 1 + max_scale * rng.uniform(-1, 1, size=(steps, batch_size))
    return np.stack([angles, scales], axis=-1).astype(np.float32)


# Elastic distortion (Simard et al. 2003 smooth a random per-pixel field with a Gaussian): here the
# field is random at a coarse grid of control points and bilinear between them: smooth by
# construction, and 32 numbers per image in the plan instead of 1,568.
ELASTIC_GRID = 4


def epoch_elastic(steps: int, batch_size: int, max_pixels: float, seed: int, epoch: int) -> np.ndarray:
    """Per-example displacements at the ELASTIC_GRID x ELASTIC_GRID control points, up to max_pixels
    either way, rows' then columns', shape (steps, batch_size, 2 * ELASTIC_GRID**2), float32."""
    rng = np.random.default_rng([seed, epoch, 3])
    return (max_pixels * rng.uniform(-1, 1, size=(steps, batch_size, 2 * ELASTIC_GRID**2))).astype(np.float32)


def elastic_upsampling(size: int = 28, grid: int = ELASTIC_GRID) -> np.ndarray:
    """(size, grid): bilinear weights from control points spread over the image's first to last
    pixel; a field F at the control points is U @ F @ U.T at every pixel. Both frameworks use it."""
    position = np.linspace(0, grid - 1, size)
    return np.maximum(0.0, 1 - np.abs(position[:, None] - np.arange(grid)[None, :]))
