"""Every poisoning attack by name: the numpy ones from the runtime plus the torch ones.

The registry is what ``depois-train evaluate --attacks`` selects from. Each entry is called as
``fn(data, rate, seed, **params)``; ``clean_label`` marks attacks whose labels stay correct,
which the evaluation reports apart because a label-conditioned detector cannot be expected to
catch them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from depois_stream.sim.attacks import (
    Labeled,
    PoisonedStream,
    apply_trigger,
    backdoor_patch,
    ood_injection,
    random_flip,
    resize_area,
    systematic_shift,
    targeted_flip,
)
from training.attacks.clean_label import CollisionConfig, feature_collision
from training.attacks.gp import GPConfig, gp_attack

Attack = Callable[..., PoisonedStream]


@dataclass(frozen=True)
class AttackSpec:
    fn: Attack
    clean_label: bool = False
    description: str = ""


ATTACKS: dict[str, AttackSpec] = {
    "random_flip": AttackSpec(random_flip, description="label replaced by a uniformly drawn other class"),
    "targeted_flip": AttackSpec(targeted_flip, description="class 1 relabelled 7 (copies once 1s run out)"),
    "systematic_shift": AttackSpec(systematic_shift, description="label + 1 mod K (GP reference rule)"),
    "backdoor": AttackSpec(backdoor_patch, description="BadNets checkerboard in the corner, label 0"),
    "gp": AttackSpec(gp_attack, description="GP autoencoder poisons (Yang et al. 2017), label + 1 mod K"),
    "ood_injection": AttackSpec(ood_injection, description="images of another data set, random labels"),
    "feature_collision": AttackSpec(
        feature_collision, clean_label=True, description="clean-label feature collision, eps 0.1"
    ),
}

__all__ = [
    "ATTACKS", "Attack", "AttackSpec", "CollisionConfig", "GPConfig", "Labeled", "PoisonedStream",
    "apply_trigger", "backdoor_patch", "feature_collision", "gp_attack", "ood_injection",
    "random_flip", "resize_area", "systematic_shift", "targeted_flip",
]
