"""FitConfig: every knob of a training run, validated once at the CLI/API boundary.

Step counts left at ``None`` take the data set's default from ``DEFAULT_STEPS``; those defaults
are sized so ``depois-train all`` finishes in under 3 minutes on digits and under 15 minutes on
Fashion-MNIST on 2 CPU cores (measured numbers are in the README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from depois_stream.contract import ScoreKind


class Steps(BaseModel):
    """Optimiser steps of each stage. ``critic_steps`` counts WGAN-GP generator updates; each one
    is preceded by 5 critic updates."""

    model_config = ConfigDict(frozen=True)

    auth_steps: int = Field(ge=1)
    gan_steps: int = Field(ge=1)
    critic_steps: int = Field(ge=1)


DEFAULT_STEPS: dict[str, Steps] = {
    "digits": Steps(auth_steps=1500, gan_steps=1500, critic_steps=800),
    "mnist": Steps(auth_steps=1500, gan_steps=3000, critic_steps=1500),
    "mnist-5k": Steps(auth_steps=1500, gan_steps=3000, critic_steps=1500),
    "fashion-mnist": Steps(auth_steps=1500, gan_steps=3000, critic_steps=1500),
}
QUICK_STEPS = Steps(auth_steps=300, gan_steps=300, critic_steps=150)


class FitConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    dataset: str = "digits"
    data_dir: Path | None = None
    download: bool = True
    seed: int = 0
    trusted_fraction: float = Field(0.2, gt=0.0, le=1.0)
    calibration_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    target_fpr: float = Field(0.01, gt=0.0, lt=1.0)
    per_class: bool = True
    score_kind: ScoreKind = "fused"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=0)  # torch intra-op threads on CPU; 0 = torch's default
    auth_steps: int | None = Field(None, ge=1)
    gan_steps: int | None = Field(None, ge=1)
    critic_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=2)
    auth_threshold: float = Field(0.9, ge=0.0, le=1.0)
    aux_weight: float = Field(1.0, ge=0.0)
    n_synthetic: int | None = Field(None, ge=0)
    paper_k: float = 1.0
    out_dir: Path | None = None

    @classmethod
    def quick(cls, **overrides: object) -> FitConfig:
        """Tiny step counts for tests and smoke runs: a usable but not a good detector."""
        base = {**QUICK_STEPS.model_dump(), "n_synthetic": 1000, "device": "cpu"}
        return cls(**{**base, **overrides})

    def steps(self) -> Steps:
        default = DEFAULT_STEPS.get(self.dataset, DEFAULT_STEPS["fashion-mnist"])
        return Steps(
            auth_steps=self.auth_steps or default.auth_steps,
            gan_steps=self.gan_steps or default.gan_steps,
            critic_steps=self.critic_steps or default.critic_steps,
        )
