"""A fourth attack suite, ``heldout3``: faint triggers and a smooth flip, written in stop 34 after
the graded-noise negative (``training.negatives``) and before any detector fitted with it was
measured. ``depois-train evaluate --attacks heldout3``.

Why: stop 34 graded the synthetic noise negative because the budget search cost the blended
backdoor of the first held-out suite, a suite that therefore informed the change. These families
check the change on attacks it was not shaped on. None is a copy of a negative kind: the
negatives are per-image random noise with the right label, patch shuffles and half-half class
mixes; here every poison carries a wrong label and the image change is either one fixed pattern
(as a backdoor attacker ships it) or a blur.

* ``additive_backdoor``: an invisible additive trigger in the spirit of ISSBA (Li et al., ICCV
  2021) and of Chen et al.'s noise key: one fixed random sign pattern of amplitude
  ``ADDITIVE_AMPLITUDE`` (+-0.08 of the [0, 1] range, clipped) added to images of other classes,
  relabelled to class 1. Unlike the blended trigger it does not lower the image's contrast.
* ``faint_patch_backdoor``: a BadNets-like patch made faint: one fixed random patch (a quarter of
  each side) blended in at ``PATCH_ALPHA`` (35 %) in the top-left corner of images of other
  classes, relabelled to class 1. The development suite's backdoor is a full-contrast
  checkerboard in the opposite corner.
* ``blur_flip``: a Gaussian blur (sd ``blur_sigma``: 1 px on 28x28 images, 0.5 px on 8x8 digits)
  and a uniform wrong label: a flip whose image is smooth and slightly off the trusted manifold.

Every attack poisons exactly round(rate * N) slots, keeps shapes and dtypes, and returns the same
stream for the same seed.
"""

from __future__ import annotations

import numpy as np

from depois_stream.sim.attacks import Labeled, PoisonedStream, wrong_labels
from training.attacks.heldout import dirty_label_backdoor
from training.attacks.injections import _inject, _num_classes, _slots

ADDITIVE_AMPLITUDE = 0.08
PATCH_ALPHA = 0.35
TARGET = 1  # both backdoors' class: differs from the other suites' 0 and last class
_ADDITIVE_KEY = 20_211_011  # one fixed pattern per image shape, as an attacker ships it
_PATCH_KEY = 20_170_822


def additive_pattern(shape: tuple[int, ...]) -> np.ndarray:
    """The fixed +-``ADDITIVE_AMPLITUDE`` sign pattern of this image shape ([C, H, W])."""
    signs = np.random.default_rng(_ADDITIVE_KEY).integers(0, 2, shape) * 2 - 1
    return (ADDITIVE_AMPLITUDE * signs).astype(np.float32)


def additive_trigger(images: np.ndarray) -> np.ndarray:
    return np.clip(images + additive_pattern(images.shape[1:])[None], 0.0, 1.0).astype(np.float32)


def patch_side(height: int) -> int:
    return max(2, height // 4)


def faint_patch_trigger(images: np.ndarray) -> np.ndarray:
    """The fixed random patch blended in at ``PATCH_ALPHA`` in the top-left corner."""
    c, h, w = images.shape[1:]
    s = patch_side(min(h, w))
    patch = np.random.default_rng(_PATCH_KEY).random((c, s, s)).astype(np.float32)
    out = np.array(images, dtype=np.float32, copy=True)
    out[:, :, :s, :s] = (1.0 - PATCH_ALPHA) * out[:, :, :s, :s] + PATCH_ALPHA * patch[None]
    return out


def additive_backdoor(data: Labeled, rate: float, seed: int) -> PoisonedStream:
    """Add the fixed sign pattern to images of other classes and relabel them ``TARGET``."""
    return dirty_label_backdoor(data, rate, seed, additive_trigger, TARGET, "additive_backdoor")


def faint_patch_backdoor(data: Labeled, rate: float, seed: int) -> PoisonedStream:
    """Blend the fixed corner patch into images of other classes and relabel them ``TARGET``."""
    return dirty_label_backdoor(data, rate, seed, faint_patch_trigger, TARGET, "faint_patch_backdoor")


def blur_sigma(height: int) -> float:
    """The blur's sd in pixels: 1 on 28x28 images, 0.5 on 8x8 digits."""
    return max(0.5, height / 28.0)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [N, C, H, W] images (edge-padded, kernel radius 3 sd)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = np.asarray(images, dtype=np.float64)
    for axis in (2, 3):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        size = out.shape[axis]
        out = sum(t * np.take(padded, np.arange(k, k + size), axis=axis) for k, t in enumerate(taps))
    return out.astype(np.float32)


def blur_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    """Blur each slot's image and give it a uniformly drawn wrong label."""
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    fresh = gaussian_blur(data.images[idx], blur_sigma(data.images.shape[2]))
    return _inject(data, idx, fresh, wrong_labels(rng, data.labels[idx], k), "blur_flip")
