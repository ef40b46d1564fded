"""Data-poisoning attacks that need nothing but numpy.

They live in the runtime package so the demo producer can poison a Kafka stream without
torch; the torch attacks (GP generator, feature collision) live in ``training.attacks``.

Every attack is a pure function ``attack(data, rate, seed, **params) -> PoisonedStream``:
``data`` is anything with ``images`` (float32 [N, C, H, W] in [0, 1]) and ``labels`` (int64
[N]); exactly ``round(rate * N)`` slots are poisoned, the rest are returned untouched, and the
same seed gives the same stream. Keeping the poisons in place (rather than appending them) means
the stream's length and the clean/poison ratio are both known exactly, which is what the
detection metrics need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Labeled(Protocol):
    """What an attack reads: ``training.data.LabeledImages`` satisfies it."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class PoisonedStream:
    """A stream after an attack, with the ground truth the evaluation scores against."""

    images: np.ndarray
    labels: np.ndarray
    is_poison: np.ndarray
    attack: str
    target_label: int | None = None

    @property
    def poison_rate(self) -> float:
        return float(self.is_poison.mean()) if self.is_poison.size else 0.0

    @classmethod
    def from_slots(cls, data: Labeled, slots: np.ndarray, attack: str, images: np.ndarray | None = None,
                   labels: np.ndarray | None = None, target_label: int | None = None) -> PoisonedStream:
        """Wrap the attacked arrays (or ``data``'s own where untouched) with the poison mask."""
        is_poison = np.zeros(len(data.labels), dtype=bool)
        is_poison[slots] = True
        return cls(
            images=np.asarray(data.images if images is None else images, dtype=np.float32),
            labels=np.asarray(data.labels if labels is None else labels, dtype=np.int64),
            is_poison=is_poison,
            attack=attack,
            target_label=target_label,
        )


def poison_count(n: int, rate: float) -> int:
    """How many of ``n`` slots a ``rate`` poisons; rejects rates that cannot be honoured."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    return round(rate * n)


def _num_classes(data: Labeled, num_classes: int | None) -> int:
    if num_classes is not None:
        return num_classes
    declared = getattr(data, "num_classes", None)
    return int(declared) if declared is not None else int(np.max(data.labels)) + 1


def _pick(rng: np.random.Generator, candidates: np.ndarray, n: int, attack: str) -> np.ndarray:
    if n > candidates.size:
        raise ValueError(f"{attack}: needs {n} eligible samples but the data has {candidates.size}")
    return np.sort(rng.choice(candidates, size=n, replace=False))


def wrong_labels(rng: np.random.Generator, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A uniformly drawn *other* class for each label (one draw of ``rng`` per label)."""
    return (labels + rng.integers(1, num_classes, size=labels.size)) % num_classes


