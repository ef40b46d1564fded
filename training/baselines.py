"""The detectors a user would pick instead of De-Pois, fitted on the same trusted pool.

Every detector (ours included) is reduced to a ``Baseline``: a score (higher = more trustworthy)
and a flag rule. All of them use the detector's trusted pool and its calibration plan
(``training.crossfit.CalibrationPlan``): the deployed baseline learns from the *whole* trusted
pool (as a user would fit it; the union ships a model trained on the plan's training part only,
so the comparison errs in the baselines' favour), and its boundary is read at the same target
FPR off *out-of-sample* scores of the same calibration samples (one model per fold), so a
difference in the tables is a difference of method, not of data or operating point. The two exceptions follow their
authors: cleanlab flags with confident learning's own per-class thresholds computed on the stream,
and the paper's boundary is mean - 1 * std of the clean critic scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from training.calibration import paper_boundary, threshold_at_fpr
from training.crossfit import CalibrationPlan
from training.data import LabeledImages
from training.detector import FittedDetector
from training.downstream import ClassifierConfig, predict_proba, train_classifier
from training.eval_schema import OURS
from training.evidence import MEMBERS
from training.fusion import FusionParams, combined_score

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
FlagFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Recipe = Callable[[LabeledImages], ScoreFn]  # trusted data -> fitted score function
Role = Literal["ours", "baseline", "previous", "ablation"]



@dataclass(frozen=True)
class Baseline:
    """A fitted detector as the evaluation sees it. ``flag(images, labels, scores)`` -> poisoned."""

    name: str
    role: Role
    score: ScoreFn
    flag: FlagFn


def below(threshold: float) -> FlagFn:
    return lambda images, labels, scores: scores < threshold


def out_of_sample_scores(recipe: Recipe, plan: CalibrationPlan) -> np.ndarray:
    """Scores of the plan's calibration samples, each by a model that did not train on it."""
    cal_idx = np.flatnonzero(plan.calibration_mask)
    out = np.empty(len(plan.pool), np.float64)
    for f in plan.fold_ids:
        train_part, held_out = plan.fold_split(f)
        out[plan.folds == f] = recipe(train_part)(held_out.images, held_out.labels)
    return out[cal_idx]


def calibrated(name: str, role: Role, recipe: Recipe, plan: CalibrationPlan, target_fpr: float) -> Baseline:
    """Deploy ``recipe`` on the whole trusted pool, boundary at ``target_fpr`` of the
    out-of-sample calibration scores."""
    threshold = threshold_at_fpr(out_of_sample_scores(recipe, plan), target_fpr)
    return Baseline(name, role, recipe(plan.pool), below(threshold))


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32)


class LastCall:
    """Remembers the result of the last call for the same argument objects.

    The evaluation scores one stream with every detector in turn; the four pixel kNN baselines
    share one distance matrix and the union's ablations share one pass of the networks, which is
    the difference between minutes and an hour on Fashion-MNIST."""

    def __init__(self, fn: Callable[..., np.ndarray]):
        self.fn, self.key, self.value = fn, None, None

    def __call__(self, *args: np.ndarray) -> np.ndarray:
        key = tuple((id(a), a.shape) for a in args)
        if key != self.key:
            self.key, self.value = None, self.fn(*args)
            self.key = key
        return self.value


def _pixel_distances(reference: np.ndarray, images: np.ndarray) -> np.ndarray:
    a, b = _flat(images), _flat(reference)
    sq = (a.astype(np.float64) ** 2).sum(1)[:, None] + (b.astype(np.float64) ** 2).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0))


pixel_distances = LastCall(_pixel_distances)
pixel_distances.__doc__ = "[N, M] Euclidean pixel distances (one BLAS product), cached for the last arguments."


def knn_vote(k: int) -> Recipe:
    """Share of the k nearest trusted images (pixels) that carry the sample's label."""

    def recipe(trusted: LabeledImages) -> ScoreFn:
        kk = min(k, len(trusted))

        def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
            nearest = np.argsort(pixel_distances(trusted.images, images), axis=1, kind="stable")[:, :kk]
            return (trusted.labels[nearest] == labels[:, None]).mean(axis=1)

        return score

    return recipe


