"""The pure maths: boundary at a target FPR, per-class fallback, p-values, fusion, the gate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.augment import authentic_mask
from training.calibration import (
    conformal_p_values,
    fit_boundary,
    flagged,
    min_class_count,
    paper_boundary,
    threshold_at_fpr,
)
from training.fusion import FusionParams, Standardiser, combined_score


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_threshold_flags_the_target_share_of_clean_scores(target: float) -> None:
    rng = np.random.default_rng(0)
    calibration, fresh = rng.normal(size=5000), rng.normal(size=200_000)
    t = threshold_at_fpr(calibration, target)
    assert np.mean(calibration < t) <= target
    assert np.mean(calibration < t) >= target - 1.0 / len(calibration)
    assert abs(np.mean(fresh < t) - target) < 0.25 * target + 0.002  # generalises to new clean data


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.integers(-10**6, 10**6), min_size=2, max_size=300, unique=True),
    target=st.floats(0.001, 0.5),
)
def test_threshold_never_exceeds_target_on_calibration(scores: list[int], target: float) -> None:
    s = np.asarray(scores) / 1000.0
    t = threshold_at_fpr(s, target)
    assert np.sum(s < t) == int(np.floor(target * len(s)))
    assert not np.any(s == t)  # sits in a gap, so float rounding cannot flip a calibration verdict


def test_per_class_boundary_adapts_to_shifted_classes_and_falls_back_when_small() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [2000, 2000, 10])
    scores = rng.normal(size=len(labels)) + np.where(labels == 1, 5.0, 0.0)
    boundary, fell_back = fit_boundary(scores, labels, 3, target_fpr=0.01, per_class=True)
    assert fell_back == [2] and len(labels[labels == 2]) < min_class_count(0.01)
    assert boundary.per_class[2] == boundary.global_
    for c in (0, 1):
        assert np.mean(scores[labels == c] < boundary.per_class[c]) <= 0.01
    assert boundary.per_class[1] > boundary.per_class[0] + 3.0
    # a global boundary lets class 1's low tail through and over-flags class 0's
    glob, _ = fit_boundary(scores, labels, 3, target_fpr=0.01, per_class=False)
    assert glob.per_class is None
    assert np.mean(flagged(scores, labels, glob)[labels == 1]) == 0.0
    assert boundary.paper_mean_k_std == pytest.approx(paper_boundary(scores, 1.0))


def test_conformal_p_values_are_uniform_on_clean_and_small_on_outliers() -> None:
    rng = np.random.default_rng(2)
    reference = np.sort(rng.normal(size=999))
    p_clean = conformal_p_values(rng.normal(size=20000), reference)
    assert abs(np.mean(p_clean <= 0.05) - 0.05) < 0.01
    assert np.all(conformal_p_values(np.array([-10.0]), reference) == pytest.approx(1 / 1000))


def test_fused_score_flags_a_sample_when_either_signal_is_abnormal() -> None:
    rng = np.random.default_rng(3)
    critic, log_p = rng.normal(5.0, 2.0, 500), np.log(rng.uniform(0.9, 1.0, 500))
    params = FusionParams.fit(critic, log_p, target_fpr=0.01)
    clean = combined_score(critic, log_p, params, "fused")
    boundary = threshold_at_fpr(clean, 0.01)
    wrong_label = combined_score(np.array([5.0]), np.array([np.log(0.01)]), params, "fused")
    off_manifold = combined_score(np.array([-20.0]), np.array([np.log(0.99)]), params, "fused")
    assert wrong_label[0] < boundary and off_manifold[0] < boundary
    # the plain critic score ignores the label-consistency signal
    assert combined_score(np.array([5.0]), np.array([np.log(0.01)]), params, "critic")[0] > boundary
    with pytest.raises(ValueError, match="critic"):
        combined_score(critic, log_p, params, "knn")


def test_fusion_shares_the_fpr_budget_when_one_signal_has_a_heavy_clean_tail() -> None:
    """log p(label | image) is heavy-tailed on clean data (ambiguous images). With z-scores the
    1 % boundary on min(z, z) sat where only that signal could reach it, so an off-manifold image
    that the critic alone ranks below 99.9 % of clean data went through. Scales matched at the
    target quantile must let the critic flag it, without losing the wrong label."""
    rng = np.random.default_rng(4)
    critic = rng.normal(0.0, 1.0, 2000)
    log_p = np.log(rng.uniform(0.95, 1.0, 2000))
    tail = rng.random(2000) < 0.03
    log_p[tail] = np.log(rng.uniform(1e-4, 0.5, tail.sum()))
    off_manifold = (np.array([-3.5]), np.array([np.log(0.99)]))
    wrong_label = (np.array([0.0]), np.array([np.log(1e-3)]))

    def flags(params: FusionParams) -> tuple[bool, bool]:
        boundary = threshold_at_fpr(combined_score(critic, log_p, params, "fused"), 0.01)
        return (combined_score(*off_manifold, params, "fused")[0] < boundary,
                combined_score(*wrong_label, params, "fused")[0] < boundary)

    assert flags(FusionParams.fit(critic, log_p, target_fpr=0.01)) == (True, True)
    z_scores = FusionParams(critic=Standardiser(mean=critic.mean(), std=critic.std()),
                            auth=Standardiser(mean=log_p.mean(), std=log_p.std()))
    assert flags(z_scores) == (False, True)  # the failure this scaling fixes


def test_fusion_scale_stays_finite_at_a_target_fpr_near_one_half() -> None:
    """The target quantile of a symmetric signal at FPR 0.5 is its median: a zero scale would
    blow the scores up to 1e6 and break float32 parity of the exported graph."""
    rng = np.random.default_rng(5)
    params = FusionParams.fit(rng.normal(0.0, 1.0, 1000), np.log(rng.uniform(0.5, 1.0, 1000)), 0.5)
    assert 0.5 < params.critic.std < 1.0  # the 25 % quantile of N(0, 1) is 0.67 below its median
    assert params.auth.std > 0.05


def test_authenticator_gate_keeps_exactly_the_samples_at_or_above_threshold() -> None:
    p = np.array([0.05, 0.5, 0.899, 0.9, 0.95, 1.0])
    kept = authentic_mask(np.log(p), 0.9)
    np.testing.assert_array_equal(kept, [False, False, False, True, True, True])
