"""Attack families added for the union detector's evaluation (numpy only, deterministic).

They target what the first fused detector missed (docs/evaluation.md): samples that are not
drawn from the data distribution at all, and images mixed from two classes whose label is
flipped. None of them is used in training: the detector never sees a synthetic negative, so
these are held-out families for it.

* ``noise_injection``: non-data images of five kinds (uniform noise, Gaussian noise around the
  stream's mean intensity, smooth random fields, salt-and-pepper, intensity gradients), one kind
  per poison, random labels.
* ``shape_injection``: synthetic drawings (filled rectangles, ellipses and straight strokes at
  random places, one to three per image), random labels.
* ``transform_injection``: stream images pushed off the data manifold by an inversion (1 - x),
  an upside-down flip or a 90-degree rotation, random labels.
* ``blend_flip``: mixup of two stream images of different classes, the dominant one weighted
  0.55 to 0.75, labelled with the *minority* image's class (a flip that still has partial
  support in the pixels).
* ``cutmix_flip``: the left part (55 to 70 % of the columns) of one image joined to the right
  part of an image of another class, labelled with the smaller part's class.

Every attack poisons exactly round(rate * N) slots, keeps shapes and dtypes, and returns the
same stream for the same seed.
"""

from __future__ import annotations

import numpy as np

from depois_stream.sim.attacks import Labeled, PoisonedStream, poison_count


def _num_classes(data: Labeled, num_classes: int | None) -> int:
    declared = num_classes or getattr(data, "num_classes", None)
    return int(declared) if declared is not None else int(np.max(data.labels)) + 1


def _slots(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return np.sort(rng.choice(n, size=poison_count(n, rate), replace=False))


def _inject(data: Labeled, idx: np.ndarray, fresh: np.ndarray, labels: np.ndarray | int, attack: str,
            target_label: int | None = None) -> PoisonedStream:
    images = np.array(data.images, dtype=np.float32, copy=True)
    out_labels = np.array(data.labels, dtype=np.int64, copy=True)
    images[idx] = np.clip(fresh, 0.0, 1.0).astype(np.float32)
    out_labels[idx] = labels
    return PoisonedStream.from_slots(data, idx, attack, images=images, labels=out_labels, target_label=target_label)


def _smooth(field: np.ndarray, passes: int) -> np.ndarray:
    """Repeated 3x3 box blur (edge-padded): a cheap smooth random field without scipy."""
    out = field
    for _ in range(passes):
        p = np.pad(out, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        out = sum(p[:, :, dy : dy + out.shape[2], dx : dx + out.shape[3]] for dy in range(3) for dx in range(3)) / 9.0
    return out


def noise_images(rng: np.random.Generator, count: int, shape: tuple[int, int, int], mean: float) -> np.ndarray:
    """``count`` noise-like images, kind drawn uniformly from five."""
    c, h, w = shape
    kinds = rng.integers(0, 5, size=count)
    out = np.empty((count, c, h, w), np.float32)
    for kind in range(5):
        sel = np.flatnonzero(kinds == kind)
        m = sel.size
        if m == 0:
            continue
        if kind == 0:
            x = rng.random((m, c, h, w))
        elif kind == 1:
            x = rng.normal(mean, 0.3, (m, c, h, w))
        elif kind == 2:
            x = _smooth(rng.random((m, c, h, w)), max(1, h // 8))
            lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
            x = (x - lo) / np.maximum(hi - lo, 1e-6)
        elif kind == 3:
            x = (rng.random((m, c, h, w)) < rng.uniform(0.05, 0.3, (m, 1, 1, 1))).astype(np.float64)
        else:
            yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
            a = rng.uniform(-1, 1, (m, 1, 1, 1))
            b = rng.uniform(-1, 1, (m, 1, 1, 1))
            x = 0.5 + a * (yy - 0.5) + b * (xx - 0.5)
            x = np.broadcast_to(x, (m, c, h, w))
        out[sel] = np.clip(x, 0.0, 1.0)
    return out


def shape_images(rng: np.random.Generator, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """``count`` drawings of one to three filled rectangles, ellipses or strokes."""
    c, h, w = shape
    out = np.zeros((count, c, h, w), np.float32)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(count):
        canvas = np.zeros((h, w), np.float32)
        for _ in range(rng.integers(1, 4)):
            kind, level = rng.integers(0, 3), rng.uniform(0.5, 1.0)
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            if kind == 0:
                hh, ww = rng.uniform(0.15, 0.5) * h, rng.uniform(0.15, 0.5) * w
                mask = (np.abs(yy - cy) <= hh / 2) & (np.abs(xx - cx) <= ww / 2)
            elif kind == 1:
                ry, rx = rng.uniform(0.1, 0.35) * h, rng.uniform(0.1, 0.35) * w
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            else:
                angle = rng.uniform(0, np.pi)
                dist = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
                mask = dist <= max(0.5, 0.06 * h)
            canvas = np.maximum(canvas, mask * level)
        out[i] = canvas[None]
    return out


def noise_injection(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    fresh = noise_images(rng, idx.size, tuple(data.images.shape[1:]), float(np.mean(data.images)))
    return _inject(data, idx, fresh, rng.integers(0, k, idx.size), "noise_injection")


def shape_injection(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    fresh = shape_images(rng, idx.size, tuple(data.images.shape[1:]))
    return _inject(data, idx, fresh, rng.integers(0, k, idx.size), "shape_injection")


def transform_injection(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    src = data.images[idx]
    kinds = rng.integers(0, 3, idx.size)
    fresh = np.where((kinds == 0)[:, None, None, None], 1.0 - src,
                     np.where((kinds == 1)[:, None, None, None], src[:, :, ::-1, :], np.rot90(src, 1, axes=(2, 3))))
    unchanged = np.all(fresh == src, axis=(1, 2, 3))  # a symmetric image survives a flip: invert it instead
    fresh[unchanged] = 1.0 - src[unchanged]
    return _inject(data, idx, fresh, rng.integers(0, k, idx.size), "transform_injection")


def _partners(rng: np.random.Generator, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """For each slot, a random stream image of a different class."""
    partner = rng.integers(0, len(labels), idx.size)
    for _ in range(100):
        same = labels[partner] == labels[idx]
        if not same.any():
            break
        partner[same] = rng.integers(0, len(labels), int(same.sum()))
    return partner


def blend_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    partner = _partners(rng, data.labels, idx)
    lam = rng.uniform(0.55, 0.75, (idx.size, 1, 1, 1)).astype(np.float32)
    fresh = lam * data.images[idx] + (1.0 - lam) * data.images[partner]
    return _inject(data, idx, fresh, data.labels[partner], "blend_flip")


def cutmix_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    rng = np.random.default_rng(seed)
    idx = _slots(rng, len(data.labels), rate)
    partner = _partners(rng, data.labels, idx)
    w = data.images.shape[3]
    cut = np.round(rng.uniform(0.55, 0.70, idx.size) * w).astype(int)
    cols = np.arange(w)[None, None, None, :]
    fresh = np.where(cols < cut[:, None, None, None], data.images[idx], data.images[partner])
    return _inject(data, idx, fresh, data.labels[partner], "cutmix_flip")
