"""Continuous conformal p-values, their weighted min-p union, and its calibration (pure numpy).

Why continuous: the plain conformal p-value ``(1 + #{reference <= s}) / (n + 1)`` stops at
``1 / (n + 1)``. With the 252 trusted digits that is 0.004, and a union of five members needs
p-values below that (its threshold is near ``target_fpr / 5``); every poison beyond the most
extreme clean reference score would also tie with it, so a ranking (and TPR at a fixed FPR)
could not tell them apart. Here the p-value is interpolated linearly between neighbouring
reference scores and, below the smallest one, continued by an exponential tail whose scale is
read off the lowest 5 % of the reference:

    c = #{r_i <= s}
    p(s) = exp((s - r_(1)) / beta) / (n + 1)              if c = 0   (beyond every clean score)
         = (c + (s - r_(c)) / (r_(c+1) - r_(c))) / (n + 1)  if 0 < c < n
         = n / (n + 1)                                       if c = n
    beta = (r_(m) - r_(1)) / ln m,   m = max(2, ceil(0.05 n))

so p is continuous, non-decreasing, and equals the rank-based p-value at every reference score.
The tail scale makes the exponential pass through the (1, 1/(n+1)) and (m, m/(n+1)) points of
the empirical distribution, i.e. it is the exponential tail that the lowest 5 % of clean scores
already follow. Everything works in log space, so a p-value of 1e-300 is still a number.

Calibration points get *leave-one-out* p-values (their own score removed from the reference),
which is what a new clean sample sees: without it the smallest calibration score would have
p = 1/(n+1) exactly, no calibration sample could fall below that, while new clean samples can,
and a boundary read off the calibration p-values would be too permissive.

The union of members is the minimum of their p-values (Bonferroni's statistic, valid under any
dependence), each p-value first divided by its member's weight (weighted Bonferroni: the weights
sum to the number of members and say how the false-alarm budget is shared); its boundary is then
calibrated on the leave-one-out union statistic of the clean
calibration samples, which spends the false-positive budget as the members' actual dependence
allows instead of Bonferroni's worst case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TAIL_SHARE = 0.05
MIN_BETA = 1e-6


def tail_scale(reference_sorted: np.ndarray) -> float:
    """Scale of the exponential lower tail fitted through the lowest ``TAIL_SHARE`` of the
    reference (see the module docstring); at least ``MIN_BETA`` so ties cannot make it zero."""
    r = np.asarray(reference_sorted, dtype=np.float64)
    if r.size < 2:
        raise ValueError("a p-value reference needs at least two scores")
    m = max(2, math.ceil(TAIL_SHARE * r.size))
    return max(float(r[m - 1] - r[0]) / math.log(m), MIN_BETA)


def upper_counts(reference_sorted: np.ndarray) -> np.ndarray:
    """``#{r <= r_(i)}`` for every position i of a sorted reference (differs from i + 1 at ties)."""
    ref = np.asarray(reference_sorted, dtype=np.float64)
    return np.searchsorted(ref, ref, side="right").astype(np.float64)


