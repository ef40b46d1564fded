"""Which trusted samples train which model, and which calibrate it (out of sample, always).

The boundary is read off clean scores at the ``target_fpr`` quantile, so it needs clean samples
that no member was trained on, and enough of them: a 1 % quantile needs more than 100 scores, and
its realised FPR has a binomial spread of ``sqrt(0.01 * 0.99 / n)``. Two plans:

* **holdout** (large pools, e.g. Fashion-MNIST's 12,000): the pool is cut once into a training
  part and a calibration part (``calibration_fraction``); one model is trained and shipped.
* **cross-fit** (small pools, e.g. the 252 trusted digits, whose 20 % holdout would be 50 samples:
  too few for any 1 % quantile): the pool is cut into ``folds`` folds (10 by default); fold model
  f is trained on the other folds and scores fold f, so *every* trusted sample gets an
  out-of-fold score and the calibration set is the whole pool. The shipped model is fold model 0
  itself: trained like every fold model (on 90 % of the pool), its scores of new clean data are
  distributed like the out-of-fold scores it is compared with. A model trained on the whole pool
  instead would be a little better than every fold model, which makes the realised FPR err low;
  measured on held-out train-split digits (6 seeds, 1 % target) both shipped 0.74 % with ten
  folds and the fold model caught as many poisons, so the fold model it is (one training less).

``auto`` picks cross-fit when the holdout part would hold fewer than ``10 / target_fpr`` samples,
i.e. fewer than ten calibration samples at or below the boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from training.data import LabeledImages

HOLDOUT = -1  # fold id of pool samples that only ever train (holdout plan)
CROSSFIT_FOLDS = 10
MIN_FLAGGED_FOR_HOLDOUT = 10


@dataclass(frozen=True)
class CalibrationPlan:
    mode: Literal["holdout", "crossfit"]
    pool: LabeledImages  # the whole trusted pool
    folds: np.ndarray  # int64 [len(pool)]: fold id, HOLDOUT for training-only samples

    @property
    def fold_ids(self) -> list[int]:
        return sorted(int(f) for f in np.unique(self.folds) if f != HOLDOUT)

    @property
    def calibration_mask(self) -> np.ndarray:
        return self.folds != HOLDOUT

    def fold_split(self, fold: int) -> tuple[LabeledImages, LabeledImages]:
        """(what fold model ``fold`` trains on, what it scores out of sample)."""
        return (self.pool.subset(np.flatnonzero(self.folds != fold)),
                self.pool.subset(np.flatnonzero(self.folds == fold)))

    @property
    def shipped_fold(self) -> int:
        """The fold whose model is shipped: the holdout's only model, or fold model 0."""
        return self.fold_ids[0]

    def shipped_training_data(self) -> LabeledImages:
        """What the shipped model trains on (the holdout's training part, or all folds but one)."""
        return self.fold_split(self.shipped_fold)[0]

    def min_class_count(self, num_classes: int) -> int:
        """Smallest class count over the training data of every fold model (the shipped one is
        one of them): the kNN members' k must suit all of them alike."""
        parts = [self.fold_split(f)[0] for f in self.fold_ids]
        return int(min(np.bincount(p.labels, minlength=num_classes).min() for p in parts))

    @property
    def calibration(self) -> LabeledImages:
        return self.pool.subset(np.flatnonzero(self.calibration_mask))

    def cv_folds(self, seed: int) -> np.ndarray:
        """Fold ids of the calibration samples for the out-of-sample FPR estimate."""
        if self.mode == "crossfit":
            return self.folds[self.calibration_mask]
        n = int(self.calibration_mask.sum())
        return np.random.default_rng(seed).permutation(n) % CROSSFIT_FOLDS


def choose_mode(pool_size: int, calibration_fraction: float, target_fpr: float, folds: int | None) -> tuple[
    Literal["holdout", "crossfit"], int
]:
    """(mode, number of folds) for ``folds`` None (auto), 1 (holdout) or >= 2 (cross-fit)."""
    if folds == 1:
        return "holdout", 1
    if folds is not None:
        return "crossfit", folds
    holdout = max(1, round(calibration_fraction * pool_size))
    if holdout >= math.ceil(MIN_FLAGGED_FOR_HOLDOUT / target_fpr):
        return "holdout", 1
    return "crossfit", CROSSFIT_FOLDS


def make_plan(pool: LabeledImages, calibration: LabeledImages, trusted_train: LabeledImages,
              calibration_fraction: float, target_fpr: float, folds: int | None, seed: int) -> CalibrationPlan:
    """Plan over the pool = calibration part followed by training part of ``trusted_split``."""
    mode, k = choose_mode(len(pool), calibration_fraction, target_fpr, folds)
    n_cal = len(calibration)
    if mode == "holdout":
        ids = np.concatenate([np.zeros(n_cal, np.int64), np.full(len(trusted_train), HOLDOUT, np.int64)])
    else:
        if k > len(pool):
            raise ValueError(f"cannot cut {len(pool)} trusted samples into {k} folds")
        ids = (np.random.default_rng(seed + 17).permutation(len(pool)) % k).astype(np.int64)
    return CalibrationPlan(mode, pool, ids)
