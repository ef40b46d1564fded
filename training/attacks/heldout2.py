"""A third attack suite, ``heldout2``: families written after the eight-member union and its
authenticator were fixed, and never used to choose a member, a weight, a rule or a setting.

The first held-out suite (``heldout.py``) informed a later design change, so it is no longer
unseen. This one replaces it as the unseen check: ``depois-train evaluate --attacks heldout2``.

* ``warp_backdoor``: WaNet-style (Nguyen & Tran, ICLR 2021): one fixed, smooth warping field (a
  random 4x4 control grid upsampled bilinearly) moves pixels by 1 px on 8x8 digits and 2 px on
  28x28 images on average (stronger than the paper's imperceptible setting, which a 1 % FPR
  filter cannot be asked to see); images of other classes are warped and relabelled to the last
  class. The trigger is a geometric distortion, not an additive pattern.
* ``elastic_flip``: an elastic distortion (Simard et al. 2003) drawn per image (a smoothed random
  displacement field, each axis at most 1 px on digits and 3 px on 28x28) plus a uniform wrong
  label: a flip whose image is plausible but slightly off the trusted manifold.
* ``patch_shuffle_injection``: a stream image cut into a 4x4 grid of tiles, the tiles permuted at
  random, random labels: a non-data image that keeps the data's pixel histogram and local texture.
  Where the side is not a multiple of 4 the remainder strip stays in place; an image whose tiles
  are all alike (a blank one) cannot be shuffled visibly and gets a wrong label instead, so every
  slot is poisoned.

Every attack poisons exactly round(rate * N) slots, keeps shapes and dtypes, and returns the same
stream for the same seed.
"""

from __future__ import annotations

import numpy as np

from depois_stream.sim.attacks import Labeled, PoisonedStream, _pick, poison_count, wrong_labels
from training.attacks.injections import _inject, _num_classes, _slots, _smooth

WARP_GRID = 4
_WARP_KEY = 20_210_503  # WaNet's field is one fixed trigger per image shape, as an attacker ships it
SHUFFLE_GRID = 4


def warp_strength(height: int) -> float:
    """Mean displacement of the WaNet field in pixels: 1 on 8x8 digits, 2 on 28x28 images."""
    return max(1.0, height / 14.0)


def elastic_strength(height: int) -> float:
    """Largest elastic displacement per axis in pixels: 1 on 8x8 digits, 3 on 28x28 images."""
    return float(max(1, round(height / 9.0)))


