"""Move a trained detector's operating point onto clean samples of the stream it will serve.

Why: ``fit`` calibrates on the trusted pool (out-of-sample scores of it), and the boundary's
false-positive rate holds on data distributed like that pool. A stream that is easier or harder
than the pool moves the realised rate: on MNIST (``mnist-5k``: 1,000 trusted training images,
the stream from the official test set) the union flagged 0.3 to 0.5 % of the clean stream at a
1 % target and, sitting that far out, caught 50 % of random label flips; recalibrated on 1,000
clean test images it flagged 1.5 % of the clean stream and caught 83 to 99.5 % of the flips
(docs/evaluation.md). The networks, and what
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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depois_stream.sim.datasets import DatasetError, drop_duplicates, read_npz
from training.data import LabeledImages
from training.detector import FittedDetector
from training.conformal import fpr_standard_error
from training.pipeline import MAX_RELATIVE_FPR_SPREAD, samples_for_quarter_spread


class CleanDataError(ValueError):
    """The clean-sample file cannot be used (unreadable, wrong shape, labels or pixel range)."""


def default_max_flagged(target_fpr: float, out_of_sample_fpr: float | None = None) -> float:
    """The largest share of the "clean" samples the current model may flag before recalibrating
    on them is refused: five times the rate it is expected to flag clean data at, at least 5 %.
    That rate is its target, or its own out-of-sample FPR estimate (the card's) where that is
    higher: a small pool's model realises several times its target (about 5 % at 1 % on 101
    digits), and a guard at five times the target alone refused the very recalibration its fit
    recommends (537 genuinely clean digits, 6.33 % flagged, against 5 %). A harder stream is
    flagged at a few times that rate (the case recalibration exists for); a file the model flags
    far beyond it holds something else. Recalibrating on it would read every column's reference
    off those samples, and the kind of sample that fills the file would pass from then on: 200
    noise images labelled 0, flagged at 100 %, switched the pixel evidence off (noise caught 5 %
    instead of 100 %; found by an independent evaluation in stop 40). The estimate raises the
    limit to ``ESTIMATE_RAISES_TO_AT_MOST`` at most: uncapped, a card estimate of 20 % made the
    limit 100 % and switched the guard off for exactly the small-pool models told to recalibrate
    (review of stop 42)."""
    from_target = max(0.05, 5.0 * target_fpr)
    from_estimate = min(5.0 * (out_of_sample_fpr or 0.0), ESTIMATE_RAISES_TO_AT_MOST)
    return max(from_target, from_estimate)


ESTIMATE_RAISES_TO_AT_MOST = 0.25  # the out-of-sample estimate never loosens the guard past this


def model_out_of_sample_fpr(det: FittedDetector) -> float | None:
    """The detector's own out-of-sample FPR estimate (mean over its calibration folds), the
    number its card reports as ``out_of_sample_fpr``; None when it has none."""
    cv = [float(x) for x in det.report.get("cv_fpr") or [] if math.isfinite(float(x))]
    return float(np.mean(cv)) if cv else None


def load_clean(path: Path, shape: tuple[int, int, int], num_classes: int) -> LabeledImages:
    """``images`` float [N, C, H, W] in [0, 1] and ``labels`` int [N] from an .npz file (what
    ``depois-stream replay export`` writes as samples.npz), checked against the model's input.

    Read by the project's one reader for user arrays (``read_npz``), so a file means here what it
    means to the stream filter's Detector: [N, H, W] is taken for a one-channel model, uint8 is
    divided by 255. A hand-written copy of the rules once took uint8 0/1 values as they were
    while the Detector divided them by 255: the same file, two meanings. Its ``DatasetError``
    becomes ``CleanDataError`` (``recalibrate``'s refusals, exit 3)."""
    try:
        return read_npz(path, shape=tuple(shape), num_classes=num_classes)
    except DatasetError as exc:
        raise CleanDataError(str(exc)) from None


@dataclass(frozen=True)
class Recalibration:
    """What moved, for the command's summary and the operator's change record."""

    samples: int  # unique samples recalibrated on (exact repeats dropped)
    repeats_dropped: int  # exact (image, label) repeats dropped from the given file
    absent_classes: tuple[int, ...]  # classes of the model with no sample among them
    target_fpr: float
    flagged_before: float  # share of the (unique) samples the old boundary flagged
    flagged_after: float  # the new boundary's share of them (the target, by construction)
    out_of_sample_fpr: float | None  # ten-fold estimate for new clean data like them
    boundary_before: float
    boundary_after: float
    version_before: str
    version_after: str
    warnings: tuple[str, ...]
    max_flagged: float = 1.0  # the share of the samples above which the file was to be refused


def recalibrate(det: FittedDetector, data: LabeledImages, target_fpr: float, per_class: bool,
                max_flagged: float | None = None) -> Recalibration:
    """Recalibrate ``det`` in place on the unique samples of ``data`` (clean samples of the
    stream); raises ``CleanDataError`` when there are too few of them to estimate a
    ``target_fpr`` quantile, or when the current model flags more than ``max_flagged`` of them
    (default: ``default_max_flagged`` of its target and its out-of-sample FPR).

    Exact repeats are dropped first: at-least-once delivery repeats records in a stream export,
    and each copy would count as one more clean sample, so the quantile would rest on fewer
    samples than it says. The 537 digits test images tiled 3x were taken as 1,611 samples and
    their exact ties broke the export's ONNX/torch parity check; jittered by a rounding step (so
    the export passed) the copies unlocked per-class boundaries and realised 1.79 % instead of
    0.99 % at a 1 % target. Such near-repeats (a re-encoded copy) are not caught here."""
    data, repeats = drop_duplicates(data)
    n = len(data)
    if n * target_fpr < 1.0:
        raise CleanDataError(f"{_counted(n, repeats)} cannot place a {target_fpr:.2%} boundary (needs at least "
                             f"{int(np.ceil(1 / target_fpr))}, and about {samples_for_quarter_spread(target_fpr):,} "
                             "keep the realised rate within a quarter of the target)")
    before = float(det.predict(data.images, data.labels).mean())
    estimate = model_out_of_sample_fpr(det)
    limit = default_max_flagged(det.metadata.target_fpr, estimate) if max_flagged is None else max_flagged
    if before > limit:
        raise CleanDataError(flagged_refusal(before, n, limit, None if max_flagged is not None else (
            det.metadata.target_fpr, estimate)))
    absent = absent_classes(data.labels, det.metadata.num_classes)
    boundary_before, version_before = det.metadata.boundary.global_, det.metadata.model_version
    det.infer_threshold(data.images, data.labels, target_fpr, per_class)
    det.report["calibration"]["repeats_dropped"] = repeats  # the card's note says so
    cv = det.report.get("cv_fpr_mean")
    warnings = tuple(w for w in (recalibration_warning(n, target_fpr),
                                 absent_classes_warning(absent, det.metadata.num_classes)) if w)
    plan = det.report.setdefault("plan", {})
    # the card's warning: the pool's (about --trusted-fraction) no longer applies
    plan["warning"] = "; ".join(warnings) if warnings else None
    return Recalibration(
        samples=n, repeats_dropped=repeats, absent_classes=absent, target_fpr=target_fpr,
        flagged_before=before, flagged_after=float(det.predict(data.images, data.labels).mean()),
        out_of_sample_fpr=float(cv) if cv is not None else None,
        boundary_before=float(boundary_before), boundary_after=float(det.metadata.boundary.global_),
        version_before=version_before, version_after=det.metadata.model_version,
        warnings=warnings, max_flagged=float(limit))


def _counted(n: int, repeats: int) -> str:
    """"N clean samples", naming the dropped repeats so a refusal's count matches the file."""
    return f"{n} clean samples" + (f" (after dropping {repeats} exact repeats)" if repeats else "")


def flagged_refusal(before: float, n: int, limit: float, default_of: tuple[float, float | None] | None) -> str:
    """The one-line refusal of a file the current model flags beyond ``limit``. It names where
    the limit came from (``default_of``: the model's target and out-of-sample FPR, None for a
    given --max-flagged) and the exact --max-flagged that accepts this file, for an operator
    who did vet it: "pass --max-flagged 1" alone read as switching the guard off."""
    if default_of is None:
        basis = "--max-flagged"
    else:
        target, estimate = default_of
        rate = f"its {target:.2%} target" + (f" and its {estimate:.2%} out-of-sample FPR" if estimate is not None
                                              else "")
        basis = (f"the default: 5 x the higher of {rate}, at least 5%, the estimate raising it to "
                 f"{ESTIMATE_RAISES_TO_AT_MOST:.0%} at most")
    accept = math.ceil(before * 100 - 1e-9) / 100  # the smallest two-decimal share >= before
    return (f"the current model flags {before:.2%} of these {n} 'clean' samples, more than {limit:.2%} ({basis}): "
            "recalibrating on them would let their kind through from then on; vet the file (drop what is not "
            f"clean: docs/method.md); if it is vetted, pass --max-flagged {accept:g} to recalibrate on it")


def absent_classes(labels: np.ndarray, num_classes: int) -> tuple[int, ...]:
    """The model's classes that no given sample claims."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    return tuple(int(c) for c in np.flatnonzero(counts[:num_classes] == 0))


def absent_classes_warning(absent: tuple[int, ...], num_classes: int) -> str | None:
    """A warning naming the classes with no sample (None when every class has one). Not a
    refusal: a stream may truly lack classes. But an absent class's standardisation and
    boundary fall back to those pooled over the classes present, so samples that claim it are
    flagged at a rate nobody measured: recalibrated on digits of classes {0, 3, 7} only, held-out
    digits of the other classes were flagged at up to 7.4 % and all of them at 1.98 % (0.99 %
    recalibrated on every class) for a 1 % target."""
    if not absent:
        return None
    present = [c for c in range(num_classes) if c not in set(absent)]
    return (f"no sample of class {', '.join(map(str, absent))} ({len(absent)} of the model's {num_classes} "
            f"classes): the boundary is then set for the classes present only ({', '.join(map(str, present))}), "
            "and samples that claim an absent class are flagged at a rate these samples do not measure (digits "
            "recalibrated on 3 classes: up to 7.4 % per absent class, 1.98 % overall, for a 1 % target); add "
            "vetted samples of every class the stream carries")


def recalibration_warning(n: int, target_fpr: float) -> str | None:
    """``fit``'s small-calibration warning, with the remedy that applies here (more samples);
    ``recalibrate`` has refused fewer than ``1 / target_fpr`` samples already. ``n`` counts
    unique samples (exact repeats add nothing)."""
    spread = fpr_standard_error(target_fpr, n)
    if spread <= MAX_RELATIVE_FPR_SPREAD * target_fpr:
        return None
    return (f"recalibrated on {n} clean samples for a {target_fpr:.2%} target FPR: the FPR realised on new clean "
            f"data will scatter by about +-{spread:.2%} (one standard deviation) around the target; "
            f"recalibrate on >= {samples_for_quarter_spread(target_fpr)} samples to keep it within a quarter of "
            "the target")
