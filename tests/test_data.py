"""The data module on the real MNIST files and on damaged copies of them."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from common import data as D


def copy_mnist(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for stem in D.FILES.values():
        shutil.copy(src / f"{stem}.gz", dst / f"{stem}.gz")
    return dst


def rewrite(path: Path, change) -> None:
    with gzip.open(path, "rb") as f:
        raw = bytearray(f.read())
    with gzip.open(path, "wb") as f:
        f.write(bytes(change(raw)))


def test_real_files_load_and_match_the_published_facts(mnist_arrays):
    assert mnist_arrays["train_images"].shape == (60_000, 28, 28)
    assert mnist_arrays["test_images"].shape == (10_000, 28, 28)
    # The data README's label counts and mean, independent of our checksums.
    assert np.bincount(mnist_arrays["test_labels"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist_arrays["train_images"].mean() / 255 == pytest.approx(0.13066, abs=1e-5)


def test_raw_uncompressed_files_are_read_too(mnist_dir, tmp_path):
    for stem in D.FILES.values():
        with gzip.open(mnist_dir / f"{stem}.gz", "rb") as f:
            (tmp_path / stem).write_bytes(f.read())
    assert D.load_mnist(tmp_path)["test_labels"].shape == (10_000,)


@pytest.mark.parametrize(
    "stem, change, message",
    [
        ("t10k-labels-idx1-ubyte", lambda raw: raw[:-100], "truncated"),
        ("t10k-images-idx3-ubyte", lambda raw: raw[:10], "truncated header"),
        ("t10k-images-idx3-ubyte", lambda raw: raw + b"\0", "trailing bytes"),
        ("train-labels-idx1-ubyte", lambda raw: b"\x00\x00\x08\x03" + raw[4:], "bad magic"),
        ("t10k-images-idx3-ubyte", lambda raw: raw[:8] + (27).to_bytes(4, "big") + raw[12:], "dimensions"),
        ("t10k-images-idx3-ubyte", lambda raw: raw[:500] + bytes([raw[500] ^ 1]) + raw[501:], "SHA-256"),
        ("t10k-labels-idx1-ubyte", lambda raw: raw[:8] + bytes([12]) + raw[9:], "SHA-256"),
    ],
)
def test_damaged_copies_give_a_one_line_error_naming_the_file(mnist_dir, tmp_path, stem, change, message):
    copy = copy_mnist(mnist_dir, tmp_path / "mnist")
    rewrite(copy / f"{stem}.gz", change)
    with pytest.raises(D.DataError, match=message) as err:
        D.load_mnist(copy)
    assert stem in str(err.value) and "\n" not in str(err.value)


def test_a_broken_gzip_stream_is_a_data_error(mnist_dir, tmp_path):
    copy = copy_mnist(mnist_dir, tmp_path / "mnist")
    path = copy / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte.gz: cannot read"):
        D.load_mnist(copy)


def test_a_missing_file_is_named(mnist_dir, tmp_path):
    copy = copy_mnist(mnist_dir, tmp_path / "mnist")
    (copy / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(D.DataError, match="missing train-images-idx3-ubyte"):
        D.load_mnist(copy)


def test_locate_prefers_flag_then_env_then_cache(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    assert D.locate(str(tmp_path)) == tmp_path
    assert D.locate(None) == mnist_dir
    monkeypatch.delenv("MNIST_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy_mnist(mnist_dir, tmp_path / "cache" / "mnist-sum")
    assert D.locate(None) == tmp_path / "cache" / "mnist-sum"
    with pytest.raises(D.DataError, match="no such directory"):
        D.locate(str(tmp_path / "absent"))


def test_download_from_a_mirror_verifies_and_lands_whole_files(mnist_dir, tmp_path, monkeypatch):
    mirror = copy_mnist(mnist_dir, tmp_path / "mirror")
    target = tmp_path / "cache"
    D.download(target, mirrors=("file://" + str(tmp_path / "nowhere"), mirror.as_uri()))  # first mirror fails
    assert D.load_mnist(target)["train_labels"].shape == (60_000,)
    assert not list(target.glob("*.part"))


def test_download_failure_says_how_to_use_local_files(mnist_dir, tmp_path):
    mirror = copy_mnist(mnist_dir, tmp_path / "mirror")
    rewrite(mirror / "t10k-labels-idx1-ubyte.gz", lambda raw: raw[:-1] + b"\x07")  # a mirror serving bad bytes
    with pytest.raises(D.DataError, match="--data-dir") as err:
        D.download(tmp_path / "cache", mirrors=(mirror.as_uri(),))
    message = str(err.value)
    assert "checksum mismatch" in message and str(tmp_path / "cache") in message  # where files are found by themselves
    assert "\n" not in message and len(message) < 200 + len(str(tmp_path))  # one short line, not every URL
    assert not (tmp_path / "cache" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list((tmp_path / "cache").glob("*.part"))


def test_numbers_are_seeded_and_the_test_set_is_fixed(mnist_arrays):
    train_a, test_a = D.make_splits(mnist_arrays, seed=1)
    train_b, test_b = D.make_splits(mnist_arrays, seed=2)
    np.testing.assert_array_equal(test_a.numbers, test_b.numbers)
    assert not np.array_equal(train_a.numbers, train_b.numbers)
    np.testing.assert_array_equal(D.make_splits(mnist_arrays, seed=1)[0].numbers, train_a.numbers)
    assert set(np.unique(test_a.numbers)) == set(range(10))
    assert test_a.sums.min() == 0 and test_a.sums.max() == 18


def test_rotation_and_scaling_are_seeded_within_their_ranges_and_keep_the_crop_offsets():
    from common.config import Config
    from common.loop import epoch_plan

    cfg = Config(rotate=15.0, scale=0.1, shift=2, seed=3)
    batches, aug = epoch_plan(cfg, 1000, epoch=1)
    assert aug.shape == (*batches.shape, 4) and aug.dtype == np.float32
    # the crop offsets are those of translation alone: --rotate and --scale add to it, not redraw it
    np.testing.assert_array_equal(aug[..., :2], D.epoch_offsets(*batches.shape, 2, seed=3, epoch=1))
    angles, scales = np.rad2deg(aug[..., 2]), aug[..., 3]
    assert -15 <= angles.min() < -14 and 14 < angles.max() <= 15
    assert 0.9 <= scales.min() < 0.91 and 1.09 < scales.max() <= 1.1
    np.testing.assert_array_equal(aug, epoch_plan(cfg, 1000, epoch=1)[1])
    assert not np.array_equal(aug, epoch_plan(cfg, 1000, epoch=2)[1])
    assert epoch_plan(Config(shift=2), 1000, epoch=1)[1].shape[-1] == 2  # translation alone: integer offsets
    assert epoch_plan(Config(shift=0), 1000, epoch=1)[1] is None


def test_elastic_displacements_are_seeded_within_their_range_and_added_after_the_warp():
    from common.config import Config
    from common.loop import epoch_plan

    cfg = Config(rotate=15.0, scale=0.1, elastic=2.5, seed=3)
    batches, aug = epoch_plan(cfg, 1000, epoch=1)
    assert aug.shape == (*batches.shape, 4 + 2 * D.ELASTIC_GRID**2) and aug.dtype == np.float32
    # the crop, angle and scale are those drawn without it: --elastic adds to them, not redraws them
    np.testing.assert_array_equal(aug[..., :4], epoch_plan(replace(cfg, elastic=0.0), 1000, epoch=1)[1])
    assert -2.5 <= aug[..., 4:].min() < -2.4 and 2.4 < aug[..., 4:].max() <= 2.5
    assert not np.array_equal(aug, epoch_plan(cfg, 1000, epoch=2)[1])
    # --elastic alone is a warp too (angle 0, scale 1)
    alone = epoch_plan(Config(elastic=1.0), 1000, epoch=1)[1]
    assert alone.shape[-1] == 36 and (alone[..., 2] == 0).all() and (alone[..., 3] == 1).all()


def test_the_elastic_field_interpolates_its_control_points():
    u = D.elastic_upsampling()
    np.testing.assert_allclose(u.sum(axis=1), 1.0, rtol=0, atol=1e-12)  # a weighted mean of control points
    # the first and last pixel of each side sit on the corner control points
    np.testing.assert_array_equal(u[[0, -1]], np.eye(D.ELASTIC_GRID)[[0, -1]])
    field = np.random.default_rng(0).uniform(-1, 1, (D.ELASTIC_GRID, D.ELASTIC_GRID))
    smooth = u @ field @ u.T
    assert np.abs(np.diff(smooth, axis=0)).max() <= np.abs(np.diff(field, axis=0)).max() / 9 + 1e-12  # 9 pixels per cell


def test_epoch_batches_are_a_seeded_permutation():
    a = D.epoch_batches(1000, 64, seed=3, epoch=1)
    assert a.shape == (15, 64)
    assert len(np.unique(a)) == a.size
    np.testing.assert_array_equal(a, D.epoch_batches(1000, 64, seed=3, epoch=1))
    assert not np.array_equal(a, D.epoch_batches(1000, 64, seed=3, epoch=2))
    assert not np.array_equal(a, D.epoch_batches(1000, 64, seed=4, epoch=1))
