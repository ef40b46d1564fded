"""``fit``: the whole offline De-Pois pipeline from a data set name to a FittedDetector.

Stages (each with its own derived seed, so the run is deterministic on CPU under ``cfg.seed``):
trusted split -> authenticator -> authenticated cGAN -> gated synthesis -> WGAN-GP mimic model on
trusted-train + accepted synthetic -> fusion constants and boundary on the calibration split.
Only the train split is read; the test split is left for the evaluation.
"""

from __future__ import annotations

import time

import numpy as np

from training.augment import (
    authenticator_log_p,
    synthesize,
    train_authenticator,
    train_cgan,
)
from training.calibration import fit_boundary, flagged
from training.config import FitConfig, Steps
from training.data import LabeledImages, load_dataset, trusted_split
from training.detector import FittedDetector, build_metadata, weights_sha256
from training.fusion import FusionParams, combined_score
from training.mimic import train_mimic
from training.torchutil import batched, intra_op_threads, resolve_device

__all__ = ["FitConfig", "Steps", "fit"]

PREVIEW_PER_CLASS = 8


def _preview(data: LabeledImages, num_classes: int) -> LabeledImages:
    """First few accepted samples of each class, for the grid PNG."""
    index = np.concatenate(
        [np.flatnonzero(data.labels == c)[:PREVIEW_PER_CLASS] for c in range(num_classes)]
    ).astype(np.int64)
    return data.subset(index)


def fit(cfg: FitConfig, progress: bool = True) -> FittedDetector:
    with intra_op_threads(cfg.threads):
        return _fit(cfg, progress)


def _fit(cfg: FitConfig, progress: bool) -> FittedDetector:
    timer: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timer[name] = round(now - start, 2)
        start = now

    device = resolve_device(cfg.device)
    steps = cfg.steps()
    splits = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    parts = trusted_split(splits.train, cfg.trusted_fraction, cfg.calibration_fraction, cfg.seed)
    trusted, cal = parts.trusted_train, parts.calibration
    k = splits.num_classes
    n_synthetic = (
        cfg.n_synthetic if cfg.n_synthetic is not None else len(splits.train) - len(trusted) - len(cal)
    )
    lap("load")

    seed = cfg.seed * 1000
    auth, auth_losses = train_authenticator(
        trusted, k, steps.auth_steps, cfg.batch_size, seed + 1, device, progress
    )
    lap("authenticator")
    cgan = train_cgan(
        trusted, auth, k, steps.gan_steps, cfg.batch_size, seed + 2, device, cfg.aux_weight, progress
    )
    lap("cgan")
    synth = synthesize(
        cgan.generator, auth, n_synthetic, k, cfg.auth_threshold, seed + 3, device, progress=progress
    )
    lap("synthesis")
    mimic_data = LabeledImages(
        np.concatenate([trusted.images, synth.accepted.images]),
        np.concatenate([trusted.labels, synth.accepted.labels]),
    )
    mimic = train_mimic(mimic_data, k, steps.critic_steps, cfg.batch_size, seed + 4, device, progress)
    lap("mimic")

    critic_raw = batched(mimic.critic, cal.images, cal.labels, device)
    log_p = authenticator_log_p(auth, cal.images, cal.labels, device)
    fusion = FusionParams.fit(critic_raw, log_p, cfg.target_fpr)
    scores = combined_score(critic_raw, log_p, fusion, cfg.score_kind)
    boundary, fell_back = fit_boundary(scores, cal.labels, k, cfg.target_fpr, cfg.per_class, cfg.paper_k)
    metadata = build_metadata(cfg, boundary, splits.shape, k, weights_sha256(auth, mimic.critic), fusion)
    lap("calibration")

    report = {
        "sizes": {
            "train": len(splits.train),
            "trusted_train": len(trusted),
            "calibration": len(cal),
            "synthetic_requested": n_synthetic,
            "synthetic_accepted": len(synth.accepted),
            "synthetic_attempted": synth.attempted,
        },
        "steps": steps.model_dump(),
        "acceptance_rate": synth.acceptance_rate,
        "authenticator_calibration_accuracy": float(
            (np.exp(log_p) > 0.5).mean()  # p(label) > 0.5 implies the argmax is the label
        ),
        "calibration_fpr": float(flagged(scores, cal.labels, boundary).mean()),
        "per_class_fallback": fell_back,
        "times_s": timer,
        "losses": {"authenticator": auth_losses, **cgan.history, **mimic.history},
        "device": str(device),
    }
    return FittedDetector(
        auth, mimic.critic, fusion, metadata, cfg, cal, trusted, _preview(synth.accepted, k),
        report=report, device=str(device),
    )
