"""The detectors a user would pick instead of De-Pois, fitted on the same trusted pool.

Every detector (ours included) is reduced to a ``Scorer``: a score (higher = more trustworthy)
and a flag rule. All of them learn from the detector's ``trusted`` part and set their boundary
on its ``calibration`` part at the same target FPR, so a difference in the tables is a
difference of method, not of data or operating point. The two exceptions follow their authors:
cleanlab flags with confident learning's own per-class thresholds computed on the stream, and
the paper's boundary is mean - 1 * std of the clean critic scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.neighbors import NearestNeighbors

from training.calibration import paper_boundary, threshold_at_fpr
from training.data import LabeledImages
from training.detector import FittedDetector
from training.downstream import ClassifierConfig, predict_proba, train_classifier

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
FlagFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Role = Literal["ours", "baseline", "ablation"]


@dataclass(frozen=True)
class Scorer:
    """A fitted detector as the evaluation sees it. ``flag(images, labels, scores)`` -> poisoned."""

    name: str
    role: Role
    score: ScoreFn
    flag: FlagFn


def below(threshold: float) -> FlagFn:
    return lambda images, labels, scores: scores < threshold


def calibrated(name: str, role: Role, score: ScoreFn, calibration: LabeledImages, target_fpr: float) -> Scorer:
    """A scorer whose boundary flags at most ``target_fpr`` of the clean calibration part."""
    threshold = threshold_at_fpr(score(calibration.images, calibration.labels), target_fpr)
    return Scorer(name, role, score, below(threshold))


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)


def label_probability(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return proba[np.arange(len(labels)), labels]


def class_distances(trusted: LabeledImages, num_classes: int, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """[N, K] mean distance from each image to its k nearest trusted images of each class."""
    index = [NearestNeighbors(n_neighbors=k).fit(_flat(trusted.images[trusted.labels == c]))
             for c in range(num_classes)]
    return lambda images: np.stack([nn.kneighbors(_flat(images))[0].mean(axis=1) for nn in index], axis=1)


def knn_agreement(
    trusted: LabeledImages, calibration: LabeledImages, num_classes: int, target_fpr: float, k: int = 10
) -> Scorer:
    """How much closer the sample sits to trusted images of its label than to any other class.

    d_other / (d_same + d_other) with d = mean distance to the k nearest trusted images of a
    class: 0.5 is the class border. A vote count over k neighbours would do the same job but is
    discrete, and on Fashion-MNIST more than 1 % of clean images get zero votes, which makes the
    TPR at 1 % FPR of a vote count zero by ties alone.
    """
    distances = class_distances(trusted, num_classes, k)

    def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        d = distances(images)
        same = d[np.arange(len(labels)), labels]
        d[np.arange(len(labels)), labels] = np.inf
        other = d.min(axis=1)
        return other / np.maximum(same + other, 1e-12)

    return calibrated(f"knn-{k}", "baseline", score, calibration, target_fpr)


def trusted_classifier_proba(
    trusted: LabeledImages, num_classes: int, seed: int, config: ClassifierConfig
) -> Callable[[np.ndarray], np.ndarray]:
    """p(class | image) of an MLP trained on the trusted part only (shared by two baselines)."""
    model = train_classifier(trusted.images, trusted.labels, num_classes, seed, config)
    return lambda images: predict_proba(model, images)


def classifier_likelihood(
    proba: Callable[[np.ndarray], np.ndarray], calibration: LabeledImages, target_fpr: float
) -> Scorer:
    """log p(label | image) of the trusted classifier: the obvious label-consistency check."""

    def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.log(np.clip(label_probability(proba(images), labels), 1e-12, None))

    return calibrated("trusted-clf", "baseline", score, calibration, target_fpr)


def confident_learning(proba: Callable[[np.ndarray], np.ndarray]) -> Scorer | None:
    """cleanlab's confident learning on the trusted classifier's out-of-sample probabilities.

    None when cleanlab is not installed (it is an optional extra). Scores are cleanlab's
    normalised margin; flags come from ``find_label_issues``, whose per-class thresholds are
    estimated on the stream itself, as confident learning prescribes.
    """
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        return None

    def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return get_label_quality_scores(labels, proba(images), method="normalized_margin")

    def flag(images: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return find_label_issues(labels, proba(images))

    return Scorer("cleanlab", "baseline", score, flag)


def paper_critic(det: FittedDetector, k: float = 1.0) -> Scorer:
    """The original De-Pois detector: plain critic score, boundary mean - k * std on clean data."""
    threshold = paper_boundary(det.critic_score(det.calibration.images, det.calibration.labels), k)
    return Scorer("paper-critic", "baseline", det.critic_score, below(threshold))


def depois_fused(det: FittedDetector) -> Scorer:
    """Ours: the fused score with the exported (per-class, target-FPR) boundary."""
    return Scorer(
        "depois-fused", "ours",
        lambda images, labels: det.score(images, labels, kind="fused"),
        lambda images, labels, scores: det.predict(images, labels),
    )


def authenticator_only(det: FittedDetector, target_fpr: float) -> Scorer:
    """Ablation: the authenticator's log p(label | image) alone, i.e. the fused score minus the critic."""
    return calibrated("authenticator", "ablation", det.log_p_label, det.calibration, target_fpr)


def all_scorers(det: FittedDetector, num_classes: int, seed: int, classifier: ClassifierConfig) -> list[Scorer]:
    """Ours, every baseline (cleanlab when installed) and the ablation, in table order."""
    target_fpr = det.metadata.target_fpr
    proba = trusted_classifier_proba(det.trusted, num_classes, seed, classifier)
    scorers = [
        depois_fused(det),
        paper_critic(det),
        knn_agreement(det.trusted, det.calibration, num_classes, target_fpr),
        classifier_likelihood(proba, det.calibration, target_fpr),
        confident_learning(proba),
        authenticator_only(det, target_fpr),
    ]
    return [s for s in scorers if s is not None]
