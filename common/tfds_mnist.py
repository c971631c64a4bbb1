"""MNIST from TensorFlow Datasets (`--data-source tfds`), returned exactly as the IDX reader
returns it.

TFDS shuffles a data set when it prepares it, so its `mnist` holds the examples in another order
than the IDX files. The IDX order is restored without the IDX files: `mnist_order.npz`, shipped
beside this module, holds for every IDX example its place among its split's images sorted by
their bytes (no two images of a split are identical). Sorting TFDS's images the same way and
taking those places gives the IDX arrays; their SHA-256 is then checked against the IDX files',
so a run from TFDS is the same run as from the IDX files, bit for bit.

TFDS is an optional extra (`pip install -e '.[tfds]'`), imported only here. Its default file
format, array_record, is read by random access without TensorFlow; a copy prepared as tfrecord
is read through `as_dataset(batch_size=-1)`, which needs TensorFlow.

`python -m common.tfds_mnist [IDX_DIR]` rewrites `mnist_order.npz` from the IDX files.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common import data as D

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

ORDER_FILE = Path(__file__).with_name("mnist_order.npz")
SPLITS = ("train", "test")


def load_mnist(data_dir: str | None) -> dict[str, np.ndarray]:
    """The four MNIST arrays from TFDS's prepared `mnist` in `data_dir` (None: TFDS's default),
    in the IDX order and verified against the IDX files' SHA-256."""
    builder = mnist_builder(data_dir)
    out = {}
    for split in SPLITS:
        images, labels = read_split(builder, split)
        out[f"{split}_images"], out[f"{split}_labels"] = restore_idx_order(images, labels, split)
    return out


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise D.DataError(f"--data-source tfds needs TensorFlow Datasets ({e}): pip install -e '.[tfds]'") from None
    return tfds


def mnist_builder(data_dir: str | None) -> tfds.core.DatasetBuilder:
    """TFDS's `mnist` builder over a prepared copy; reading only, never downloading."""
    builder = _import_tfds().builder("mnist", data_dir=data_dir)
    if not builder.is_prepared():
        raise D.DataError(f"{builder.data_dir_root}: no prepared TFDS mnist {builder.version} there "
                          "(pass --tfds-data-dir DIR, or use --data-source idx)")
    return builder


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) of one split, in TFDS's stored order."""
    fmt = builder.info.file_format.value
    if fmt == "array_record":
        # Random access (TFDS's data-source protocol, read in one batch) decodes each PNG with
        # Pillow: no TensorFlow involved.
        examples = builder.as_data_source(split=split)
        decoded = examples.__getitems__(range(len(examples)))
        images = np.array([example["image"] for example in decoded])
        labels = np.array([example["label"] for example in decoded])
    elif fmt == "tfrecord":
        try:  # imported here first: TFDS's own import failure prints a banner before its traceback
            import tensorflow  # noqa: F401
        except ImportError:
            raise D.DataError(f"{builder.data_dir}: this TFDS mnist is stored as tfrecord, which only TensorFlow "
                              "reads: pip install tensorflow-cpu, or prepare it as array_record") from None
        import tensorflow_datasets as tfds

        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels = arrays["image"], arrays["label"]
    else:
        raise D.DataError(f"{builder.data_dir}: TFDS file format {fmt} is not read here (array_record or tfrecord)")
    count = D.COUNTS[split]
    if images.shape != (count, 28, 28, 1) or labels.shape != (count,):
        raise D.DataError(f"{builder.data_dir}: the {split} split has images {images.shape} and labels {labels.shape}, "
                          f"expected ({count}, 28, 28, 1) and ({count},)")
    return images.reshape(count, 28, 28).astype(np.uint8), labels.astype(np.uint8)


# --- the IDX order, by content -------------------------------------------


def sorted_order(images: np.ndarray) -> np.ndarray:
    """Indices that sort the images by their 784 bytes (lexicographically, as bytes compare)."""
    rows = np.ascontiguousarray(images.reshape(len(images), -1))
    return np.argsort(rows.view(np.dtype((np.void, rows.shape[1]))).ravel(), kind="stable")


def make_order(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per split, each IDX example's place in `sorted_order` (what `mnist_order.npz` holds)."""
    order = {}
    for split in SPLITS:
        places = np.empty(D.COUNTS[split], np.uint16)  # 60,000 places fit in 16 bits
        places[sorted_order(arrays[f"{split}_images"])] = np.arange(D.COUNTS[split])
        order[split] = places
    return order


def idx_sha256(array: np.ndarray) -> str:
    """SHA-256 of the IDX file that would hold `array` (uint8): its header, then its bytes."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return hashlib.sha256(header + np.ascontiguousarray(array, np.uint8).tobytes()).hexdigest()


def restore_idx_order(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's examples, in any order, put back in the IDX order and checked against the IDX
    files' SHA-256 (so another data set, or a damaged one, is refused, never silently trained on)."""
    with np.load(ORDER_FILE) as shipped:
        places = shipped[split]
    pick = sorted_order(images)[places]
    restored = {"images": images[pick], "labels": labels[pick]}
    for kind, array in restored.items():
        stem = D.FILES[f"{split}_{kind}"]
        digest = idx_sha256(array)
        if digest != D.SHA256[stem]:
            raise D.DataError(f"TFDS mnist's {split} {kind} are not MNIST's: in the IDX order their SHA-256 is "
                              f"{digest[:16]}..., not {stem}'s {D.SHA256[stem][:16]}...")
    return restored["images"], restored["labels"]


def write_order_file(arrays: dict[str, np.ndarray], path: Path = ORDER_FILE) -> None:
    np.savez_compressed(path, **make_order(arrays))


if __name__ == "__main__":
    write_order_file(D.load_mnist(D.locate(sys.argv[1] if len(sys.argv) > 1 else None)))
    print(f"wrote {ORDER_FILE} ({ORDER_FILE.stat().st_size:,} bytes)")
