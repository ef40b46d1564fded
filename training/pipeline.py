"""``fit``: the whole offline pipeline from a data set name to a FittedDetector.

Stages (each with its own derived seed, so the run is deterministic on CPU under ``cfg.seed``):

1. trusted pool -> calibration plan (holdout or k-fold cross-fit, ``training/crossfit.py``);
2. one authenticator (and, where ``FitConfig.mlp_margin_joins``, one pixel MLP: the
   ``mlp_margin`` member) per fold, each scoring its held-out fold: out-of-sample margin, kNN,
   Mahalanobis, pixel and MLP-margin scores for every calibration sample; the model of the first fold is
   the one shipped (the holdout's only model, or fold model 0). The other folds train in a
   background process (``training/folds.py``, ``--fold-workers``) while stage 3 runs here (with
   ``--fold-workers 0``, here after stage 3: the numbers are the same either way);
3. authenticated cGAN on the shipped model's training data -> gated synthesis -> WGAN-GP mimic
   model (the critic). Its real data is the synthetic set plus every trusted image that does
   *not* calibrate (the holdout's training part; none under cross-fit), so no trusted image
   whose critic score is in the calibration reference was a training sample of the critic;
4. calibration of the union on the out-of-sample scores (``training/union.py``), with the
   configured split of the false-alarm budget between its columns or, with ``--weight-search``,
   the one chosen on synthetic negatives made from the held-out trusted samples
   (``training/weighting.py``, ``training/negatives.py``).

Only the train split is read; the test split is left for the evaluation.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import torch

from training.augment import synthesize, train_cgan
from training.config import FitConfig, Steps
from training.conformal import fpr_standard_error
from training.crossfit import make_plan
from training.data import LabeledImages, default_synthetic, fit_data
from training.detector import (
    FittedDetector,
    build_metadata,
    member_columns,
    weights_sha256,
)
from training.evidence import MEMBERS, AccuracyGate, neighbours
from training.folds import FoldScores, FoldTask, background_folds, train_fold
from training.mimic import train_mimic
from training.negatives import NEGATIVE_KINDS
from training.torchutil import batched, intra_op_threads, resolve_device
from training.union import MIN_FLAGGED, calibrate_union
from training.weighting import CANDIDATES, Negatives, choose_weighting, configured_split

__all__ = ["CalibrationWarning", "FitConfig", "Steps", "fit"]

log = logging.getLogger(__name__)

PREVIEW_PER_CLASS = 8
# Above this binomial spread of the realised FPR (relative to the target) fit warns.
MAX_RELATIVE_FPR_SPREAD = 0.25


class CalibrationWarning(UserWarning):
    """The calibration set is too small for the requested false-positive rate."""


def _preview(data: LabeledImages, num_classes: int) -> LabeledImages:
    """First few accepted samples of each class, for the grid PNG."""
    index = np.concatenate(
        [np.flatnonzero(data.labels == c)[:PREVIEW_PER_CLASS] for c in range(num_classes)]
    ).astype(np.int64)
    return data.subset(index)


def samples_for_quarter_spread(target_fpr: float) -> int:
    """Clean samples a boundary must be read off for its realised FPR to scatter by at most
    ``MAX_RELATIVE_FPR_SPREAD`` of the target (one standard deviation): 1,584 at 1 %."""
    return int(np.ceil((1 - target_fpr) / (MAX_RELATIVE_FPR_SPREAD**2 * target_fpr)))


RECALIBRATION_SAMPLES = 600  # what centred every measured pool near the target (docs/evaluation.md)


def recalibration_samples(target_fpr: float) -> int:
    """Vetted stream samples the cross-fit warning asks for: ``RECALIBRATION_SAMPLES``, or the
    ``1 / target_fpr`` that ``recalibrate`` refuses to go below, whichever is more."""
    return max(RECALIBRATION_SAMPLES, int(np.ceil(1 / target_fpr)))


def calibration_warning(n: int, target_fpr: float, crossfit: bool = False) -> str | None:
    """The sentence ``fit`` warns with when ``n`` clean scores cannot pin ``target_fpr`` down.

    ``crossfit``: the pool is cross-fitted (``training.crossfit``). Then the warning also says
    what the binomial spread leaves out and what fixes it: measured on 16 digits pools of 252 and
    378 images (docs/evaluation.md, "Realised FPR on small trusted pools"), the realised FPR
    ranged 0.3 to 3.3 % at a 1 % target, because the shipped fold model's scores of new data and
    the pool's coverage of the stream both differ from pool to pool; recalibrating the same
    networks on 600 vetted clean stream samples brought every pool to 0.8 to 1.3 % on average."""
    if n * target_fpr < 1.0:
        return (f"{n} calibration samples cannot estimate a {target_fpr:.2%} quantile at all (needs >= "
                f"{int(np.ceil(1 / target_fpr))}); the boundary flags no calibration sample and the realised FPR "
                "is unknown: use a larger trusted pool (--trusted-fraction, or more samples in --trusted-npz) "
                "or a larger --target-fpr")
    spread = fpr_standard_error(target_fpr, n)
    if spread > MAX_RELATIVE_FPR_SPREAD * target_fpr:
        message = (f"{n} calibration samples for a {target_fpr:.2%} target FPR: the FPR realised on new clean "
                   f"data will scatter by about +-{spread:.2%} (one standard deviation) around the target; a pool "
                   f"of >= {samples_for_quarter_spread(target_fpr)} calibration samples would keep it within a "
                   "quarter of the target")
        if crossfit:
            message += ("; on a cross-fitted pool this small the shipped fold model and the pool's coverage of "
                        "the stream move it further (0.3 to 3.3 % at a 1 % target over 16 digits pools, "
                        "docs/evaluation.md): before relying on the FPR, recalibrate on >= "
                        f"{recalibration_samples(target_fpr)} vetted clean samples of the stream (`depois-train "
                        f"recalibrate`; >= {samples_for_quarter_spread(target_fpr)} keep one recalibration within a "
                        "quarter of the target)")
        return message
    return None


RARE_CLASS_SAMPLES = 10  # below this many trusted samples a class's false alarms run away


def rare_class_warning(class_counts: np.ndarray) -> str | None:
    """The sentence ``fit`` adds when a class has fewer than ``RARE_CLASS_SAMPLES`` trusted
    samples, or ``None``.

    The boundary is global: it holds the FPR over all clean samples, not per class, and the
    class-conditional members (kNN, Mahalanobis, the margins) know a rare class from a handful
    of images. A 101-image digits pool (stop 42's review) realised 5.1 % at a 1 % target, 22 %
    on the class with 2 trusted images and 19 % on one with 7, with nothing in the warnings to
    say which classes; more trusted samples of those classes is the fix (a recalibration on
    the stream moves the boundary for all classes at once and costs detection instead)."""
    rare = [(c, int(n)) for c, n in enumerate(class_counts) if n < RARE_CLASS_SAMPLES]
    if not rare:
        return None
    named = ", ".join(f"class {c} ({n})" for c, n in rare[:10]) + (" ..." if len(rare) > 10 else "")
    return (f"{len(rare)} class{'es' * (len(rare) != 1)} with fewer than {RARE_CLASS_SAMPLES} trusted "
            f"samples: {named}; the boundary holds the FPR over all classes, and clean samples of a "
            "class this rare are flagged far more often (19 to 22 % measured on classes of 2 and 7 in a "
            "101-image digits pool at a 1 % target): add trusted samples of these classes")


def _negatives(folds: list[FoldScores], critic: torch.nn.Module, device: torch.device) -> Negatives:
    """Every fold's synthetic negatives (``training.negatives``), kind by kind in plan order, with
    the mimic model's column filled in: it never trained on a calibrating sample, so it scores
    the negatives made from them out of sample too."""
    out: Negatives = {}
    for kind in NEGATIVE_KINDS:
        parts = [f.negatives[kind] for f in folds if kind in f.negatives]
        labels = np.concatenate([d.labels for d, _ in parts]) if parts else np.zeros(0, np.int64)
        if not len(labels):
            continue
        images = np.concatenate([d.images for d, _ in parts])
        raw = np.concatenate([r for _, r in parts])
        raw[:, MEMBERS.index("critic")] = batched(critic, images, labels, device)
        out[kind] = (raw, labels)
    return out


def mlp_margin_note(cfg: FitConfig, n_cal: int, joined: bool) -> str:
    """The fit summary's and the card's line on the ``mlp_margin`` member (``FitConfig.mlp_margin_joins``)."""
    if "mlp_margin" not in cfg.members:
        return "mlp_margin not requested (--members)"
    if joined:
        return (f"mlp_margin joins the label agreement: {n_cal} calibration samples, enough for a "
                f"{cfg.target_fpr:.2%} boundary read off order statistics")
    return (f"mlp_margin left out: {n_cal} calibration samples put {n_cal * cfg.target_fpr:.1f} below the "
            f"{cfg.target_fpr:.2%} quantile (< {MIN_FLAGGED}); on pools this small the pixel MLP's margin was measured to "
            "cost detection (docs/method.md)")


def fit(cfg: FitConfig, progress: bool = True) -> FittedDetector:
    with intra_op_threads(cfg.threads):
        return _fit(cfg, progress)


def _fit(cfg: FitConfig, progress: bool) -> FittedDetector:
    timer: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timer[name] = round(timer.get(name, 0.0) + now - start, 2)
        start = now

    device = resolve_device(cfg.device)
    steps = cfg.steps()
    splits, parts = fit_data(cfg)
    pool = LabeledImages(np.concatenate([parts.calibration.images, parts.trusted_train.images]),
                         np.concatenate([parts.calibration.labels, parts.trusted_train.labels]))
    plan = make_plan(pool, parts.calibration, parts.trusted_train, cfg.calibration_fraction, cfg.target_fpr,
                     cfg.folds, cfg.seed)
    num_classes = splits.num_classes
    cal_mask = plan.calibration_mask
    n_cal = int(cal_mask.sum())
    parts_of_warning = (calibration_warning(n_cal, cfg.target_fpr, crossfit=plan.mode == "crossfit"),
                        rare_class_warning(np.bincount(pool.labels, minlength=splits.num_classes)))
    message = "; ".join(m for m in parts_of_warning if m) or None
    if message:
        warnings.warn(message, CalibrationWarning, stacklevel=3)
    k = neighbours(plan.min_class_count(num_classes))
    lap("load")

    seed = cfg.seed * 1000
    mlp_joins = cfg.mlp_margin_joins(n_cal)
    if cfg.members == ("mlp_margin",) and not mlp_joins:
        raise ValueError(f"--members lists only mlp_margin, which joins only with >= 10 / target-fpr calibration "
                         f"samples ({n_cal} here); add other members or use a larger trusted pool")
    mlp_steps = steps.mlp_steps if mlp_joins else 0
    tasks = {f: FoldTask(f, *plan.fold_split(f), num_classes, steps.auth_steps, cfg.batch_size, seed + 100 + f, k,
                         cfg.seed, cfg.weight_search, mlp_steps) for f in plan.fold_ids}
    others = [task for f, task in tasks.items() if f != plan.shipped_fold]
    # The folds whose model is not shipped train in the background (training/folds.py) while this
    # process trains the shipped fold, the cGAN and the mimic model: same numbers, less wall time.
    with background_folds(others, cfg.fold_workers, cfg.threads, device) as pending:
        networks, first = train_fold(tasks[plan.shipped_fold], device, progress)
        shipped, auth_losses = networks.authenticator, networks.losses
        lap("authenticator")
        model_data = plan.shipped_training_data()

        n_synthetic = (cfg.n_synthetic if cfg.n_synthetic is not None else default_synthetic(len(splits.train), len(pool)))
        cgan = train_cgan(model_data, shipped, num_classes, steps.gan_steps, cfg.batch_size, seed + 2, device,
                          cfg.aux_weight, progress)
        lap("cgan")
        synth = synthesize(cgan.generator, shipped, n_synthetic, num_classes, cfg.auth_threshold, seed + 3, device,
                           progress=progress)
        non_calibrating = pool.subset(np.flatnonzero(~cal_mask))
        gate_fallback = len(synth.accepted) == 0 and len(non_calibrating) == 0 and n_synthetic > 0
        if gate_fallback:
            # Only with tiny step counts: an untrained authenticator vouches for nothing. Under
            # cross-fit the mimic model would have no real data at all; train it on ungated samples
            # and say so, rather than fail a smoke run.
            warnings.warn("no synthetic sample passed the authenticator gate; the mimic model trains on ungated "
                          "samples (train the authenticator and the cGAN longer for a useful critic)",
                          CalibrationWarning, stacklevel=3)
            synth = synthesize(cgan.generator, shipped, n_synthetic, num_classes, 0.0, seed + 3, device,
                               progress=progress)
        lap("synthesis")
        mimic_data = LabeledImages(np.concatenate([non_calibrating.images, synth.accepted.images]),
                                   np.concatenate([non_calibrating.labels, synth.accepted.labels]))
        if len(mimic_data) == 0:
            raise ValueError("the mimic model has no training data (--n-synthetic 0 under cross-fitting); "
                             "pass --n-synthetic > 0")
        mimic = train_mimic(mimic_data, num_classes, steps.critic_steps, cfg.batch_size, seed + 4, device, progress)
        lap("mimic")
        by_fold = {r.fold: r for r in [first, *pending.results(device, progress)]}
        lap("other folds (wait)")
    folds = [by_fold[f] for f in plan.fold_ids]
    raw = np.full((len(pool), len(MEMBERS)), np.nan, np.float32)
    log_p = np.full(len(pool), np.nan, np.float32)
    for result in folds:
        idx = np.flatnonzero(plan.folds == result.fold)
        raw[idx], log_p[idx] = result.raw, result.log_p
    margin = MEMBERS.index("margin")
    fold_accuracy = [float(np.mean(r.raw[:, margin] > 0)) for r in folds]  # margin > 0 <=> argmax is the label

    cal = plan.calibration
    raw[cal_mask, 0] = batched(mimic.critic, cal.images, cal.labels, device)
    cal_raw, cal_log_p = raw[cal_mask], log_p[cal_mask]
    gate = AccuracyGate.measure(cal_raw[:, MEMBERS.index("pixel_knn")], cal_raw[:, MEMBERS.index("margin")])
    members = cfg.gated_members(gate.passes, mlp_joins)
    agreements = cfg.agreements(members)
    cols = member_columns(members)
    split, weighting = cfg.weighting(), configured_split(cfg.weighting())
    if cfg.weight_search:
        negatives = _negatives(folds, mimic.critic, device)
        choice = choose_weighting(cal_raw[:, cols], cal.labels, num_classes, members, agreements, cfg.target_fpr,
                                  {kind: (r[:, cols], y) for kind, (r, y) in negatives.items()}, split, CANDIDATES)
        split, weighting = choice.chosen, choice.describe()
    union = calibrate_union(cal_raw[:, cols], cal.labels, num_classes, members,
                            cfg.target_fpr, cfg.per_class, plan.cv_folds(cfg.seed), cfg.paper_k,
                            split.vector(members, agreements), agreements)
    sha = weights_sha256(shipped, mimic.critic, networks.mlp)
    metadata = build_metadata(cfg, union, splits.shape, num_classes, sha)
    lap("calibration")

    report = {
        "sizes": {
            "train": len(splits.train),
            "trusted_pool": len(pool),
            "shipped_model_trained_on": len(model_data),
            "calibration": n_cal,
            "synthetic_requested": n_synthetic,
            "synthetic_accepted": len(synth.accepted),
            "synthetic_attempted": synth.attempted,
            "mimic_real_samples": len(mimic_data),
        },
        "plan": {"mode": plan.mode, "folds": len(plan.fold_ids), "neighbours_k": k,
                 "pca_dims": None, "warning": message},
        "steps": steps.model_dump(),
        "acceptance_rate": synth.acceptance_rate,
        "gate_fallback": gate_fallback,
        "authenticator_out_of_fold_accuracy": gate.authenticator_accuracy,
        "authenticator_fold_accuracy": fold_accuracy,
        "mlp_out_of_fold_accuracy": (float(np.mean(cal_raw[:, MEMBERS.index("mlp_margin")] > 0))
                                     if networks.mlp is not None else None),
        "pixel_knn_gate": gate.describe(applied=cfg.gate_pixel_knn) if "pixel_knn" in cfg.members else "pixel_knn not requested",
        "mlp_margin": mlp_margin_note(cfg, n_cal, mlp_joins),
        "cv_fpr": union.cv_fpr,
        "cv_fpr_mean": float(np.mean(union.cv_fpr)) if union.cv_fpr else None,
        "per_class_fallback": union.fell_back,
        "weighting": weighting,
        "times_s": timer,
        "folds_run": {str(r.fold): {"seconds": round(r.seconds, 2), "background": r.pid != os.getpid()} for r in folds},
        "losses": {"authenticator": auth_losses, **cgan.history, **mimic.history},
        "device": str(device),
    }
    det = FittedDetector(shipped, mimic.critic, metadata, cfg, plan, cal_raw, cal.labels,
                         _preview(synth.accepted, num_classes), calibration_log_p=cal_log_p, report=report,
                         device=str(device), mlp=networks.mlp)
    det.report["plan"]["pca_dims"] = int(det.references.novelty.components.shape[0])
    return det