def _bilinear(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample [N, C, H, W] images at fractional pixel positions ``rows``/``cols`` (each
    broadcastable to [N, H', W'] and already inside the image), bilinearly: [N, C, H', W']."""
    n, _, h, w = images.shape
    rows, cols = np.broadcast_arrays(rows, cols)
    r0, c0 = np.minimum(rows.astype(int), h - 2), np.minimum(cols.astype(int), w - 2)
    fr, fc = (rows - r0)[:, None], (cols - c0)[:, None]
    batch = np.arange(n)[:, None, None]

    def at(r: np.ndarray, q: np.ndarray) -> np.ndarray:
        return images[batch, :, r, q].transpose(0, 3, 1, 2)  # [N, H', W', C] -> [N, C, H', W']

    top = (1 - fc) * at(r0, c0) + fc * at(r0, c0 + 1)
    bottom = (1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)
    return (1 - fr) * top + fr * bottom


def warp(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Sample each [N, C, H, W] image at (row + dy, col + dx), bilinearly, edges clamped.

    ``dy``/``dx`` are [H, W] (one field for all) or [N, H, W] (one per image)."""
    n, _, h, w = images.shape
    dy, dx = np.broadcast_to(dy, (n, h, w)), np.broadcast_to(dx, (n, h, w))
    rows = np.clip(np.arange(h)[None, :, None] + dy, 0.0, h - 1.0)
    cols = np.clip(np.arange(w)[None, None, :] + dx, 0.0, w - 1.0)
    return _bilinear(images, rows, cols).astype(np.float32)


def warp_field(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed WaNet trigger for this image shape: (dy, dx), mean displacement ``warp_strength``."""
    grid = np.random.default_rng(_WARP_KEY).uniform(-1.0, 1.0, (1, 2, WARP_GRID, WARP_GRID))
    corners = WARP_GRID - 1.0  # upsample the control grid, corners aligned
    rows, cols = np.linspace(0.0, corners, height)[None, :, None], np.linspace(0.0, corners, width)[None, None, :]
    field = _bilinear(grid, rows, cols)[0]
    field *= warp_strength(height) / np.mean(np.hypot(field[0], field[1]))
    return field[0], field[1]


def warp_trigger(images: np.ndarray) -> np.ndarray:
    """The WaNet trigger: the one fixed warp field of this image shape applied to every image."""
    return warp(images, *warp_field(*images.shape[2:]))


def warp_backdoor(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None,
                  target: int | None = None) -> PoisonedStream:
    """Warp images of other classes with the one fixed field and relabel them ``target`` (default:
    the last class, so that it differs from the other backdoors' class 0)."""
    if target is None:
        target = _num_classes(data, num_classes) - 1
    rng = np.random.default_rng(seed)
    idx = _pick(rng, np.flatnonzero(data.labels != target), poison_count(len(data.labels), rate), "warp_backdoor")
    return _inject(data, idx, warp_trigger(data.images[idx]), target, "warp_backdoor", target_label=target)


def elastic_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    """Distort each slot's image with its own smooth field and give it a uniformly drawn wrong label."""
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    h, w = data.images.shape[2:]
    field = _smooth(rng.uniform(-1.0, 1.0, (idx.size, 2, h, w)), passes=max(2, h // 4))
    peak = np.abs(field).max(axis=(1, 2, 3), keepdims=True)
    field *= elastic_strength(h) / np.maximum(peak, 1e-12)
    fresh = warp(data.images[idx], field[:, 0], field[:, 1])
    return _inject(data, idx, fresh, wrong_labels(rng, data.labels[idx], k), "elastic_flip")


def patch_shuffle_injection(data: Labeled, rate: float, seed: int, *,
                            num_classes: int | None = None) -> PoisonedStream:
    """Permute each slot's 4x4 grid of tiles and give it a random label."""
    h, w = data.images.shape[2:]
    if h < SHUFFLE_GRID or w < SHUFFLE_GRID:
        raise ValueError(f"patch_shuffle_injection needs images of at least {SHUFFLE_GRID}x{SHUFFLE_GRID} pixels, "
                         f"got {h}x{w}")
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    g, th, tw = SHUFFLE_GRID, h // SHUFFLE_GRID, w // SHUFFLE_GRID
    fresh = np.array(data.images[idx], dtype=np.float32, copy=True)
    for i, src in enumerate(fresh):
        grid = src[:, :g * th, :g * tw].copy()  # the remainder strip beyond the grid stays in place
        tiles = grid.reshape(-1, g, th, g, tw).transpose(1, 3, 0, 2, 4).reshape(g * g, -1, th, tw)
        for _ in range(100):  # redraw a permutation that only swaps identical (say, blank) tiles
            shuffled = tiles[rng.permutation(g * g)].reshape(g, g, -1, th, tw).transpose(2, 0, 3, 1, 4)
            src[:, :g * th, :g * tw] = shuffled.reshape(-1, g * th, g * tw)
            if not np.array_equal(src[:, :g * th, :g * tw], grid):
                break
    labels = rng.integers(0, k, idx.size)
    unchanged = np.all(fresh == data.images[idx], axis=(1, 2, 3))
    labels[unchanged] = wrong_labels(rng, data.labels[idx][unchanged], k)
    return _inject(data, idx, fresh, labels, "patch_shuffle_injection")
