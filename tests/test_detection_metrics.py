"""Detection metrics against cases small enough to work out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.detection_metrics import (
    auroc,
    clean_fpr,
    detection_metrics,
    precision_recall_f1,
    roc_curve,
    tpr_at_fpr,
)

# Five clean, three poisons; scores: higher = more trustworthy.
IS_POISON = np.array([0, 0, 0, 0, 0, 1, 1, 1], dtype=bool)
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.3, 0.75])
FLAGGED = SCORES < 0.5  # flags clean 0.2 and poisons 0.1, 0.3


def test_poison_is_the_positive_class() -> None:
    precision, recall, f1 = precision_recall_f1(IS_POISON, FLAGGED)
    assert precision == pytest.approx(2 / 3)  # 2 of 3 flagged are poisons
    assert recall == pytest.approx(2 / 3)  # 2 of 3 poisons flagged
    assert f1 == pytest.approx(2 / 3)
    assert clean_fpr(IS_POISON, FLAGGED) == pytest.approx(1 / 5)


def test_nothing_flagged_gives_zero_not_nan() -> None:
    assert precision_recall_f1(IS_POISON, np.zeros(8, bool)) == (0.0, 0.0, 0.0)


def test_auroc_counts_pairs_and_half_ties() -> None:
    # Pairs (poison, clean) where the poison scores lower: 0.1 beats 5, 0.3 beats 4 of 5
    # (not 0.2), 0.75 beats only 0.9 and 0.8 -> 11 of 15.
    assert auroc(IS_POISON, SCORES) == pytest.approx(11 / 15)
    tied = np.array([0.5, 0.5, 0.5, 0.5])
    assert auroc(np.array([0, 0, 1, 1], bool), tied) == pytest.approx(0.5)
    assert math.isnan(auroc(np.zeros(4, bool), tied))


def test_auroc_perfect_and_inverted() -> None:
    y = np.array([1, 1, 0, 0], bool)
    assert auroc(y, np.array([0.0, 0.1, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.8, 0.9, 0.0, 0.1])) == 0.0


def test_tpr_at_fpr_uses_the_clean_quantile() -> None:
    # 5 clean: floor(0.2 * 5) = 1 clean may be flagged -> threshold is the 2nd lowest clean
    # score (0.6): poisons 0.1 and 0.3 fall below it, 0.75 does not.
    assert tpr_at_fpr(IS_POISON, SCORES, fpr=0.2) == pytest.approx(2 / 3)
    # 1 % of 5 clean is 0 clean: threshold = lowest clean (0.2), only the 0.1 poison is below.
    assert tpr_at_fpr(IS_POISON, SCORES, fpr=0.01) == pytest.approx(1 / 3)


def test_tied_scores_buy_no_recall() -> None:
    y = np.array([0] * 10 + [1] * 5, bool)
    flat = np.zeros(15)
    assert tpr_at_fpr(y, flat, fpr=0.1) == 0.0


def test_roc_curve_ends_at_corners_and_matches_auroc() -> None:
    fpr, tpr = roc_curve(IS_POISON, SCORES)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(IS_POISON, SCORES))


def test_detection_metrics_bundles_all() -> None:
    m = detection_metrics(IS_POISON, SCORES, FLAGGED, fpr_budget=0.2)
    assert (m.flagged, m.poisons, m.n) == (3, 3, 8)
    assert m.auroc == pytest.approx(11 / 15) and m.tpr_at_fpr == pytest.approx(2 / 3)