def _log_p(scores: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, upper_hi: np.ndarray,
           first: np.ndarray, beta: float, size: int) -> np.ndarray:
    """The formula of the module docstring, given for each score: ``counts`` = #{r <= s}, the
    neighbouring reference values ``lo`` <= s < ``hi``, ``upper_hi`` = #{r <= hi} and the smallest
    reference value ``first``.

    Interpolating from ``counts`` up to ``upper_hi`` (rather than to counts + 1) keeps p continuous
    where the reference has ties: at a tied value the count jumps by the size of the tie."""
    frac = np.clip((scores - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    inner = np.log(np.maximum(counts + frac * (upper_hi - counts), 1.0) / (size + 1.0))
    tail = np.minimum((scores - first) / beta - math.log(size + 1.0), -math.log(size + 1.0))
    top = math.log(size / (size + 1.0))
    return np.where(counts == 0, tail, np.where(counts >= size, top, inner))


MAX_KNOTS = 128
DENSE_KNOTS = 96


@dataclass(frozen=True)
class Knots:
    """A p-value reference kept at chosen ranks: every order statistic up to ``DENSE_KNOTS`` (the
    tail, where boundaries live: p up to 4 % of 2,400 Fashion-MNIST scores, 38 % of 252 digits),
    then evenly spaced ranks up to the largest, at most ``MAX_KNOTS`` in all.

    Why: the exported graph counts ``reference <= score`` for every member and sample; with
    2,400 references that count was the single most expensive operator of the graph (a fifth of
    its time, measured). Between knots p is interpolated linearly in the score, so above the
    dense part it is a piecewise-linear approximation of the rank interpolation; in the dense
    part, and for references of at most ``MAX_KNOTS`` scores, it is exact. Boundaries sit far
    below the dense part's top (the union's at ~target / 3: a member's p-value there is < 1 %, and
    per-class boundaries at 1 % of a class sit at member p-values below that)."""

    values: np.ndarray  # float64 [K]: reference scores at the knot ranks, sorted
    counts: np.ndarray  # float64 [K]: #{r <= value} in the full reference (ties counted)
    n: int  # size of the full reference

    @classmethod
    def of(cls, reference_sorted: np.ndarray, max_knots: int | None = MAX_KNOTS, dense: int = DENSE_KNOTS) -> Knots:
        ref = np.asarray(reference_sorted, dtype=np.float64)
        n = ref.size
        if max_knots is None or n <= max_knots:
            ranks = np.arange(n)
        else:
            dense = min(dense, max_knots - 2)
            ranks = np.unique(np.concatenate([np.arange(dense),
                                              np.round(np.linspace(dense, n - 1, max_knots - dense)).astype(int)]))
        return cls(ref[ranks], upper_counts(ref)[ranks], n)


def log_p_knots(scores: np.ndarray, knots: Knots, beta: float) -> np.ndarray:
    """log p(s) against a (possibly compressed) reference: the formula of the module docstring
    with the count at the largest knot <= s and the next knot as neighbours."""
    values, counts, n = knots.values, knots.counts, knots.n
    s = np.asarray(scores, dtype=np.float64)
    k = values.size
    idx = np.searchsorted(values, s, side="right")
    lo_pos, hi_pos = np.clip(idx - 1, 0, k - 1), np.clip(idx, 0, k - 1)
    lo, hi = values[lo_pos], values[hi_pos]
    frac = np.clip((s - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    inner = np.log(np.maximum(counts[lo_pos] + frac * (counts[hi_pos] - counts[lo_pos]), 1.0) / (n + 1.0))
    tail = np.minimum((s - values[0]) / beta - math.log(n + 1.0), -math.log(n + 1.0))
    top = math.log(n / (n + 1.0))
    return np.where(idx == 0, tail, np.where(idx >= k, top, inner))


def log_p_values(scores: np.ndarray, reference_sorted: np.ndarray, beta: float) -> np.ndarray:
    """log p(s) of new scores against a full sorted clean reference (float64)."""
    return log_p_knots(scores, Knots.of(reference_sorted, max_knots=None), beta)


def loo_log_p_values(reference: np.ndarray, beta: float) -> np.ndarray:
    """log p of every reference score against the other n - 1 (leave one out), in input order.

    Vectorised: with v a reference value, removing one copy of it from the sorted reference
    leaves ``right(v) - 1`` values <= v, the next larger value unchanged, and as the largest
    value <= v either v itself (if it was tied) or its predecessor."""
    r = np.asarray(reference, dtype=np.float64)
    ref = np.sort(r)
    n = ref.size
    left = np.searchsorted(ref, r, side="left")
    right = np.searchsorted(ref, r, side="right")
    counts = (right - 1).astype(np.float64)
    tied = (right - left) >= 2
    lo = np.where(tied, r, ref[np.clip(left - 1, 0, n - 1)])
    hi_pos = np.clip(right, 0, n - 1)
    upper_hi = upper_counts(ref)[hi_pos] - 1.0
    first = np.where((left == 0) & ~tied, ref[min(1, n - 1)], ref[0])
    return _log_p(r, counts, lo, ref[hi_pos], upper_hi, first, beta, n - 1)


def _weighted(member_log_p: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """``log p_j - log w_j`` per member (plain ``log p_j`` without weights), float64 [N, J]."""
    lp = np.asarray(member_log_p, dtype=np.float64)
    return lp if weights is None else lp - np.log(np.asarray(weights, dtype=np.float64))


def union_log_p(member_log_p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted min-p over members, in log space: ``min_j (log p_j - log w_j)``, [N, J] -> [N].

    With weights summing to J this is the weighted Bonferroni statistic: a member with weight
    ``w_j`` spends ``w_j / J`` of the false-alarm budget. All weights 1 is plain min-p."""
    return np.min(_weighted(member_log_p, weights), axis=1)


def reason(member_log_p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Index of the member that set the union statistic (the one that fired), [N, J] -> [N]."""
    return np.argmin(_weighted(member_log_p, weights), axis=1)


def scale_weights(weights: np.ndarray) -> np.ndarray:
    """Positive weights scaled to sum to their count, which keeps the statistic on the plain
    min-p's scale (an ablation that drops members re-spreads the budget over the ones left).
    Weights that already sum to their count come back unchanged: fit scales them, the detector
    saves them, and loading must rebuild the very same boundary (scaling twice can move the last
    bit)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or np.any(~np.isfinite(w)) or np.any(w <= 0.0):
        raise ValueError(f"member weights must be positive and finite, got {w.tolist()}")
    total = float(w.sum())
    if abs(total - w.size) <= 1e-12 * w.size:
        return w
    return w * (w.size / total)


def member_weights(members: tuple[str, ...], relative: dict[str, float]) -> np.ndarray:
    """Weights of ``members`` for the weighted min-p: ``relative`` gives each member's weight
    before scaling (missing members: 1), ``scale_weights`` scales them."""
    return scale_weights(np.asarray([float(relative.get(m, 1.0)) for m in members], dtype=np.float64))


def fpr_standard_error(target_fpr: float, n: int) -> float:
    """Standard deviation of the realised FPR of a boundary read off ``n`` clean scores
    (binomial approximation); what the ``fit`` warning quotes."""
    return math.sqrt(target_fpr * (1.0 - target_fpr) / max(n, 1))