def random_flip(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    """Each poisoned sample gets a label drawn uniformly from the *other* classes."""
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _pick(rng, np.arange(len(data.labels)), poison_count(len(data.labels), rate), "random_flip")
    labels = data.labels.copy()
    labels[idx] = wrong_labels(rng, labels[idx], k)
    return PoisonedStream.from_slots(data, idx, "random_flip", labels=labels)


def systematic_shift(data: Labeled, rate: float, seed: int, *, num_classes: int | None = None) -> PoisonedStream:
    """label -> label + 1 mod K: the label rule of the reference GP attack code."""
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _pick(rng, np.arange(len(data.labels)), poison_count(len(data.labels), rate), "systematic_shift")
    labels = data.labels.copy()
    labels[idx] = (labels[idx] + 1) % k
    return PoisonedStream.from_slots(data, idx, "systematic_shift", labels=labels)


def targeted_flip(data: Labeled, rate: float, seed: int, *, source: int = 1, target: int = 7) -> PoisonedStream:
    """Teach the model that class ``source`` is ``target``.

    The attacker relabels ``source`` samples as ``target``; once the stream's own ``source``
    samples run out (rates above that class's share), further slots are overwritten by copies
    of ``source`` images labelled ``target``, so every rate poisons exactly round(rate * N) slots.
    """
    if source == target:
        raise ValueError("targeted_flip: source and target classes must differ")
    rng = np.random.default_rng(seed)
    n = poison_count(len(data.labels), rate)
    own = np.flatnonzero(data.labels == source)
    if own.size == 0 and n > 0:
        raise ValueError(f"targeted_flip: the data has no sample of source class {source}")
    flipped = rng.permutation(own)[:n]
    injected = _pick(rng, np.flatnonzero(data.labels != source), n - flipped.size, "targeted_flip")
    images = data.images.copy()
    if injected.size:
        images[injected] = data.images[rng.choice(own, size=injected.size)]
    idx = np.sort(np.concatenate([flipped, injected]))
    labels = data.labels.copy()
    labels[idx] = target
    return PoisonedStream.from_slots(data, idx, "targeted_flip", images=images, labels=labels, target_label=target)


def trigger_size(height: int) -> int:
    """Side of the BadNets patch: 2 px on 8x8 digits, 4 px on 28x28 images."""
    return max(2, height // 7)


def apply_trigger(images: np.ndarray) -> np.ndarray:
    """Stamp the BadNets checkerboard into the bottom-right corner (a copy, input untouched).

    The corner is background in every data set here, so a clean model never sees the pattern
    and a backdoored one can key on it; the evaluation stamps test images to measure the
    attack success rate.
    """
    out = np.array(images, dtype=np.float32, copy=True)
    s = trigger_size(out.shape[-2])
    checker = (np.indices((s, s)).sum(axis=0) % 2 == 0).astype(np.float32)
    out[..., -s - 1 : -1, -s - 1 : -1] = checker
    return out


def backdoor_patch(data: Labeled, rate: float, seed: int, *, target: int = 0) -> PoisonedStream:
    """BadNets: stamp the trigger on non-``target`` samples and relabel them ``target``."""
    rng = np.random.default_rng(seed)
    idx = _pick(rng, np.flatnonzero(data.labels != target), poison_count(len(data.labels), rate), "backdoor")
    images = data.images.copy()
    images[idx] = apply_trigger(images[idx])
    labels = data.labels.copy()
    labels[idx] = target
    return PoisonedStream.from_slots(data, idx, "backdoor", images=images, labels=labels, target_label=target)


def resize_area(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-downsample [N, C, H, W] by zero-padding to a multiple of the output and block-averaging.

    28x28 -> 8x8 pads to 32x32 and averages 4x4 blocks, which is how scikit-learn's digits were
    made from 32x32 bitmaps, so injected MNIST/Fashion-MNIST images look like digits-sized data.
    """
    n, c, h, w = images.shape
    fy, fx = -(-h // height), -(-w // width)
    ph, pw = fy * height - h, fx * width - w
    padded = np.pad(images, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    return padded.reshape(n, c, height, fy, width, fx).mean(axis=(3, 5)).astype(np.float32)


def ood_injection(data: Labeled, rate: float, seed: int, *, donor: np.ndarray | None = None,
                  num_classes: int | None = None) -> PoisonedStream:
    """Overwrite slots with images from another distribution under arbitrary labels.

    ``donor`` is [M, C, H, W] in [0, 1] from another data set (resized here if needed); with no
    donor the attacker injects uniform noise, which is the fallback when no second data set is
    on disk.
    """
    k = _num_classes(data, num_classes)
    rng = np.random.default_rng(seed)
    idx = _pick(rng, np.arange(len(data.labels)), poison_count(len(data.labels), rate), "ood_injection")
    shape = data.images.shape[1:]
    if donor is None:
        fresh = rng.random((idx.size, *shape), dtype=np.float32)
    else:
        if donor.shape[1] != shape[0]:
            raise ValueError(f"ood_injection: donor has {donor.shape[1]} channels, data has {shape[0]}")
        if donor.shape[2:] != shape[1:]:
            donor = resize_area(donor, shape[1], shape[2])
        fresh = donor[rng.choice(len(donor), size=idx.size, replace=idx.size > len(donor))]
    images = data.images.copy()
    images[idx] = fresh
    labels = data.labels.copy()
    labels[idx] = rng.integers(0, k, size=idx.size)
    return PoisonedStream.from_slots(data, idx, "ood_injection", images=images, labels=labels)
