"""A fifth attack suite, ``heldout4``: written in stop 37, after every member, weight, rule and
setting of the shipped union was fixed, and read once, on the shipped fits, to report how the
detector does on attacks it was never shaped on. ``depois-train evaluate --attacks heldout4``.

Why another suite: each earlier held-out suite stopped being unseen once a change was chosen after
reading it (docs/evaluation.md). These families ask questions none of the others asks:

* ``label_consistent_backdoor``: Turner et al. 2019's label-consistent (clean-label) backdoor in
  its plain stamped form (without their adversarial or GAN perturbation of the base images):
  images *of the target class*, label kept correct, carry a small full-contrast "+" trigger in
  the bottom-left corner. No label is wrong, so the label members have nothing to see; only the
  pixels can give it away. Slots are drawn uniformly; a slot already of the target class keeps its
  own image, every other slot gets a stream image of the target class (drawn with replacement), so
  at any rate about (1 - that class's share) of the poisons are triggered copies of stream images,
  duplicates but for the "+", as an attacker who wants the rate would send them.
* ``nudged_flip``: a uniform wrong label whose image is nudged towards the claimed class: every
  pixel moves by ``NUDGE`` (0.1 of the range) in the direction of the claimed class's mean image
  over the stream (what an attacker can compute; a pixel closer than 0.1 to that mean steps past
  it): a flip made to look more like its label to a pixel detector, at the price of a visible
  texture.
* ``shifted_flip``: the image translated by ``shift_pixels`` (1 px on 8x8 digits, 2 px on 28x28)
  in one of eight directions, the vacated border filled with 0 (the background), and a uniform
  wrong label. The authenticator is trained with random shifts up to the same size
  (``training.augment.max_shift``; a test keeps the two equal without importing torch here), so
  the image stays on its manifold.
* ``sparse_trigger_backdoor``: one fixed random set of pixels (2 % of them, at least 3) set to
  full intensity on images of other classes, relabelled ``SPARSE_TARGET``: a scattered trigger,
  not a patch.
* ``cutout_flip``: a random rectangle covering 20 to 35 % of the image set to 0 (random erasing),
  and a uniform wrong label: a flip whose image is partly missing.

Every attack poisons exactly round(rate * N) slots, keeps shapes and dtypes, and returns the same
stream for the same seed.
"""

from __future__ import annotations

import numpy as np

from depois_stream.sim.attacks import Labeled, PoisonedStream, poison_count, wrong_labels
from training.attacks.heldout import dirty_label_backdoor
from training.attacks.injections import _inject, _num_classes, _slots

CONSISTENT_TARGET = 2  # the label-consistent backdoor's class: differs from the other suites' targets
SPARSE_TARGET = 3
NUDGE = 0.1
SPARSE_SHARE = 0.02
CUTOUT_AREA = (0.20, 0.35)
_SPARSE_KEY = 20_190_312  # one fixed pixel set per image shape, as an attacker ships it


