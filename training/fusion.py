"""Fusing the mimic model's score with the authenticator's label-consistency signal (pure numpy).

Why fuse at all: the critic judges whether a (sample, label) pair looks like clean data, but it is
trained only against a generator's pairs, never against a real image carrying a wrong label, so a
plain critic is a weak label-flip detector (a kNN on the trusted pool beats it). The authenticator
already knows p(label | image); its log-probability is the missing label-consistency signal.

The rule: put each signal on a common scale fixed at the operating point, then take the minimum.
Each signal is centred on its clean calibration median and divided by the distance from that
median down to its clean quantile at the target false-positive rate, so that -1 means "as low as
the lowest ``target_fpr`` of clean samples" for both signals. An OR of two detectors must share
the false-positive budget between them; z-scores (dividing by the standard deviation) did not:
log p(label | image) has a heavy lower tail on clean data (a few ambiguous images get a tiny
probability), its clean 1 % quantile sits tens of standard deviations below its mean, so the
calibrated threshold on min(z, z) fell where only the authenticator could reach it and the critic
never flagged anything the authenticator had not (measured: the fused TPR at 1 % FPR equalled the
authenticator's on every attack, docs/evaluation.md). Matching the scales at the target quantile
lets each signal spend about half of the budget. The minimum is an OR of two
anomaly detectors: a sample is as suspicious as its most suspicious signal, so a perfectly
in-distribution image cannot buy back a wrong label, and an off-manifold image cannot hide behind
a confident classifier. A weighted sum would let one signal mask the other and would need a
weight, which could only be tuned on attack data that the defender does not have. The rule was
fixed before looking at any test data; the boundary is then calibrated on the fused score itself,
so the false-positive rate is controlled whatever the shape of the fused distribution.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

MIN_STD = 1e-6
# The scale is read at the target-FPR quantile, which only measures spread below the median; a
# target FPR near 0.5 would put that quantile on the median and the scale at zero.
MAX_SCALE_QUANTILE = 0.25


class Standardiser(BaseModel):
    """Affine map ``(x - mean) / std`` of one signal; ``mean`` is the centre, ``std`` the scale
    (the names are kept from the first export format, whose graph applies exactly this map)."""

    model_config = ConfigDict(frozen=True)

    mean: float
    std: float

    @classmethod
    def fit_tail(cls, values: np.ndarray, tail: float) -> Standardiser:
        """Median -> 0 and the clean ``tail`` quantile -> -1 (see the module docstring); tails above
        ``MAX_SCALE_QUANTILE`` use that quantile instead."""
        values = np.asarray(values, dtype=np.float64)
        centre = float(np.median(values))
        low = float(np.quantile(values, min(tail, MAX_SCALE_QUANTILE)))
        return cls(mean=centre, std=max(centre - low, MIN_STD))

    def apply(self, values: np.ndarray) -> np.ndarray:
        return ((np.asarray(values, dtype=np.float32) - np.float32(self.mean)) / np.float32(self.std)).astype(
            np.float32
        )


class FusionParams(BaseModel):
    """What the runtime needs to turn the two raw signals into one score."""

    model_config = ConfigDict(frozen=True)

    critic: Standardiser
    auth: Standardiser

    @classmethod
    def fit(cls, critic_raw: np.ndarray, log_p_label: np.ndarray, target_fpr: float) -> FusionParams:
        """Scales matched at the clean ``target_fpr`` quantile of each signal."""
        return cls(critic=Standardiser.fit_tail(critic_raw, target_fpr),
                   auth=Standardiser.fit_tail(log_p_label, target_fpr))


def fuse(z_critic: np.ndarray, z_auth: np.ndarray) -> np.ndarray:
    return np.minimum(z_critic, z_auth).astype(np.float32)


def combined_score(
    critic_raw: np.ndarray, log_p_label: np.ndarray, params: FusionParams, kind: str
) -> np.ndarray:
    """The detector's score of a given kind; higher = more trustworthy.

    ``critic`` is the standardised critic alone (the paper's mimic model), kept so the
    evaluation can compare it with ``fused``."""
    z_critic = params.critic.apply(critic_raw)
    if kind == "critic":
        return z_critic
    if kind == "fused":
        return fuse(z_critic, params.auth.apply(log_p_label))
    raise ValueError(f"unknown score kind {kind!r}; use 'critic' or 'fused'")
