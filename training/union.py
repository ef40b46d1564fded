"""The calibrated union: member scores -> per-member p-values (+ agreement columns) -> weighted min-p -> boundary (pure numpy).

``calibrate_union`` turns the raw member scores of clean calibration samples that no member was
trained on (out-of-fold scores, ``training.crossfit``) into everything the detector needs after
its networks: the per-class standardisation of each member, each member's sorted p-value
reference and tail scale, the union statistic's own reference, and the boundary on it.

The union's columns are the members' p-values and, for each evidence family of at least two
members (``training.evidence.FAMILIES``), one *agreement* column: Fisher's ``sum_j log p_j`` over
the family's members, itself turned into a p-value against the same statistic of the clean
calibration samples (``Agreement``). Why: under a minimum, members that read the same evidence
each take a share of the false-alarm budget and none can count the others' support. A poison
that all three pixel members find a little unusual (a faint blended pattern: each member's p near
1 %, above the boundary any one member must reach in the union) is far in the tail of their sum,
while a poison that one member alone sees far out still fires that member's own column.

The exported ``score`` is ``log min_c p_c / w_c`` over the columns (higher = more trustworthy;
``w`` the column weights, ``training.conformal.member_weights``); the boundary is the
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
class Agreement:
    """One agreement column: Fisher's statistic ``sum_j log p_j`` over the member columns ``parts``,
    as a p-value against the same statistic of the clean calibration samples.

    The calibration samples' statistic is built from their *leave-one-out* member p-values (what a
    new clean sample sees), so the agreement reference is out of sample in the same sense as the
    members'. Fisher's statistic needs no independence here: its null distribution is read off
    clean data, not off a chi-square table."""

    name: str
    parts: tuple[int, ...]  # member columns (indices into UnionCalibration.members)
    reference: np.ndarray  # float64 [n]: sorted statistic of the calibration samples
    beta: float
    knots: Knots

    def statistic(self, member_log_p: np.ndarray) -> np.ndarray:
        return fisher(member_log_p, self.parts)

    def log_p(self, member_log_p: np.ndarray) -> np.ndarray:
        return log_p_knots(self.statistic(member_log_p), self.knots, self.beta)

    @classmethod
    def fit(cls, name: str, parts: tuple[int, ...], loo_member_log_p: np.ndarray) -> tuple[Agreement, np.ndarray]:
        """The column from the calibration samples' leave-one-out member log p-values [n, J], and
        those samples' own leave-one-out log p-values on it [n]."""
        stat = fisher(loo_member_log_p, parts)
        ref = np.sort(stat)
        beta = tail_scale(ref)
        return cls(name, tuple(parts), ref, beta, Knots.of(ref)), loo_log_p_values(stat, beta)


AgreementSpec = tuple[tuple[str, tuple[str, ...]], ...]  # (column name, member names) per agreement column


def fisher(member_log_p: np.ndarray, parts: tuple[int, ...]) -> np.ndarray:
    """Fisher's statistic ``sum_j log p_j`` over the member columns ``parts`` of [N, J] -> [N]."""
    return np.asarray(member_log_p, np.float64)[:, list(parts)].sum(axis=1)