def knn_ratio(k: int, num_classes: int) -> Recipe:
    """d_other / (d_same + d_other), d = mean pixel distance to the k nearest trusted images of a
    class: 0.5 is the class border; continuous where a vote ties."""

    def recipe(trusted: LabeledImages) -> ScoreFn:
        def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
            d = pixel_distances(trusted.images, images)
            per = []
            for c in range(num_classes):
                own = d[:, trusted.labels == c]
                kk = min(k, own.shape[1])
                per.append(np.sort(own, axis=1)[:, :kk].mean(axis=1) if kk else np.full(len(d), np.inf))
            dc = np.stack(per, axis=1)
            rows = np.arange(len(labels))
            same = dc[rows, labels]
            dc[rows, labels] = np.inf
            other = dc.min(axis=1)
            return other / np.maximum(same + other, 1e-12)

        return score

    return recipe


def label_log_proba(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-12, None))


def logistic_regression(seed: int) -> Recipe:
    """log p(label | image) of a multinomial logistic regression on pixels (sklearn, C = 1)."""

    def recipe(trusted: LabeledImages) -> ScoreFn:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=1.0, max_iter=300, random_state=seed)
        model.fit(_flat(trusted.images), trusted.labels)
        classes = list(model.classes_)

        def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
            proba = np.zeros((len(labels), max(int(labels.max(initial=0)) + 1, max(classes) + 1)))
            proba[:, classes] = model.predict_proba(_flat(images))
            return label_log_proba(proba, labels)

        return score

    return recipe


def pixel_mahalanobis(num_classes: int) -> Recipe:
    """-(x - mu_y)^T P (x - mu_y) on raw pixels, class means, Ledoit-Wolf tied covariance."""

    def recipe(trusted: LabeledImages) -> ScoreFn:
        from sklearn.covariance import ledoit_wolf

        x = _flat(trusted.images).astype(np.float64)
        means = np.stack([x[trusted.labels == c].mean(axis=0) for c in range(num_classes)])
        cov, _ = ledoit_wolf(x - means[trusted.labels], assume_centered=True)
        precision = np.linalg.inv(cov)

        def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
            diff = _flat(images).astype(np.float64) - means[labels]
            return -np.einsum("nd,de,ne->n", diff, precision, diff)

        return score

    return recipe


def trusted_classifier(num_classes: int, seed: int, config: ClassifierConfig) -> Recipe:
    """log p(label | image) of an MLP trained on the trusted data only."""

    def recipe(trusted: LabeledImages) -> ScoreFn:
        model = train_classifier(trusted.images, trusted.labels, num_classes, seed, config)
        return lambda images, labels: label_log_proba(predict_proba(model, images), labels)

    return recipe


