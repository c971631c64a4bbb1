"""`--data-source tfds`: TensorFlow Datasets' mnist read back into the IDX reader's exact arrays.

The tests marked tfds prepare the REAL TFDS `mnist` builder, offline, from the shared IDX files;
that needs TensorFlow, which no extra installs, so they run only with --run-tfds (.ci/run's own
step). The others need neither TFDS nor TensorFlow and run with the rest of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from common import data as D
from common import tfds_mnist as T
from common.loop import load_arrays

ROOT = Path(__file__).resolve().parents[1]
# The shared data's README, independent of our own checksums.
LABEL_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}


def assert_idx_arrays(arrays, mnist_arrays) -> None:
    assert set(arrays) == set(mnist_arrays)
    for key, expected in mnist_arrays.items():
        assert arrays[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(arrays[key], expected, err_msg=key)


def shuffled(mnist_arrays, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(D.COUNTS[split])
    return mnist_arrays[f"{split}_images"][order], mnist_arrays[f"{split}_labels"][order]


# --- the order restoration, on the IDX arrays themselves (no TFDS needed) ----


@pytest.mark.parametrize("split", T.SPLITS)
def test_the_sort_is_bytewise_and_no_two_images_of_a_split_are_equal(mnist_arrays, split):
    images = mnist_arrays[f"{split}_images"]
    rows = [images[i].tobytes() for i in T.sorted_order(images)]
    assert all(a < b for a, b in pairwise(rows))  # strictly: the order is fully defined by content


def test_the_shipped_order_file_is_the_idx_files_order(mnist_arrays):
    with np.load(T.ORDER_FILE) as shipped:
        assert set(shipped.files) == set(T.SPLITS)
        for split, places in T.make_order(mnist_arrays).items():
            np.testing.assert_array_equal(shipped[split], places)
    assert T.ORDER_FILE.stat().st_size < 150_000  # 16 bits an example


@pytest.mark.parametrize("split", T.SPLITS)
def test_examples_in_any_order_come_back_as_the_idx_arrays(mnist_arrays, split):
    images, labels = T.restore_idx_order(*shuffled(mnist_arrays, split, seed=7), split)
    np.testing.assert_array_equal(images, mnist_arrays[f"{split}_images"])
    np.testing.assert_array_equal(labels, mnist_arrays[f"{split}_labels"])


@pytest.mark.parametrize("kind", ["images", "labels"])
def test_examples_that_are_not_mnist_are_refused_in_one_line(mnist_arrays, kind):
    images, labels = shuffled(mnist_arrays, "test", seed=8)
    if kind == "images":
        images[5, 14, 14] ^= 1
    else:
        labels[5] = (labels[5] + 1) % 10
    with pytest.raises(D.DataError, match=f"test {kind} are not MNIST's.*SHA-256") as err:
        T.restore_idx_order(images, labels, "test")
    assert "\n" not in str(err.value)


def test_the_idx_source_is_the_idx_reader(mnist_dir, mnist_arrays):
    assert_idx_arrays(load_arrays("idx", str(mnist_dir), None), mnist_arrays)


def test_without_tfds_installed_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` now fails
    with pytest.raises(D.DataError, match=r"pip install -e '\.\[tfds\]'") as err:
        load_arrays("tfds", None, None)
    assert "\n" not in str(err.value)


def test_an_unknown_source_is_a_data_error():
    with pytest.raises(D.DataError, match="idx or tfds"):
        load_arrays("csv", None, None)


# --- the real TFDS builder, prepared offline (needs TensorFlow) --------------


def prepare_tfds_mnist(idx_dir: Path, data_dir: Path, file_format: str) -> Path:
    """Runs TFDS's own MNIST builder on the local IDX files, without network. TFDS finds them in
    manual_dir but checks them against the public .gz files, and the shared copy was re-compressed
    (same decompressed bytes, other .gz bytes): the builder is told the local files' sizes and SHA-256."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import utils
    from tensorflow_datasets.core.download import checksums
    from tensorflow_datasets.image_classification import mnist

    local_files = {mnist.MNIST.URL + path.name: checksums.compute_url_info(path) for path in idx_dir.glob("*.gz")}

    class LocalMNIST(mnist.MNIST, skip_registration=True):
        name = "mnist"  # writes, and is read back as, TFDS's own `mnist`

        @utils.classproperty
        @classmethod
        def url_infos(cls):
            return local_files

    builder = LocalMNIST(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(idx_dir), try_download_gcs=False))
    return data_dir


