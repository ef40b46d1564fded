"""A clean-label attack: feature collision (Shafahi et al. 2018, "Poison Frogs!").

Poisons keep their correct labels; only their pixels move, by at most ``epsilon`` per pixel, so
that a surrogate network's penultimate features collide with those of one chosen target image
of another class. A model trained on them learns to put that region of feature space under the
poisons' label and misclassifies the target. Because every (image, label) pair is plausible, a
label-conditioned detector such as De-Pois is not expected to catch all of it; the evaluation
reports this attack apart from the others.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from depois_stream.sim.attacks import Labeled, PoisonedStream, poison_count
from training.downstream import ClassifierConfig, one_thread, train_classifier


class CollisionConfig(BaseModel):
    """``epsilon`` is the L-inf budget per pixel; projected Adam keeps every poison inside it."""

    target_class: int = 0
    epsilon: float = 0.1
    steps: int = 150
    lr: float = 0.01
    surrogate: ClassifierConfig = ClassifierConfig(hidden=128, steps=400)


def collide(
    features: nn.Module, bases: torch.Tensor, target: torch.Tensor, epsilon: float, steps: int, lr: float
) -> torch.Tensor:
    """Move ``bases`` within the epsilon box towards ``target``'s features (projected Adam)."""
    goal = features(target).detach()
    delta = torch.zeros_like(bases, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((features(bases + delta) - goal) ** 2).sum(dim=1).mean().backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(-epsilon, epsilon)
            delta.copy_((bases + delta).clamp(0.0, 1.0) - bases)
    return (bases + delta).detach()


def feature_collision(
    data: Labeled, rate: float, seed: int, *, num_classes: int | None = None,
    config: CollisionConfig | None = None,
) -> PoisonedStream:
    """Perturb round(rate * N) samples not of ``target_class`` (labels unchanged).

    The target instance is a seeded pick among the stream's ``target_class`` images; the
    surrogate is trained on the stream itself, as an attacker who intercepts it would.
    """
    config = config or CollisionConfig()
    k = num_classes or getattr(data, "num_classes", None) or int(np.max(data.labels)) + 1
    rng = np.random.default_rng(seed)
    n = len(data.labels)
    candidates = np.flatnonzero(data.labels != config.target_class)
    count = poison_count(n, rate)
    if count > candidates.size:
        raise ValueError(f"feature_collision: needs {count} bases but only {candidates.size} are eligible")
    idx = np.sort(rng.choice(candidates, size=count, replace=False))
    target_idx = rng.choice(np.flatnonzero(data.labels == config.target_class))
    surrogate = train_classifier(data.images, data.labels, k, seed, config.surrogate)
    features = surrogate[:-1]  # drop the logits layer: collide in the penultimate space
    for p in features.parameters():
        p.requires_grad_(False)
    images = np.array(data.images, dtype=np.float32, copy=True)
    if idx.size:
        x = torch.from_numpy(np.ascontiguousarray(images))
        with one_thread():
            poisons = collide(features, x[idx], x[target_idx : target_idx + 1], config.epsilon, config.steps, config.lr)
        images[idx] = poisons.numpy()
    return PoisonedStream.from_slots(data, idx, "feature_collision", images=images)