def confident_learning(plan: CalibrationPlan, num_classes: int, seed: int, config: ClassifierConfig) -> Baseline | None:
    """cleanlab's confident learning on the trusted MLP's probabilities.

    None when cleanlab is not installed (it is an optional extra). Scores are cleanlab's
    normalised margin; flags come from ``find_label_issues``, whose per-class thresholds are
    estimated on the stream itself, as confident learning prescribes.
    """
    functions = _cleanlab()
    if functions is None:
        return None
    find_label_issues, get_label_quality_scores = functions
    model = train_classifier(plan.pool.images, plan.pool.labels, num_classes, seed, config)

    def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return get_label_quality_scores(labels, predict_proba(model, images), method="normalized_margin")

    def flag(images: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # n_jobs=1: cleanlab otherwise forks a pool on Linux, and a fork of this multi-threaded
        # process (torch's threads, a Kafka client's) can deadlock in the child; cleanlab's
        # results do not depend on n_jobs
        return find_label_issues(labels, predict_proba(model, images), n_jobs=1)

    return Baseline("cleanlab", "baseline", score, flag)


def paper_critic(det: FittedDetector) -> Baseline:
    """The original De-Pois detector: plain critic score, boundary mean - k * std of its clean
    out-of-sample calibration scores."""
    threshold = paper_boundary(det.calibration_raw[:, MEMBERS.index("critic")], det.config.paper_k)
    return Baseline("paper-critic", "baseline", det.critic_score, below(threshold))


def depois_union(det: FittedDetector, evidence: LastCall) -> Baseline:
    """Ours: the calibrated union with the exported boundary."""
    cols = [MEMBERS.index(m) for m in det.members]
    return Baseline(OURS, "ours", lambda images, labels: det.union.score(evidence(images, labels)[:, cols], labels),
                    lambda images, labels, scores: det.union.flagged(scores, labels))


def previous_fused(det: FittedDetector) -> Baseline | None:
    """The detector this one replaces: min of the critic and log p(label|x), each scaled at its
    clean target-FPR quantile (``training.fusion``), calibrated on the same out-of-sample scores."""
    if det.calibration_log_p is None:
        return None
    critic = det.calibration_raw[:, MEMBERS.index("critic")]
    fusion = FusionParams.fit(critic, det.calibration_log_p, det.metadata.target_fpr)
    threshold = threshold_at_fpr(combined_score(critic, det.calibration_log_p, fusion, "fused"),
                                 det.metadata.target_fpr)

    def score(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return combined_score(det.critic_score(images, labels), det.log_p_label(images, labels), fusion, "fused")

    return Baseline("previous-fused", "previous", score, below(threshold))


def ablations(det: FittedDetector, evidence: LastCall) -> list[Baseline]:
    """Each member alone, the union without each member and (where it has agreement columns) the
    union without them, calibrated exactly like the union."""
    members = det.members
    variants: list[tuple[str, tuple[str, ...]]] = [(f"only-{m}", (m,)) for m in members]
    if len(members) > 2:
        variants += [(f"without-{m}", tuple(x for x in members if x != m)) for m in members]
    agreements = bool(det.agreements(members))
    out = []
    target, per_class = det.metadata.target_fpr, det.metadata.boundary.per_class is not None
    for name, subset in variants + ([("without-agreements", members)] if agreements else []):
        union = det.calibrate(subset, target, per_class, with_agreements=name != "without-agreements")
        cols = [MEMBERS.index(m) for m in subset]

        def score(images: np.ndarray, labels: np.ndarray, union=union, cols=cols) -> np.ndarray:
            return union.score(evidence(images, labels)[:, cols], labels)

        out.append(Baseline(name, "ablation", score,
                            lambda images, labels, scores, union=union: union.flagged(scores, labels)))
    return out


def left_out_baselines() -> list[str]:
    """The baselines this environment cannot run, each with what brings it back.

    A comparison that silently lacks a baseline reads as if it had beaten it: the report and
    the console name every baseline left out.
    """
    if _cleanlab() is None:
        return ["cleanlab (confident learning): not installed or not importable; "
                "pip install -e '.[eval]'"]
    return []


def _cleanlab() -> tuple[Callable, Callable] | None:
    """cleanlab's two functions the baseline uses, or None where they cannot be imported."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        return None
    return find_label_issues, get_label_quality_scores


def all_detectors(det: FittedDetector, seed: int, classifier: ClassifierConfig,
                  with_ablations: bool = True) -> list[Baseline]:
    """Ours, the previous fused detector, every baseline (cleanlab when installed) and the
    ablations, in table order."""
    k, plan, target = det.metadata.num_classes, det.plan, det.metadata.target_fpr
    evidence = LastCall(det.raw_evidence)
    detectors: list[Baseline | None] = [
        depois_union(det, evidence),
        previous_fused(det),
        paper_critic(det),
        calibrated("knn-vote-5", "baseline", knn_vote(5), plan, target),
        calibrated("knn-vote-10", "baseline", knn_vote(10), plan, target),
        calibrated("knn-ratio-5", "baseline", knn_ratio(5, k), plan, target),
        calibrated("knn-ratio-10", "baseline", knn_ratio(10, k), plan, target),
        calibrated("logreg", "baseline", logistic_regression(seed), plan, target),
        calibrated("mahalanobis-pixels", "baseline", pixel_mahalanobis(k), plan, target),
        calibrated("trusted-clf", "baseline", trusted_classifier(k, seed, classifier), plan, target),
        confident_learning(plan, k, seed, classifier),
    ]
    if with_ablations:
        detectors += ablations(det, evidence)
    return [d for d in detectors if d is not None]
