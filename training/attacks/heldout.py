"""A second, held-out attack suite: families written after the union was built (numpy only,
deterministic). Stop 20 chose a change after reading its table (``pixel_mahalanobis`` joined), so
it is no longer unseen; ``heldout2.py`` is the suite nothing has been chosen against.

The development suite (``ATTACKS``) is what the detector was improved against; a detector tuned
to its own attack list looks better there than it is. These families ask the same questions with
poisons the design had not seen, the way an outside evaluator would: ``depois-train evaluate
--attacks heldout`` runs them (docs/evaluation.md has the measured table).

* ``hard_flip``: the label moves to the class whose mean image (over the stream, what an attacker
  can compute) is nearest: the most plausible wrong label, not a uniform one.
* ``noisy_flip``: Gaussian pixel noise (sigma 0.15) plus a uniform wrong label: a flip that also
  blurs what the label-consistency members look at.
* ``sig_backdoor``: SIG (Barni et al. 2019) in its dirty-label form: a horizontal sinusoid of
  amplitude 0.2 added to images of other classes, relabelled 0.
* ``blended_backdoor``: blended trigger (Chen et al. 2017): a fixed random pattern mixed in at
  20 %, images of other classes relabelled 0.
* ``low_contrast_injection``: stream images squashed to a contrast of 0.25 to 0.5 on a grey
  background of 0.2 to 0.4, random labels (an off-distribution acquisition, not a new drawing).
* ``mosaic_injection``: an image assembled from quadrants of four stream images of at least two
  classes, random labels.

Every attack poisons exactly round(rate * N) slots, keeps shapes and dtypes, and returns the
same stream for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from depois_stream.sim.attacks import Labeled, PoisonedStream, _pick, poison_count, wrong_labels
from training.attacks.injections import _inject, _num_classes, _partners, _slots

BACKDOOR_TARGET = 0
SIG_AMPLITUDE = 0.2
BLEND_ALPHA = 0.2
NOISE_SIGMA = 0.15
_PATTERN_KEY = 20_170_515  # the blended trigger is one fixed pattern per image shape, as an attacker ships it


def _other_class_slots(rng: np.random.Generator, data: Labeled, rate: float, target: int, attack: str) -> np.ndarray:
    """Slots among samples not already of ``target``, drawn as BadNets (``backdoor_patch``) draws them."""
    return _pick(rng, np.flatnonzero(data.labels != target), poison_count(len(data.labels), rate), attack)


def hard_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    flat = data.images.reshape(len(data.labels), -1).astype(np.float64)
    overall = flat.mean(axis=0)
    means = np.stack([flat[data.labels == c].mean(axis=0) if np.any(data.labels == c) else overall
                      for c in range(k)])
    d2 = ((flat[idx, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    d2[np.arange(idx.size), data.labels[idx]] = np.inf
    return _inject(data, idx, data.images[idx], d2.argmin(axis=1), "hard_flip")


def noisy_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    fresh = data.images[idx] + rng.normal(0.0, NOISE_SIGMA, data.images[idx].shape)
    return _inject(data, idx, fresh, wrong_labels(rng, data.labels[idx], k), "noisy_flip")


def sig_trigger(images: np.ndarray) -> np.ndarray:
    """The SIG trigger on [N, C, H, W] images (clipped to [0, 1]): what the attack plants and
    what the evaluation stamps on test images to measure the attack success rate."""
    w = images.shape[3]
    cycles = max(1, w // 4)
    signal = SIG_AMPLITUDE * np.sin(2.0 * np.pi * cycles * np.arange(w) / w)
    return np.clip(images + signal[None, None, None, :], 0.0, 1.0).astype(np.float32)


def blended_trigger(images: np.ndarray) -> np.ndarray:
    """The blended trigger: one fixed pattern per image shape mixed in at ``BLEND_ALPHA``."""
    pattern = np.random.default_rng(_PATTERN_KEY).random(images.shape[1:])
    return np.clip((1.0 - BLEND_ALPHA) * images + BLEND_ALPHA * pattern[None], 0.0, 1.0).astype(np.float32)


def dirty_label_backdoor(data: Labeled, rate: float, seed: int, trigger: Callable[[np.ndarray], np.ndarray],
                         target: int, attack: str) -> PoisonedStream:
    """The dirty-label backdoor every suite's trigger attacks share: ``trigger`` on images of other
    classes (``_other_class_slots``), relabelled ``target``."""
    idx = _other_class_slots(np.random.default_rng(seed), data, rate, target, attack)
    return _inject(data, idx, trigger(data.images[idx]), target, attack, target_label=target)


def sig_backdoor(data: Labeled, rate: float, seed: int, *, target: int = BACKDOOR_TARGET) -> PoisonedStream:
    return dirty_label_backdoor(data, rate, seed, sig_trigger, target, "sig_backdoor")


def blended_backdoor(data: Labeled, rate: float, seed: int, *, target: int = BACKDOOR_TARGET) -> PoisonedStream:
    return dirty_label_backdoor(data, rate, seed, blended_trigger, target, "blended_backdoor")


def low_contrast_injection(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    contrast = rng.uniform(0.25, 0.5, (idx.size, 1, 1, 1))
    background = rng.uniform(0.2, 0.4, (idx.size, 1, 1, 1))
    return _inject(data, idx, contrast * data.images[idx] + background, rng.integers(0, k, idx.size),
                   "low_contrast_injection")


def mosaic_injection(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    h, w = data.images.shape[2:]
    rows, cols = np.arange(h)[:, None] >= h // 2, np.arange(w)[None, :] >= w // 2
    fresh = np.array(data.images[idx], dtype=np.float32, copy=True)
    for quadrant in (rows & ~cols, ~rows & cols, rows & cols):  # top-left stays the slot's own image
        partner = _partners(rng, data.labels, idx)  # another class: at least two classes per mosaic
        fresh[:, :, quadrant] = data.images[partner][:, :, quadrant]
    return _inject(data, idx, fresh, rng.integers(0, k, idx.size), "mosaic_injection")
