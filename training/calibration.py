"""Detection boundaries and conformal p-values from clean calibration scores (pure numpy).

Convention everywhere: a sample is flagged when its score is strictly below the threshold.

Thresholds sit in the gap between two consecutive calibration scores rather than on a score: the
exported ONNX graph and torch compute the same float32 score with different operation orders, and
a threshold equal to a calibration score would let a 1e-7 rounding difference flip that sample's
verdict in the parity check.
"""

from __future__ import annotations

import math

import numpy as np

from depois_stream.contract import Boundary

DEFAULT_PAPER_K = 1.0


def threshold_at_fpr(scores: np.ndarray, target_fpr: float) -> float:
    """Largest gap threshold that flags at most ``floor(target_fpr * n)`` of the clean ``scores``.

    Flagging at most, never more: the achieved calibration FPR is <= target. With few scores
    (n < 1/target_fpr) this is below the minimum, i.e. nothing clean is flagged."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("cannot calibrate a threshold on zero scores")
    if len(s) == 1:
        return float(s[0]) - 1.0
    k = math.floor(target_fpr * len(s))
    below = s[k - 1] if k > 0 else s[0] - (s[1] - s[0])
    return float((below + s[k]) / 2.0)


def min_class_count(target_fpr: float) -> int:
    """Fewest calibration scores a class needs before its own FPR quantile means anything."""
    return math.ceil(1.0 / target_fpr)


def per_class_thresholds(
    scores: np.ndarray, labels: np.ndarray, num_classes: int, target_fpr: float
) -> tuple[list[float], list[int]]:
    """Threshold per class; classes with fewer than ``min_class_count`` scores use the global one.

    Returns the thresholds and the classes that fell back, so the report can say so."""
    global_t = threshold_at_fpr(scores, target_fpr)
    out, fell_back = [], []
    for c in range(num_classes):
        s = scores[labels == c]
        if len(s) < min_class_count(target_fpr):
            out.append(global_t)
            fell_back.append(c)
        else:
            out.append(threshold_at_fpr(s, target_fpr))
    return out, fell_back


def paper_boundary(scores: np.ndarray, k: float = DEFAULT_PAPER_K) -> float:
    """De-Pois' original rule, mean - k * std of clean scores; recorded for comparison only,
    because its FPR depends on the score distribution's shape rather than on a chosen target."""
    s = np.asarray(scores, dtype=np.float64)
    return float(s.mean() - k * s.std())


def fit_boundary(
    scores: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    target_fpr: float,
    per_class: bool,
    paper_k: float = DEFAULT_PAPER_K,
) -> tuple[Boundary, list[int]]:
    """The boundary to export plus the classes whose per-class threshold fell back to global."""
    per, fell_back = (
        per_class_thresholds(scores, labels, num_classes, target_fpr) if per_class else (None, [])
    )
    boundary = Boundary(
        global_=threshold_at_fpr(scores, target_fpr),
        per_class=per,
        paper_mean_k_std=paper_boundary(scores, paper_k),
        paper_k=paper_k,
    )
    return boundary, fell_back


def flagged(scores: np.ndarray, labels: np.ndarray, boundary: Boundary) -> np.ndarray:
    return np.asarray(scores, dtype=np.float32) < boundary.for_labels(labels)


def conformal_p_values(scores: np.ndarray, reference_sorted: np.ndarray) -> np.ndarray:
    """p = (1 + #{clean reference <= s}) / (n + 1): small when s is lower than almost every clean
    score; under exchangeability with the reference, P(p <= a) <= a for a clean sample."""
    ref = np.asarray(reference_sorted, dtype=np.float32)
    counts = np.searchsorted(ref, np.asarray(scores, dtype=np.float32), side="right")
    return ((counts + 1.0) / (len(ref) + 1.0)).astype(np.float32)
