"""Move a trained detector's operating point onto clean samples of the stream it will serve.

Why: ``fit`` calibrates on the trusted pool (out-of-sample scores of it), and the boundary's
false-positive rate holds on data distributed like that pool. A stream that is easier or harder
than the pool moves the realised rate: on MNIST (``mnist-5k``: 1,000 trusted training images,
the stream from the official test set) the union flagged 0.3 to 0.5 % of the clean stream at a
1 % target and, sitting that far out, caught 50 % of random label flips; recalibrated on 1,000
clean test images it flagged 1.1 % and caught 96 % (docs/evaluation.md). The networks, and what
they learned from the trusted pool, stay; only the p-value references, the standardisation and
the boundary are re-read from the shipped networks' scores of the given samples
(``FittedDetector.infer_threshold``).

The samples must be clean and like the stream: a vetted sample of the ingest topic (``depois-stream
replay export --topic <ingest>`` writes exactly this file format). Not the clean topic alone: it
lacks the clean samples the current boundary quarantined (its least typical 1 %), and a boundary
read off it would flag those plus another 1 %. Poisons left among the samples make the boundary
more lenient by their share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import LabeledImages
from training.detector import FittedDetector
from training.conformal import fpr_standard_error
from training.pipeline import MAX_RELATIVE_FPR_SPREAD, samples_for_quarter_spread

# Pixel values may stray this far outside [0, 1] (float rounding of an encoder) before a file is
# taken for another scaling (0..255 images, standardised ones).
RANGE_TOLERANCE = 1e-3


class CleanDataError(ValueError):
    """The clean-sample file cannot be used (unreadable, wrong shape, labels or pixel range)."""


def default_max_flagged(target_fpr: float) -> float:
    """The largest share of the "clean" samples the current model may flag before recalibrating
    on them is refused: five times its target, at least 5 %. A harder stream is flagged at a
    few times the target (the case recalibration exists for); a file the model flags far beyond
    that holds something else. Recalibrating on it would read every column's reference off those
    samples, and the kind of sample that fills the file would pass from then on: 200 noise
    images labelled 0, flagged at 100 %, switched the pixel evidence off (noise caught 5 %
    instead of 100 %; found by an independent evaluation in stop 40)."""
    return max(0.05, 5.0 * target_fpr)


def load_clean(path: Path, shape: tuple[int, int, int], num_classes: int) -> LabeledImages:
    """``images`` float [N, C, H, W] in [0, 1] and ``labels`` int [N] from an .npz file (what
    ``depois-stream replay export`` writes as samples.npz), checked against the model's input."""
    if not Path(path).is_file():  # np.load of a FIFO waits for a writer for ever
        raise CleanDataError(f"{path} is not a file (missing, a folder, a FIFO or a device)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - empty, truncated, not a zip: one line, whatever numpy raises
        raise CleanDataError(f"cannot read {path} as an .npz file ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CleanDataError(f"{path} is a single array, not an .npz file with 'images' and 'labels'")
    try:
        with loaded as npz:
            if "images" not in npz or "labels" not in npz:
                raise CleanDataError(f"{path} has no 'images' and 'labels' arrays (found: "
                                     f"{', '.join(npz.files) or 'none'})")
            images, labels = np.asarray(npz["images"]), np.asarray(npz["labels"])
    except CleanDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a member that does not decompress or parse
        raise CleanDataError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    if images.ndim == 0 or len(images) == 0:
        raise CleanDataError(f"{path} holds no images")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape) or not np.issubdtype(images.dtype, np.number):
        raise CleanDataError(f"{path}: images are {images.dtype} {list(images.shape)}, the model takes float "
                             f"[N, {', '.join(map(str, shape))}]")
    if labels.ndim != 1 or len(labels) != len(images):
        raise CleanDataError(f"{path}: {len(images)} images but labels of shape {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and (
            labels.min() < 0 or labels.max() >= num_classes)):
        raise CleanDataError(f"{path}: labels must be integers in 0..{num_classes - 1}")
    images = images.astype(np.float32)
    if not np.isfinite(images).all() or (images.size and (
            images.min() < -RANGE_TOLERANCE or images.max() > 1 + RANGE_TOLERANCE)):
        raise CleanDataError(f"{path}: pixel values must be finite and in [0, 1] (the wire format's "
                             "scale), got " + (f"{images.min():g} to {images.max():g}" if np.isfinite(
                                 images).all() else "NaN or infinite values"))
    return LabeledImages(np.clip(images, 0.0, 1.0), labels.astype(np.int64))