@pytest.fixture(scope="module")
def tfds_copies(mnist_dir, tmp_path_factory) -> dict[str, Path]:
    """TFDS data dirs holding the prepared mnist, one per file format."""
    return {fmt: prepare_tfds_mnist(mnist_dir, tmp_path_factory.mktemp(fmt), fmt) for fmt in ("array_record", "tfrecord")}


# Hides TensorFlow as if it were not installed: the path finder no longer finds it, so imports fail
# and `importlib.util.find_spec` (TFDS's and etils' probe) says None. (A None in sys.modules would
# not do: TFDS takes a "tensorflow" key there for TensorFlow already loaded.)
NO_TENSORFLOW = """
import importlib.machinery, sys
class PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "tensorflow" else super().find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = PathFinderWithoutTensorFlow
"""


def run_without_tensorflow(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` (with `args` in sys.argv) in a fresh Python that has no TensorFlow."""
    code = NO_TENSORFLOW + code
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, check=False)


@pytest.mark.tfds
@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
def test_tfds_holds_the_idx_examples_in_another_order(tfds_copies, mnist_arrays, fmt):
    builder = T.mnist_builder(str(tfds_copies[fmt]))
    assert builder.info.file_format.value == fmt
    for split in T.SPLITS:
        images, labels = T.read_split(builder, split)
        idx_images, idx_labels = mnist_arrays[f"{split}_images"], mnist_arrays[f"{split}_labels"]
        assert not np.array_equal(labels, idx_labels)  # TFDS shuffled them when it prepared the copy
        examples = Counter(image.tobytes() + bytes([label]) for image, label in zip(images, labels))
        assert examples == Counter(image.tobytes() + bytes([label]) for image, label in zip(idx_images, idx_labels))
        assert np.bincount(labels, minlength=10).tolist() == LABEL_COUNTS[split]


@pytest.mark.tfds
def test_array_record_reads_without_tensorflow_from_tfds_default_dir(tfds_copies, mnist_arrays, tmp_path):
    out = tmp_path / "arrays.npz"
    done = run_without_tensorflow(
        "import numpy as np; from common.loop import load_arrays; np.savez(sys.argv[1], **load_arrays('tfds', None, None))",
        str(out), TFDS_DATA_DIR=str(tfds_copies["array_record"]))  # TFDS's own default: no --tfds-data-dir
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        assert_idx_arrays(dict(arrays), mnist_arrays)


@pytest.mark.tfds
def test_tfrecord_reads_into_the_idx_arrays(tfds_copies, mnist_arrays):
    assert_idx_arrays(load_arrays("tfds", None, str(tfds_copies["tfrecord"])), mnist_arrays)


@pytest.mark.tfds
def test_tfrecord_without_tensorflow_says_so_in_one_line(tfds_copies):
    code = "from common import data as D\nfrom common.loop import load_arrays\ntry:\n    load_arrays('tfds', None, sys.argv[1])\nexcept D.DataError as e:\n    print(e)"
    done = run_without_tensorflow(code, str(tfds_copies["tfrecord"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stored as tfrecord, which only TensorFlow reads" in done.stdout and done.stdout.count("\n") == 1


@pytest.mark.tfds
def test_a_folder_without_a_prepared_mnist_is_a_one_line_error(tmp_path):
    with pytest.raises(D.DataError, match="no prepared TFDS mnist") as err:
        load_arrays("tfds", None, str(tmp_path))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
