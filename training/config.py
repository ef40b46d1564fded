"""FitConfig: every knob of a training run, validated once at the CLI/API boundary.

It is also the single source of truth for the ``depois-train fit`` and ``all`` options: the CLI
derives each option's name, type, default and help from the field (``training/cli.py``), so a
setting is declared once, here.

Step counts left at ``None`` take the data set's default from ``DEFAULT_STEPS``; those defaults
are sized so ``depois-train all`` finishes in under 3 minutes on digits and under 12 minutes on
Fashion-MNIST on 2 CPU cores with one torch thread (measured numbers in docs/evaluation.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.crossfit import CROSSFIT_FOLDS
from training.evidence import FAMILIES, MEMBERS, families_within
from training.weighting import Weighting


class Steps(BaseModel):
    """Optimiser steps of each stage. ``critic_steps`` counts WGAN-GP generator updates; each one
    is preceded by 5 critic updates."""

    model_config = ConfigDict(frozen=True)

    auth_steps: int = Field(ge=1)
    gan_steps: int = Field(ge=1)
    critic_steps: int = Field(ge=1)
    mlp_steps: int = Field(1500, ge=1)  # the mlp_margin member's pixel MLP (batch 128, as the trusted-clf baseline)


DEFAULT_STEPS: dict[str, Steps] = {
    "digits": Steps(auth_steps=800, gan_steps=1500, critic_steps=800),
    "mnist": Steps(auth_steps=1500, gan_steps=3000, critic_steps=1500),
    "mnist-5k": Steps(auth_steps=1500, gan_steps=3000, critic_steps=1500),
    "fashion-mnist": Steps(auth_steps=1500, gan_steps=3000, critic_steps=1500),
}
QUICK_STEPS = Steps(auth_steps=300, gan_steps=300, critic_steps=150, mlp_steps=200)


def _cli(flag: str) -> dict[str, str]:
    """Marks a field whose command-line flag is not simply ``--field-name``."""
    return {"cli": flag}


MAX_SEED = 2**32 - 1  # numpy's seeds are uint32


# The options that pick a trusted pool out of a registered data set, by field name.
REGISTRY_FIELDS = ("dataset", "data_dir", "trusted_fraction")


def own_pool_clash(given: Iterable[str]) -> str | None:
    """What is wrong with giving these ``REGISTRY_FIELDS`` beside --trusted-npz, or None."""
    given = set(given)
    clashing = ["--" + name.replace("_", "-") for name in REGISTRY_FIELDS if name in given]
    if not clashing:
        return None
    return (f"{' and '.join(clashing)} choose a pool from a registered data set, and "
            "--trusted-npz is the whole trusted pool: give one or the other")


class FitConfig(BaseModel):
    # NaN and infinity reach torch as weights and numpy as fractions, and fail deep in training
    # with a misleading hint; refused here with the option's name.
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    dataset: str = Field("digits", description="Data set (see `depois-train datasets`).")
    data_dir: Path | None = Field(None, description="Folder with the IDX .gz files (mnist, mnist-5k test, "
                                                    "fashion-mnist; not digits, nor with --trusted-npz).")
    trusted_npz: Path | None = Field(
        None, description="Your own trusted pool instead of --dataset: an .npz file with `images` (uint8 0..255 or "
                          "float in [0, 1], [N, C, H, W] or [N, H, W]) and `labels` (integers 0..K-1, every class "
                          "present), made e.g. with np.savez('pool.npz', images=x, labels=y). Every sample is "
                          "trusted (--trusted-fraction does not apply) and exact repeats are dropped; images of at least 4 x 4, "
                          "at least 2 classes with 2 or more samples each (10 or more keep a class's false alarms "
                          "near the target); `evaluate` needs a registered data set. The images' "
                          "shape and the class count become the model's input contract, the file's name its "
                          "data set name. Step counts default to Fashion-MNIST's; the cGAN synthesises 4x the "
                          "pool. Check that the pool covers every style the stream will carry: the boundary is "
                          "read off it (a small pool: see the calibration warning, then `depois-train "
                          "recalibrate` on vetted stream samples).")
    download: bool = Field(True, description="Download missing IDX files (--offline: a missing file is an error).",
                           json_schema_extra=_cli("--download/--offline"))
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of every random choice; CPU runs are reproducible.")
    trusted_fraction: float = Field(0.2, gt=0.0, le=1.0, description="Share of the train split the defender trusts (not with --trusted-npz).")
    calibration_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of the trusted pool held out for calibration when the pool is "
                                         "large enough for a holdout (see --folds).")
    folds: int | None = Field(
        None, ge=1, le=20, description="Calibration plan: 1 = one holdout split, k >= 2 = k-fold cross-fitting "
                                       "(every trusted sample scored out of fold); default: holdout when it holds "
                                       f">= 10 / target-fpr samples, else {CROSSFIT_FOLDS} folds.")
    target_fpr: float = Field(0.01, gt=0.0, lt=1.0, description="Clean false-positive rate the boundary is set to.")
    per_class: bool = Field(True, description="One threshold per class where a class has >= 1 / target-fpr "
                                              "calibration samples (else the global one).",
                            json_schema_extra=_cli("--per-class/--global"))
    members: tuple[str, ...] = Field(MEMBERS, description=f"Evidence members of the union, comma-separated, from "
                                                          f"{','.join(MEMBERS)}.")
    critic_weight: float = Field(
        0.1, gt=0.0, le=1.0,
        description="The critic's share of the false-alarm budget relative to each other member (weighted "
                    "min-p: score = log min_j p_j / w_j, weights summing to the column count). 1 = plain min-p. "
                    "Default 0.1: the critic fires on few poisons that no other member catches, and an equal "
                    "share let it dilute them (docs/method.md).")
    agreement_share: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="Share of each evidence family's false-alarm budget spent on its agreement column "
                    "(Fisher's sum of the family members' log p-values, calibrated as its own p-value), "
                    "the rest on the members one by one. Families: margin+knn+mahalanobis and "
                    "density+pixel_knn+pixel_mahalanobis. 0 = no agreement columns. Default 0.5: an even "
                    "split, so a member that alone sees a poison far out still fires, and members that "
                    "each see it a little add up (docs/method.md).")
    weight_search: bool = Field(
        True, description="Choose the columns' weights at fit time (--fixed-weights keeps the configured split). 72 "
                          "candidate splits of the false-alarm budget (critic weight, agreement share, label / pixel / "
                          "novelty multipliers; training/weighting.py) are calibrated on the clean out-of-sample "
                          "scores and scored on synthetic negatives made from held-out trusted samples (label flips, "
                          "graded pixel noise, patch shuffles, cross-class mixes); only splits that flag no kind "
                          "less often than the configured one compete, and the configured --critic-weight and "
                          "--agreement-share stay unless the best, judged on negatives that did not pick it, flags "
                          "more by over 2 standard errors. Runs only with >= 10 / target-fpr calibration samples "
                          "(Fashion-MNIST's 2,400, MNIST's 1,000 of mnist-5k; digits' 252 keep the configured split). "
                          "On by default since stop 33: on mnist-5k, a data set no design choice was made on, it "
                          "raised the mean TPR at 1 % FPR of all three suites by 3 to 5 points and the F1 at the "
                          "deployed boundary from 75 to 92-94 %; on Fashion-MNIST it raised the development suite "
                          "86.5 -> 88.3 % and left the held-out suites level (83.0 -> 83.1 %; stop 25, three seeds, "
                          "where its pick cost the blended backdoor 13 points; a fresh seed-0 fit picks a "
                          "neighbouring split that does not: docs/evaluation.md).",
        json_schema_extra=_cli("--weight-search/--fixed-weights"))
    gate_pixel_knn: bool = Field(
        False, description="Opt-in: pixel_knn (if listed in --members) joins the union only where its "
                           "out-of-fold accuracy on the trusted pool is within 2 standard errors of the "
                           "authenticator's. Off by default: on Fashion-MNIST the gate left pixel_knn out and "
                           "cost 5.7 TPR points on the held-out attack families (docs/evaluation.md).",
        json_schema_extra=_cli("--gate-pixel-knn/--always-pixel-knn"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (CUDA if present), cpu or cuda.")
    threads: int = Field(1, ge=0, le=1024, description="torch CPU threads; 1 is robust on a shared box, 0 = torch's default.")
    fold_workers: int = Field(1, ge=0, le=256, description="Background processes that train the cross-fit folds whose model "
                                                   "is not shipped, while this one trains the cGAN and the mimic "
                                                   "model. The detector is the same bit for bit (training/folds.py); "
                                                   "1 suits a 2-core machine, 0 = every fold in this process. The "
                                                   "folds also stay here on a GPU, on one CPU and with --threads 0 "
                                                   "(all cores already busy).")
    auth_steps: int | None = Field(None, ge=1, le=10_000_000, description="Authenticator steps (default: per data set, "
                                                           "training/config.py).")
    gan_steps: int | None = Field(None, ge=1, le=10_000_000, description="cGAN steps (default: per data set).")
    critic_steps: int | None = Field(None, ge=1, le=10_000_000, description="WGAN-GP generator steps, 5 critic steps each "
                                                             "(default: per data set).")
    mlp_steps: int | None = Field(None, ge=1, le=10_000_000, description="Steps of the mlp_margin member's pixel MLP, batch 128 "
                                                          "(default: 1500, the trusted-clf baseline's).")
    batch_size: int = Field(64, ge=2, le=65536, description="Minibatch size of all stages.")
    auth_threshold: float = Field(0.9, ge=0.0, le=1.0, description="Keep a synthetic sample iff "
                                                                    "p_auth(label|x) >= this.")
    aux_weight: float = Field(1.0, ge=0.0, le=1e6, description="Weight of the authenticator's loss in the cGAN generator.")
    n_synthetic: int | None = Field(None, ge=0, le=10_000_000, description="Synthetic samples to keep (default: train size - "
                                                             "trusted size; 4x the pool with --trusted-npz).")
    paper_k: float = Field(1.0, description="k of the paper's mean - k * std boundary (recorded, not used).")
    out_dir: Path | None = Field(None, description="Output folder.", json_schema_extra=_cli("--out"))

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from training.data import DATASETS

        if v not in DATASETS:
            raise ValueError(f"unknown data set {v!r}; choose one of {', '.join(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _own_pool_replaces_the_registry(self) -> FitConfig:
        """--trusted-npz is the whole trusted pool: flags that pick a pool out of a registered
        data set would be silently ignored, so they are refused (here when they differ from
        their defaults; the command line also refuses them given at their defaults)."""
        if self.trusted_npz is not None:
            fields = type(self).model_fields
            problem = own_pool_clash(name for name in REGISTRY_FIELDS
                                     if getattr(self, name) != fields[name].default)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def data_name(self) -> str:
        """The data set's name in the model card and the model version: the registered name, or
        the --trusted-npz file's stem (characters a Kafka header or file name would trip on
        replaced)."""
        if self.trusted_npz is None:
            return self.dataset
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", self.trusted_npz.stem)[:48].strip("-.") or "own"
        from training.data import DATASETS

        return f"own-{name}" if name in DATASETS else name  # a pool file called mnist.npz is not MNIST

    @field_validator("members", mode="before")
    @classmethod
    def _split_members(cls, v: object) -> object:
        if isinstance(v, str):
            v = tuple(m.strip() for m in v.split(",") if m.strip())
        return v

    @field_validator("members")
    @classmethod
    def _known_members(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in MEMBERS]
        if unknown or not v:
            raise ValueError(f"members must be a non-empty subset of {','.join(MEMBERS)}; got {','.join(v) or 'none'}")
        if len(set(v)) != len(v):
            raise ValueError(f"members repeat: {','.join(v)}")
        return tuple(m for m in MEMBERS if m in v)  # canonical order = the evidence columns' order

    @classmethod
    def quick(cls, **overrides: object) -> FitConfig:
        """Tiny step counts for tests and smoke runs: a usable but not a good detector."""
        base = {**QUICK_STEPS.model_dump(), "n_synthetic": 1000, "device": "cpu"}
        return cls(**{**base, **overrides})

    def gated_members(self, pixel_knn_passes: bool, mlp_margin_joins: bool = True) -> tuple[str, ...]:
        """``members`` after the pixel_knn gate (``training.evidence.AccuracyGate``) and without
        ``mlp_margin`` where it does not join (``mlp_margin_joins``)."""
        members = self.members
        if self.gate_pixel_knn and not pixel_knn_passes and len(members) > 1:
            members = tuple(m for m in members if m != "pixel_knn")
        return tuple(m for m in members if m != "mlp_margin" or mlp_margin_joins)

    def mlp_margin_joins(self, calibration_samples: int) -> bool:
        """Whether the ``mlp_margin`` member is trained and joins the union: when listed in
        ``members`` and the calibration set puts at least ten samples below the target quantile
        (``training.union.is_order_statistic``: 1,000 at 1 %, where the budget search can compare
        splits at an equal false-positive rate). On smaller pools (the 252 trusted digits, 227
        per fold to train a pixel MLP on) it was measured to cost: digits seed 2 lost 1.6 to 1.8
        points on three suites and its realised FPR rose from 1.4 to 2.0 %, seeds 0 and 1 moved
        by -1.6 to +0.2 (docs/evaluation.md, stop 36)."""
        from training.union import is_order_statistic

        return "mlp_margin" in self.members and is_order_statistic(calibration_samples, self.target_fpr)

    def agreements(self, members: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The agreement columns of a union of ``members``: each family (``FAMILIES``) with two
        or more of them; none when ``agreement_share`` is 0."""
        return families_within(FAMILIES.items(), members) if self.agreement_share > 0.0 else ()

    def weighting(self) -> Weighting:
        """The configured split of the budget (``training.weighting.Weighting``): ``critic_weight``
        and ``agreement_share``, every family multiplier 1. ``fit`` uses it unless
        ``weight_search`` is on and finds a clearly better one on synthetic negatives."""
        return Weighting(self.critic_weight, self.agreement_share)

    def relative_weights(self, members: tuple[str, ...]) -> dict[str, float]:
        """Each column's weight before scaling (``training.conformal.member_weights``) under the
        configured split: the critic ``critic_weight``; in a family with an agreement column, each
        member ``1 - agreement_share`` and the agreement ``agreement_share`` times the family's
        size, so the family keeps the budget of its members; every other member 1."""
        return self.weighting().relative(self.agreements(members))

    def steps(self) -> Steps:
        default = DEFAULT_STEPS.get(self.dataset if self.trusted_npz is None else "", DEFAULT_STEPS["fashion-mnist"])
        return Steps(
            auth_steps=self.auth_steps or default.auth_steps,
            gan_steps=self.gan_steps or default.gan_steps,
            critic_steps=self.critic_steps or default.critic_steps,
            mlp_steps=self.mlp_steps or default.mlp_steps,
        )