@dataclass(frozen=True)
class Recalibration:
    """What moved, for the command's summary and the operator's change record."""

    samples: int
    target_fpr: float
    flagged_before: float  # share of the given samples the old boundary flagged
    flagged_after: float  # the new boundary's share of them (the target, by construction)
    out_of_sample_fpr: float | None  # ten-fold estimate for new clean data like them
    boundary_before: float
    boundary_after: float
    version_before: str
    version_after: str
    warning: str | None


def recalibrate(det: FittedDetector, data: LabeledImages, target_fpr: float, per_class: bool,
                max_flagged: float | None = None) -> Recalibration:
    """Recalibrate ``det`` in place on ``data`` (clean samples of the stream); raises
    ``CleanDataError`` when there are too few of them to estimate a ``target_fpr`` quantile, or
    when the current model flags more than ``max_flagged`` of them (default:
    ``default_max_flagged`` of its own target)."""
    n = len(data)
    if n * target_fpr < 1.0:
        raise CleanDataError(f"{n} clean samples cannot place a {target_fpr:.2%} boundary (needs at least "
                             f"{int(np.ceil(1 / target_fpr))}, and about {samples_for_quarter_spread(target_fpr):,} "
                             "keep the realised rate within a quarter of the target)")
    before = det.predict(data.images, data.labels).mean()
    limit = default_max_flagged(det.metadata.target_fpr) if max_flagged is None else max_flagged
    if before > limit:
        raise CleanDataError(
            f"the current model flags {before:.2%} of these {n} 'clean' samples (more than {limit:.2%}): "
            "recalibrating on them would let their kind through from then on; vet the file (drop what "
            "is not clean: docs/method.md), or pass --max-flagged 1 to recalibrate on it anyway")
    boundary_before, version_before = det.metadata.boundary.global_, det.metadata.model_version
    det.infer_threshold(data.images, data.labels, target_fpr, per_class)
    cv = det.report.get("cv_fpr_mean")
    warning = recalibration_warning(n, target_fpr)
    plan = det.report.setdefault("plan", {})
    plan["warning"] = warning  # the card's warning: the pool's (about --trusted-fraction) no longer applies
    return Recalibration(
        samples=n, target_fpr=target_fpr, flagged_before=float(before),
        flagged_after=float(det.predict(data.images, data.labels).mean()),
        out_of_sample_fpr=float(cv) if cv is not None else None,
        boundary_before=float(boundary_before), boundary_after=float(det.metadata.boundary.global_),
        version_before=version_before, version_after=det.metadata.model_version,
        warning=warning)


def recalibration_warning(n: int, target_fpr: float) -> str | None:
    """``fit``'s small-calibration warning, with the remedy that applies here (more samples);
    ``recalibrate`` has refused fewer than ``1 / target_fpr`` samples already."""
    spread = fpr_standard_error(target_fpr, n)
    if spread <= MAX_RELATIVE_FPR_SPREAD * target_fpr:
        return None
    return (f"recalibrated on {n} clean samples for a {target_fpr:.2%} target FPR: the FPR realised on new clean "
            f"data will scatter by about +-{spread:.2%} (one standard deviation) around the target; "
            f"recalibrate on >= {samples_for_quarter_spread(target_fpr)} samples to keep it within a quarter of "
            "the target")
