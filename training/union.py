"""The calibrated union: member scores -> per-member p-values -> weighted min-p -> boundary (pure numpy).

``calibrate_union`` turns the raw member scores of clean calibration samples that no member was
trained on (out-of-fold scores, ``training.crossfit``) into everything the detector needs after
its networks: the per-class standardisation of each member, each member's sorted p-value
reference and tail scale, the union statistic's own reference, and the boundary on it.

The exported ``score`` is ``log min_j p_j / w_j`` (higher = more trustworthy; ``w`` the member
weights, ``training.conformal.member_weights``); the boundary is the
``target_fpr`` quantile of the calibration samples' leave-one-out union statistic, per class
where a class has at least ``1 / target_fpr`` calibration samples (else the global one). The
same function, given a subset of the columns, is how the evaluation builds "member alone" and
"union without member" ablations: every variant is calibrated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from depois_stream.contract import Boundary
from training.calibration import min_class_count, paper_boundary, threshold_at_fpr
from training.conformal import Knots, log_p_knots, loo_log_p_values, scale_weights, tail_scale, union_log_p
from training.evidence import ClassStandardiser


@dataclass(frozen=True)
class UnionCalibration:
    members: tuple[str, ...]
    num_classes: int
    target_fpr: float
    standardiser: ClassStandardiser
    references: np.ndarray  # float64 [J, n]: sorted standardised clean scores per member
    betas: np.ndarray  # float64 [J]: tail scales
    union_reference: np.ndarray  # float64 [n]: sorted leave-one-out union statistic of the calibration samples
    union_beta: float
    knots: tuple[Knots, ...]  # per member: the reference as the graph stores it (training.conformal.Knots)
    union_knots: Knots
    boundary: Boundary
    fell_back: list[int] = field(default_factory=list)
    cv_fpr: list[float] = field(default_factory=list)  # out-of-fold FPR of this boundary rule, per fold
    weights: np.ndarray | None = None  # float64 [J], summing to J (weighted min-p); None = all 1

    # ------------------------------------------------------------------ scoring

    def member_log_p(self, raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[N, J] log p-value of each member against its clean reference."""
        z = self.standardiser.apply(raw, labels)
        return np.stack([log_p_knots(z[:, j], self.knots[j], float(self.betas[j]))
                         for j in range(len(self.members))], axis=1)

    def score(self, raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return union_log_p(self.member_log_p(raw, labels), self.weights).astype(np.float32)

    def p_value(self, scores: np.ndarray) -> np.ndarray:
        """Union p-value: how unusual the union statistic is among clean calibration samples."""
        return np.exp(log_p_knots(scores, self.union_knots, self.union_beta)).astype(np.float32)

    def flagged(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.asarray(scores, np.float32) < self.boundary.for_labels(labels)

    @property
    def weight_vector(self) -> np.ndarray:
        """float64 [J]: the members' weights in the statistic (all 1 for plain min-p)."""
        return self.weights if self.weights is not None else np.ones(len(self.members))

    @property
    def n(self) -> int:
        return int(self.references.shape[1])

    @property
    def p_step(self) -> float:
        """One rank of the p-value references, ``1 / (n + 1)``: the resolution of every p-value."""
        return 1.0 / (min(self.n, self.union_reference.size) + 1.0)


def _loo_union(z: np.ndarray, betas: list[float], weights: np.ndarray | None) -> np.ndarray:
    """Leave-one-out union statistic of the calibration samples themselves ([n, J] standardised)."""
    cols = [loo_log_p_values(z[:, j], betas[j]) for j in range(z.shape[1])]
    return union_log_p(np.stack(cols, axis=1), weights)


MIN_FLAGGED = 10


def union_threshold(stat: np.ndarray, target_fpr: float) -> float:
    """Boundary on the union statistic ``log min_j p_j / w_j`` of clean calibration samples.

    With at least ``MIN_FLAGGED`` calibration samples below the target quantile, the plain
    order statistic (``threshold_at_fpr``: flags at most ``floor(target_fpr * n)`` of them).
    With fewer (the 252 trusted digits: 2.5 at 1 %), that order statistic is mostly noise: its
    realised FPR scatters by +-0.63 points. There the boundary uses what is known about the
    statistic instead: the weighted minimum of calibrated p-values has a CDF linear near zero,
    ``P(min_j p_j / w_j <= t) ~ c t`` with ``c`` between ``max_j w_j`` (members that always
    agree) and the number of members (never together in the tail; the weights sum to it). ``c`` is read at the ``MIN_FLAGGED``-th smallest
    calibration value, ``c = m / ((n + 1) t_(m))``, and the boundary is ``t* = target_fpr / c``:
    ten samples instead of 2.5 set it (spread ~+-0.3 points at n = 252). The result is moved into
    the middle of the gap it falls in, so no calibration score sits on it."""
    s = np.sort(np.asarray(stat, dtype=np.float64))
    n = s.size
    if math.floor(target_fpr * n) >= MIN_FLAGGED or n < 2:
        return threshold_at_fpr(s, target_fpr)
    m = min(MIN_FLAGGED, n)
    t = math.log(target_fpr) + math.log(n + 1.0) - math.log(m) + float(s[m - 1])
    t = min(t, float(s[m - 1]))  # never above the m-th value: at most m - 1 calibration flags
    pos = int(np.searchsorted(s, t))
    lo = s[pos - 1] if pos > 0 else s[0] - (s[1] - s[0] if n > 1 else 1.0)
    hi = s[pos] if pos < n else s[-1] + 1.0
    if min(t - lo, hi - t) < 1e-6 * (1.0 + abs(t)):
        t = float((lo + hi) / 2.0)
    return float(t)


def _boundary(stat: np.ndarray, labels: np.ndarray, num_classes: int, target_fpr: float, per_class: bool,
              paper_k: float) -> tuple[Boundary, list[int]]:
    global_t = union_threshold(stat, target_fpr)
    per, fell_back = None, []
    if per_class:
        per = []
        for c in range(num_classes):
            own = stat[labels == c]
            if own.size < min_class_count(target_fpr):
                per.append(global_t)
                fell_back.append(c)
            else:
                per.append(union_threshold(own, target_fpr))
    return Boundary(global_=global_t, per_class=per, paper_mean_k_std=paper_boundary(stat, paper_k),
                    paper_k=paper_k), fell_back


def _fit(raw: np.ndarray, labels: np.ndarray, num_classes: int, members: tuple[str, ...]) -> tuple[
    ClassStandardiser, np.ndarray, list[np.ndarray], list[float]
]:
    standardiser = ClassStandardiser.fit(raw, labels, num_classes, members)
    z = standardiser.apply(raw, labels).astype(np.float64)
    refs = [np.sort(z[:, j]) for j in range(z.shape[1])]
    return standardiser, z, refs, [tail_scale(r) for r in refs]


def cross_validated_fpr(raw: np.ndarray, labels: np.ndarray, num_classes: int, members: tuple[str, ...],
                        target_fpr: float, per_class: bool, folds: np.ndarray,
                        weights: np.ndarray | None = None) -> list[float]:
    """FPR of the whole calibration rule measured out of sample: for each fold, standardisation,
    references and boundary come from the other folds only, and the flag rate is read on the fold.

    This is what the model card reports instead of the flag rate on the calibration samples
    themselves, which the boundary was read off (and is at most the target by construction)."""
    out = []
    for f in np.unique(folds):
        fit_idx, test_idx = folds != f, folds == f
        if fit_idx.sum() < 2 or not test_idx.any():
            continue
        standardiser, z, refs, betas = _fit(raw[fit_idx], labels[fit_idx], num_classes, members)
        boundary, _ = _boundary(_loo_union(z, betas, weights), labels[fit_idx], num_classes, target_fpr,
                                per_class, 1.0)
        zt = standardiser.apply(raw[test_idx], labels[test_idx]).astype(np.float64)
        stat = union_log_p(np.stack([log_p_knots(zt[:, j], Knots.of(refs[j]), betas[j])
                                     for j in range(len(members))], 1), weights)
        out.append(float(np.mean(stat.astype(np.float32) < boundary.for_labels(labels[test_idx]))))
    return out


def calibrate_union(raw: np.ndarray, labels: np.ndarray, num_classes: int, members: tuple[str, ...],
                    target_fpr: float, per_class: bool, folds: np.ndarray | None = None,
                    paper_k: float = 1.0, weights: np.ndarray | None = None) -> UnionCalibration:
    """Calibrate the union on clean out-of-sample member scores ``raw`` [n, J].

    ``weights`` [J] (positive; scaled here to sum to J) share the false-alarm budget between the
    members; None gives every member the same share (plain min-p)."""
    raw = np.asarray(raw, np.float32)
    labels = np.asarray(labels, np.int64)
    if raw.ndim != 2 or raw.shape[1] != len(members) or len(raw) != len(labels):
        raise ValueError(f"raw scores must be [n, {len(members)}] with one label each, got {raw.shape}")
    if len(labels) < 2:
        raise ValueError("calibrating the union needs at least two clean samples")
    if weights is not None:
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} members")
        weights = scale_weights(weights)
    standardiser, z, refs, betas = _fit(raw, labels, num_classes, members)
    loo = _loo_union(z, betas, weights)
    boundary, fell_back = _boundary(loo, labels, num_classes, target_fpr, per_class, paper_k)
    union_ref = np.sort(loo)
    cv = (cross_validated_fpr(raw, labels, num_classes, members, target_fpr, per_class, folds, weights)
          if folds is not None else [])
    return UnionCalibration(
        members=tuple(members), num_classes=num_classes, target_fpr=target_fpr, standardiser=standardiser,
        references=np.stack(refs), betas=np.asarray(betas), union_reference=union_ref,
        union_beta=tail_scale(union_ref), knots=tuple(Knots.of(r) for r in refs), union_knots=Knots.of(union_ref),
        boundary=boundary, fell_back=fell_back, cv_fpr=cv, weights=weights,
    )

