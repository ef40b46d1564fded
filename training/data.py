"""Training's view of the data: the shared loaders, and the paper's trusted pool cut from them.

The data sets themselves (registry, IDX parsing and checksums, the digits split rule) live in
``depois_stream.sim.datasets``, numpy only, shared with the demo's producer and the tests; what
is training's own is the trusted split below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from depois_stream.sim.datasets import (  # noqa: F401  (training's data API, in one place)
    DATASETS, FASHION_FILES, FASHION_SYSTEM_DIR, MNIST_FILES, DatasetError, DatasetSplits,
    LabeledImages, load_dataset, own_dataset, parse_idx, verify_idx_file,
)

if TYPE_CHECKING:
    from training.config import FitConfig


@dataclass(frozen=True)
class TrustedSplit:
    """The trusted pool of the paper, cut in two: what the models learn from and what the
    boundary is calibrated on. The calibration part never reaches any training loop, so the
    boundary's false-positive rate is measured on data the models have not memorised."""

    trusted_train: LabeledImages
    calibration: LabeledImages


def trusted_split(
    train: LabeledImages,
    trusted_fraction: float = 0.2,
    calibration_fraction: float = 0.2,
    seed: int = 0,
) -> TrustedSplit:
    """Trusted pool = first ``trusted_fraction`` of a seeded permutation of ``train`` (the paper's
    setting: the defender owns a small clean subset); ``calibration_fraction`` of that pool is held
    out for the boundary."""
    if not 0.0 < trusted_fraction <= 1.0 or not 0.0 < calibration_fraction < 1.0:
        raise ValueError("trusted_fraction must be in (0, 1] and calibration_fraction in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(train))
    pool = order[: max(2, round(trusted_fraction * len(train)))]
    n_cal = max(1, round(calibration_fraction * len(pool)))
    return TrustedSplit(trusted_train=train.subset(pool[n_cal:]), calibration=train.subset(pool[:n_cal]))


def fit_data(cfg: FitConfig) -> tuple[DatasetSplits, TrustedSplit]:
    """What a fit learns from: a registered data set and the trusted share of its train split,
    or the user's own pool (``--trusted-npz``), all of it trusted. Preflight and the fit both
    call this, so the pool checked in seconds is the pool trained on."""
    if cfg.trusted_npz is not None:
        splits = own_dataset(cfg.trusted_npz)
        return splits, trusted_split(splits.train, 1.0, cfg.calibration_fraction, cfg.seed)
    splits = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    return splits, trusted_split(splits.train, cfg.trusted_fraction, cfg.calibration_fraction, cfg.seed)


def default_synthetic(train_size: int, pool_size: int) -> int:
    """Synthetic samples the cGAN makes when --n-synthetic is not given: as many as the train
    split holds beyond the trusted pool (the paper's setting: 4x the pool at the default 20 %),
    or 4x the pool where the pool is all there is (--trusted-npz)."""
    return train_size - pool_size if train_size > pool_size else 4 * pool_size
