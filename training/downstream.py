"""The model the poisons are aimed at: what a victim trains on the stream it receives.

Detection rates alone do not say whether a defense is worth running; the question a user has is
"does my model come out as good as if nobody had attacked?". This module trains one small
classifier per stream (poisoned, depois-filtered, clean) and measures test accuracy and, for a
backdoor, the share of triggered test images that land on the attacker's class. The attacks
reuse the same classifier as their surrogate, i.e. the attacker knows the victim's architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from training.data import LabeledImages
from training.torchutil import adam, sample_index, seeded


class ClassifierConfig(BaseModel):
    """Optimisation budget of the victim classifier; fixed steps so every stream gets the same."""

    hidden: int = 256
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread for the block.

    A step of these small MLPs is microseconds of work; with two intra-op threads every step
    pays a cross-thread handshake, and on a busy 2-core machine that made training 20x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_classifier(input_dim: int, num_classes: int, hidden: int) -> nn.Sequential:
    """A two-hidden-layer MLP: strong enough to memorise poisons, which is the point."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(input_dim, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
    config: ClassifierConfig,
) -> nn.Sequential:
    """Fit the MLP with Adam on random minibatches; deterministic under ``seed``."""
    gen = seeded(seed)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model = make_classifier(int(np.prod(images.shape[1:])), num_classes, config.hidden)
    opt = adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    with one_thread():
        for _ in range(config.steps):
            batch = sample_index(len(y), config.batch_size, gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Softmax probabilities [N, K] as float64 numpy (what cleanlab and the baselines read)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out = [torch.softmax(model(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).double().numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict_proba(model, images).argmax(axis=1) == labels))


def attack_success_rate(model: nn.Module, images: np.ndarray, labels: np.ndarray, target: int,
                        trigger: Callable[[np.ndarray], np.ndarray]) -> float:
    """Share of test images not of class ``target``, stamped with the backdoor's own ``trigger``
    (``AttackSpec.trigger``), that the model assigns to ``target``."""
    keep = labels != target
    predicted = predict_proba(model, trigger(images[keep])).argmax(axis=1)
    return float(np.mean(predicted == target))


class DownstreamResult(BaseModel):
    """Mean over the victim seeds: one seed on a few hundred held-out images is too noisy to
    judge a 1-point gap."""

    accuracy: float
    backdoor_success: float | None = None
    train_size: int
    seeds: int


def victim_result(
    train_images: np.ndarray, train_labels: np.ndarray, test: LabeledImages, num_classes: int, seeds: list[int],
    config: ClassifierConfig, backdoor: tuple[int, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> DownstreamResult:
    """Train one victim per seed on a stream and score them on the held-out ``test`` images;
    ``backdoor`` = (target class, trigger) adds the attack success rate."""
    acc, asr = [], []
    for seed in seeds:
        model = train_classifier(train_images, train_labels, num_classes, seed, config)
        acc.append(accuracy(model, test.images, test.labels))
        if backdoor is not None:
            asr.append(attack_success_rate(model, test.images, test.labels, *backdoor))
    return DownstreamResult(
        accuracy=float(np.mean(acc)),
        backdoor_success=float(np.mean(asr)) if asr else None,
        train_size=len(train_labels),
        seeds=len(seeds),
    )