def column_names(members: tuple[str, ...], agreements: AgreementSpec) -> tuple[str, ...]:
    """The union's columns, in ``evidence`` order: the members, then the agreement columns (what
    the weights passed to ``calibrate_union`` must follow)."""
    return tuple(members) + tuple(name for name, _ in agreements)


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
    weights: np.ndarray | None = None  # float64 [C], summing to C (weighted min-p); None = all 1
    agreements: tuple[Agreement, ...] = ()  # extra columns after the members'

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the union's columns (the ONNX ``evidence`` columns): members, then agreements."""
        return tuple(self.members) + tuple(a.name for a in self.agreements)

    # ------------------------------------------------------------------ scoring

    def member_log_p(self, raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[N, J] log p-value of each member against its clean reference."""
        z = self.standardiser.apply(raw, labels)
        return np.stack([log_p_knots(z[:, j], self.knots[j], float(self.betas[j]))
                         for j in range(len(self.members))], axis=1)

    def column_log_p(self, raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[N, C] log p-value of every column: the members', then each agreement's."""
        return with_agreements(self.member_log_p(raw, labels), self.agreements)

    def score(self, raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return union_log_p(self.column_log_p(raw, labels), self.weights).astype(np.float32)

    def p_value(self, scores: np.ndarray) -> np.ndarray:
        """Union p-value: how unusual the union statistic is among clean calibration samples."""
        return np.exp(log_p_knots(scores, self.union_knots, self.union_beta)).astype(np.float32)

    def flagged(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.asarray(scores, np.float32) < self.boundary.for_labels(labels)

    @property
    def weight_vector(self) -> np.ndarray:
        """float64 [C]: the columns' weights in the statistic (all 1 for plain min-p)."""
        return self.weights if self.weights is not None else np.ones(len(self.columns))

    @property
    def n(self) -> int:
        return int(self.references.shape[1])

    @property
    def p_step(self) -> float:
        """One rank of the p-value references, ``1 / (n + 1)``: the resolution of every p-value."""
        return 1.0 / (min(self.n, self.union_reference.size) + 1.0)


def with_agreements(member_log_p: np.ndarray, agreements: tuple[Agreement, ...]) -> np.ndarray:
    """[N, J] member log p-values -> [N, J + G] with each agreement's log p-value appended."""
    lp = np.asarray(member_log_p, np.float64)
    if not agreements:
        return lp
    return np.concatenate([lp, np.stack([a.log_p(lp) for a in agreements], axis=1)], axis=1)


def _loo_union(z: np.ndarray, betas: list[float], weights: np.ndarray | None,
               spec: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[np.ndarray, tuple[Agreement, ...]]:
    """Leave-one-out union statistic of the calibration samples themselves ([n, J] standardised),
    and the agreement columns fitted on their leave-one-out member p-values."""
    members = np.stack([loo_log_p_values(z[:, j], betas[j]) for j in range(z.shape[1])], axis=1)
    fitted = [Agreement.fit(name, parts, members) for name, parts in spec]
    cols = np.concatenate([members, *(loo[:, None] for _, loo in fitted)], axis=1)
    return union_log_p(cols, weights), tuple(a for a, _ in fitted)


def _agreement_columns(members: tuple[str, ...], agreements: AgreementSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Validate ``agreements`` against ``members``; member names -> column indices."""
    out, seen = [], set(members)
    for name, parts in agreements:
        if name in seen:
            raise ValueError(f"agreement column {name!r} repeats a column name")
        seen.add(name)
        if len(parts) < 2 or len(set(parts)) != len(parts) or not set(parts) <= set(members):
            raise ValueError(f"agreement {name!r} needs two or more distinct members of {list(members)}, "
                             f"got {list(parts)}")
        out.append((name, tuple(members.index(m) for m in parts)))
    return tuple(out)


MIN_FLAGGED = 10


def is_order_statistic(n: int, target_fpr: float) -> bool:
    """Whether ``n`` calibration samples put at least ``MIN_FLAGGED`` below the ``target_fpr``
    quantile, so that ``union_threshold`` reads the boundary off them instead of extrapolating."""
    return math.floor(target_fpr * n) >= MIN_FLAGGED


def union_threshold(stat: np.ndarray, target_fpr: float) -> float:
    """Boundary on the union statistic ``log min_j p_j / w_j`` of clean calibration samples.

    With at least ``MIN_FLAGGED`` calibration samples below the target quantile, the plain
    order statistic (``threshold_at_fpr``: flags at most ``floor(target_fpr * n)`` of them).
    With fewer (the 252 trusted digits: 2.5 at 1 %), that order statistic is mostly noise: its
    realised FPR scatters by +-0.63 points. There the boundary uses what is known about the
    statistic instead: the weighted minimum of calibrated p-values has a CDF linear near zero,
    ``P(min_j p_j / w_j <= t) ~ c t`` over the columns, with ``c`` between ``max_j w_j`` (columns that always
    agree) and the number of columns (never together in the tail; the weights sum to it). ``c`` is read at the ``MIN_FLAGGED``-th smallest
    calibration value, ``c = m / ((n + 1) t_(m))``, and the boundary is ``t* = target_fpr / c``:
    ten samples instead of 2.5 set it (spread ~+-0.3 points at n = 252). The result is moved into
    the middle of the gap it falls in, so no calibration score sits on it."""
    s = np.sort(np.asarray(stat, dtype=np.float64))
    n = s.size
    if is_order_statistic(n, target_fpr) or n < 2:
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
                        weights: np.ndarray | None = None, agreements: AgreementSpec = ()) -> list[float]:
    """FPR of the whole calibration rule measured out of sample: for each fold, standardisation,
    references and boundary come from the other folds only, and the flag rate is read on the fold.

    This is what the model card reports instead of the flag rate on the calibration samples
    themselves, which the boundary was read off (and is at most the target by construction)."""
    spec = _agreement_columns(members, agreements)
    out = []
    for f in np.unique(folds):
        fit_idx, test_idx = folds != f, folds == f
        if fit_idx.sum() < 2 or not test_idx.any():
            continue
        standardiser, z, refs, betas = _fit(raw[fit_idx], labels[fit_idx], num_classes, members)
        loo, fitted = _loo_union(z, betas, weights, spec)
        boundary, _ = _boundary(loo, labels[fit_idx], num_classes, target_fpr, per_class, 1.0)
        zt = standardiser.apply(raw[test_idx], labels[test_idx]).astype(np.float64)
        member_lp = np.stack([log_p_knots(zt[:, j], Knots.of(refs[j]), betas[j]) for j in range(len(members))], 1)
        stat = union_log_p(with_agreements(member_lp, fitted), weights)
        out.append(float(np.mean(stat.astype(np.float32) < boundary.for_labels(labels[test_idx]))))
    return out


def calibrate_union(raw: np.ndarray, labels: np.ndarray, num_classes: int, members: tuple[str, ...],
                    target_fpr: float, per_class: bool, folds: np.ndarray | None = None,
                    paper_k: float = 1.0, weights: np.ndarray | None = None,
                    agreements: AgreementSpec = ()) -> UnionCalibration:
    """Calibrate the union on clean out-of-sample member scores ``raw`` [n, J].

    ``agreements`` adds one agreement column per (name, member names) entry (``Agreement``).
    ``weights`` [C], one per column (members, then agreements; positive; scaled here to sum to C),
    share the false-alarm budget between the columns; None gives every column the same share
    (plain min-p)."""
    raw = np.asarray(raw, np.float32)
    labels = np.asarray(labels, np.int64)
    if raw.ndim != 2 or raw.shape[1] != len(members) or len(raw) != len(labels):
        raise ValueError(f"raw scores must be [n, {len(members)}] with one label each, got {raw.shape}")
    if len(labels) < 2:
        raise ValueError("calibrating the union needs at least two clean samples")
    spec = _agreement_columns(tuple(members), agreements)
    if weights is not None:
        if len(weights) != len(members) + len(spec):
            raise ValueError(f"{len(weights)} weights for {len(members)} members and {len(spec)} agreement columns")
        weights = scale_weights(weights)
    standardiser, z, refs, betas = _fit(raw, labels, num_classes, members)
    loo, fitted = _loo_union(z, betas, weights, spec)
    boundary, fell_back = _boundary(loo, labels, num_classes, target_fpr, per_class, paper_k)
    union_ref = np.sort(loo)
    cv = (cross_validated_fpr(raw, labels, num_classes, members, target_fpr, per_class, folds, weights, agreements)
          if folds is not None else [])
    return UnionCalibration(
        members=tuple(members), num_classes=num_classes, target_fpr=target_fpr, standardiser=standardiser,
        references=np.stack(refs), betas=np.asarray(betas), union_reference=union_ref,
        union_beta=tail_scale(union_ref), knots=tuple(Knots.of(r) for r in refs), union_knots=Knots.of(union_ref),
        boundary=boundary, fell_back=fell_back, cv_fpr=cv, weights=weights, agreements=fitted,
    )

