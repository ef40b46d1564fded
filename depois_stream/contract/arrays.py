"""Image and label arrays as a user hands them in, made into the contract's.

One set of rules for every entry point that takes arrays from a user: ``Detector.predict`` (in
process), ``depois-train fit --trusted-npz`` and ``recalibrate --clean``, ``depois-stream produce
--npz``. Before stop 42 each had its own copy, and they disagreed: uint8 0/1 values were divided
by 255 by the Detector and taken as they were by recalibrate; int64 images were scored by the
Detector and refused by the others; a float label was truncated by produce. The same file must
mean the same thing everywhere, or a detector calibrated on one reading scores another.

The rules: images ``[N, C, H, W]`` (or ``[N, H, W]`` for one channel), uint8 0..255 (divided by
255) or float in [0, 1] (a rounding step outside is clipped, anything further refused); labels
integers in ``0..num_classes-1``. Anything else is one ``ArrayError`` line that says what to pass.
numpy only: the stream filter, the tools and training all import it.
"""

from __future__ import annotations

import warnings

import numpy as np

RANGE_TOLERANCE = 1e-3  # float pixels a rounding step outside [0, 1] are clipped, not refused
MAX_CLASSES = 1 << 16  # labels are class indices; a code of 10**9 is not one (and bincount would need 8 GB)
# uint8 images that never reach this are almost surely on another scale (scikit-learn's digits
# are 0..16): read as 0..255 they are near-black, and every one of them is flagged.
LOW_UINT8_PEAK = 32


class ArrayError(ValueError):
    """Arrays that break the contract's rules; the message says what to pass instead."""


class LowRangeWarning(UserWarning):
    """uint8 images that peak far below 255: probably pixels on a smaller scale, cast as they were."""


def to_contract(images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...] | None = None,
                num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [N, C, H, W] in [0, 1], labels int64 [N])`` from a user's arrays.

    ``shape`` and ``num_classes`` are the model's when it is known (``None``: a trusted pool,
    whose arrays decide them). The caller's arrays are never modified; float32 input in range
    is returned without a copy.
    """
    x, y = np.asarray(images), np.asarray(labels)
    if x.ndim == 3 and (shape is None or shape[0] == 1):
        x = x[:, None]
    want = f"[N, {', '.join(map(str, shape))}]" if shape else "[N, C, H, W] or [N, H, W]"
    channels_last = x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
    if x.ndim != 4 or (shape is not None and tuple(x.shape[1:]) != tuple(shape)) or (
            shape is None and channels_last):
        hint = "; it looks like [N, H, W, C]: np.moveaxis(images, -1, 1)" if channels_last else ""
        raise ArrayError(f"images must be {want}, got {x.dtype} {list(x.shape)}{hint}")
    if y.ndim != 1 or len(y) != len(x):
        raise ArrayError(f"{len(x)} images but labels of shape {list(y.shape)}: labels must be {len(x)} "
                         "integers, one per image")
    _check_labels(y, num_classes)
    return _pixels(x), y.astype(np.int64, copy=False)


def _check_labels(y: np.ndarray, num_classes: int | None) -> None:
    top = f"0..{num_classes - 1}" if num_classes else "0..K-1"
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise ArrayError(f"labels are {y.dtype}; labels must be integers in {top} (map class names or "
                         "other codes to 0..K-1 first)")
    if not y.size:
        return
    low, high = y.min(), y.max()  # compared in their own dtype: a uint64 2**64-1 is no -1 here
    if low < 0 or high >= (num_classes if num_classes is not None else MAX_CLASSES):
        raise ArrayError(f"labels must be in {top} (class indices), got {low} to {high}")


def _pixels(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        peak = int(x.max()) if x.size else 0
        if 0 < peak < LOW_UINT8_PEAK:
            warnings.warn(f"uint8 images are read as 0..255 and these peak at {peak}: if their scale is "
                          f"0..{peak}, pass float images divided by it (e.g. images / {peak}.0)",
                          LowRangeWarning, stacklevel=5)  # the caller of Detector.predict
        out = x.astype(np.float32)
        out /= np.float32(255)
        return out
    if not np.issubdtype(x.dtype, np.floating):
        raise ArrayError(f"images are {x.dtype}; pass uint8 0..255 or float in [0, 1]")
    out = x.astype(np.float32, copy=False)
    if not out.size:
        return out
    low, high = float(out.min()), float(out.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ArrayError("float pixel values must be finite and scaled to [0, 1], got NaN or infinite values")
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ArrayError(f"float pixel values must be finite and scaled to [0, 1], got {low:g} to {high:g} "
                         "(divide by your pixel scale's maximum, or pass uint8 0..255)")
    return np.clip(out, 0.0, 1.0) if low < 0 or high > 1 else out
