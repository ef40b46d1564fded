"""Detection metrics with the poison as the positive class.

The released De-Pois code reports precision/recall with the *clean* class as positive, which
looks good whenever most of the stream is clean; here a true positive is a poison that was
flagged, so precision and recall say how well poisons are caught and how much clean data is
lost along the way. Scores follow the contract: higher = more trustworthy, so a poison should
score low. Pure numpy: the runtime's dashboards and the tests can use it without torch.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel


class DetectionMetrics(BaseModel):
    """One detector on one stream. ``auroc`` and ``tpr_at_fpr`` rank by score (threshold-free);
    the rest judge the detector's own deployed boundary (``flagged``)."""

    precision: float
    recall: float
    f1: float
    clean_fpr: float
    auroc: float
    tpr_at_fpr: float
    fpr_budget: float
    flagged: int
    poisons: int
    n: int


def _safe_div(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def precision_recall_f1(is_poison: np.ndarray, flagged: np.ndarray) -> tuple[float, float, float]:
    """Poison-as-positive precision, recall and F1; 0 where undefined (nothing flagged / no poison)."""
    is_poison, flagged = np.asarray(is_poison, bool), np.asarray(flagged, bool)
    tp = float(np.sum(is_poison & flagged))
    precision = _safe_div(tp, flagged.sum())
    recall = _safe_div(tp, is_poison.sum())
    return precision, recall, _safe_div(2 * precision * recall, precision + recall)


def clean_fpr(is_poison: np.ndarray, flagged: np.ndarray) -> float:
    """Share of clean samples the detector throws away."""
    is_poison, flagged = np.asarray(is_poison, bool), np.asarray(flagged, bool)
    return _safe_div(np.sum(~is_poison & flagged), np.sum(~is_poison))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what Mann-Whitney needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(is_poison: np.ndarray, scores: np.ndarray) -> float:
    """P(a random poison scores below a random clean sample), ties counted half.

    Computed as the Mann-Whitney U statistic of the suspicion (-score); NaN when the stream
    has only one class, since no ranking can be judged then.
    """
    is_poison = np.asarray(is_poison, bool)
    n_pos, n_neg = int(is_poison.sum()), int((~is_poison).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(-np.asarray(scores, dtype=np.float64))
    u = ranks[is_poison].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def tpr_at_fpr(is_poison: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    """Recall of the best threshold that flags at most ``fpr`` of the clean samples.

    Flag ``score < t`` with ``t`` the (floor(fpr * n_clean) + 1)-th lowest clean score: at most
    floor(fpr * n_clean) clean samples fall strictly below it, and ties at ``t`` are never
    flagged, so a detector cannot buy recall with tied scores.
    """
    is_poison = np.asarray(is_poison, bool)
    scores = np.asarray(scores, dtype=np.float64)
    clean = np.sort(scores[~is_poison])
    if clean.size == 0 or not is_poison.any():
        return float("nan")
    k = int(np.floor(fpr * clean.size))
    if k >= clean.size:
        return 1.0
    return float(np.mean(scores[is_poison] < clean[k]))


def roc_curve(is_poison: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) when flagging ``score <= t`` for every distinct score ``t``, from (0, 0) to (1, 1)."""
    is_poison = np.asarray(is_poison, bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], is_poison[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    return fpr, tpr


def detection_metrics(
    is_poison: np.ndarray, scores: np.ndarray, flagged: np.ndarray, fpr_budget: float = 0.01
) -> DetectionMetrics:
    """All metrics of one detector on one stream."""
    is_poison, flagged = np.asarray(is_poison, bool), np.asarray(flagged, bool)
    precision, recall, f1 = precision_recall_f1(is_poison, flagged)
    return DetectionMetrics(
        precision=precision,
        recall=recall,
        f1=f1,
        clean_fpr=clean_fpr(is_poison, flagged),
        auroc=auroc(is_poison, scores),
        tpr_at_fpr=tpr_at_fpr(is_poison, scores, fpr_budget),
        fpr_budget=fpr_budget,
        flagged=int(flagged.sum()),
        poisons=int(is_poison.sum()),
        n=int(is_poison.size),
    )