def plus_side(height: int) -> int:
    """Side of the "+" trigger: 3 px on 8x8 digits, 5 px on 28x28 images (always odd)."""
    return max(3, (height // 6) | 1)


def plus_trigger(images: np.ndarray) -> np.ndarray:
    """Stamp the full-contrast "+" in the bottom-left corner, one pixel from the edges (every
    channel); images must be at least ``plus_side + 2`` pixels on each side."""
    h, w = images.shape[2:]
    s = plus_side(min(h, w))
    if min(h, w) < s + 2:
        raise ValueError(f"the \"+\" trigger needs images of at least {s + 2}x{s + 2} pixels, got {h}x{w}")
    top, left, mid = h - 1 - s, 1, s // 2
    out = np.array(images, dtype=np.float32, copy=True)
    out[:, :, top + mid, left : left + s] = 1.0
    out[:, :, top : top + s, left + mid] = 1.0
    return out


def label_consistent_backdoor(data: Labeled, rate: float, seed: int, *, target: int = CONSISTENT_TARGET) -> PoisonedStream:
    """Put the "+" on images of ``target``, labelled ``target`` (no label is wrong)."""
    own = np.flatnonzero(data.labels == target)
    n = poison_count(len(data.labels), rate)
    if own.size == 0 and n > 0:
        raise ValueError(f"label_consistent_backdoor: the data has no sample of target class {target}")
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    source = np.where(data.labels[idx] == target, idx, rng.choice(own, idx.size) if own.size else idx)
    return _inject(data, idx, plus_trigger(data.images[source]), target, "label_consistent_backdoor",
                   target_label=target)


def nudged_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    """A uniform wrong label, each pixel moved ``NUDGE`` towards that class's mean image."""
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    wrong = wrong_labels(rng, data.labels[idx], k)
    overall = data.images.mean(axis=0)
    means = np.stack([data.images[data.labels == c].mean(axis=0) if np.any(data.labels == c) else overall
                      for c in range(k)])
    src = data.images[idx]
    fresh = src + NUDGE * np.sign(means[wrong] - src)
    return _inject(data, idx, fresh, wrong, "nudged_flip")


def shift_pixels(height: int) -> int:
    """The translation of ``shifted_flip``: 1 px on 8x8 digits, 2 px on 28x28 images."""
    return max(1, round(height / 14))


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate [N, C, H, W] images by (dy, dx) pixels (|dy| < H, |dx| < W), the vacated border
    set to 0."""
    h, w = images.shape[2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"a shift of ({dy}, {dx}) leaves nothing of a {h}x{w} image")
    out = np.zeros_like(images)
    out[:, :, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        images[:, :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def shifted_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    """Translate each slot's image in one of eight directions and give it a uniform wrong label."""
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    step = shift_pixels(data.images.shape[2])
    way = rng.integers(0, len(_DIRECTIONS), idx.size)
    fresh = np.empty_like(data.images[idx])
    for d, (dy, dx) in enumerate(_DIRECTIONS):
        sel = way == d
        fresh[sel] = shift(data.images[idx[sel]], dy * step, dx * step)
    return _inject(data, idx, fresh, wrong_labels(rng, data.labels[idx], k), "shifted_flip")


def sparse_pixels(shape: tuple[int, ...]) -> np.ndarray:
    """The fixed trigger's flat pixel indices for this [C, H, W] shape (``SPARSE_SHARE``, at least 3)."""
    size = int(np.prod(shape[1:]))
    count = max(3, round(SPARSE_SHARE * size))
    return np.sort(np.random.default_rng(_SPARSE_KEY).choice(size, count, replace=False))


def sparse_trigger(images: np.ndarray) -> np.ndarray:
    """Set the fixed scattered pixels to full intensity in every channel."""
    n, c = images.shape[:2]
    out = np.array(images, dtype=np.float32, copy=True).reshape(n, c, int(np.prod(images.shape[2:])))
    out[:, :, sparse_pixels(images.shape[1:])] = 1.0
    return out.reshape(images.shape)


def sparse_trigger_backdoor(data: Labeled, rate: float, seed: int, *, target: int = SPARSE_TARGET) -> PoisonedStream:
    """Stamp the scattered trigger on images of other classes and relabel them ``target``."""
    return dirty_label_backdoor(data, rate, seed, sparse_trigger, target, "sparse_trigger_backdoor")


def cutout_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    """Erase a random rectangle (20 to 35 % of the area) of each slot's image; uniform wrong label."""
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    h, w = data.images.shape[2:]
    fresh = np.array(data.images[idx], dtype=np.float32, copy=True)
    area = rng.uniform(*CUTOUT_AREA, idx.size)
    aspect = rng.uniform(0.5, 2.0, idx.size)
    rh = np.clip(np.round(np.sqrt(area * aspect) * h), 1, h).astype(int)
    rw = np.clip(np.round(np.sqrt(area / aspect) * w), 1, w).astype(int)
    top = rng.integers(0, h - rh + 1)
    left = rng.integers(0, w - rw + 1)
    for i in range(idx.size):
        fresh[i, :, top[i] : top[i] + rh[i], left[i] : left[i] + rw[i]] = 0.0
    return _inject(data, idx, fresh, wrong_labels(rng, data.labels[idx], k), "cutout_flip")


__all__ = ["cutout_flip", "label_consistent_backdoor", "nudged_flip", "plus_trigger", "shifted_flip",
           "sparse_trigger", "sparse_trigger_backdoor"]
