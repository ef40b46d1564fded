"""FittedDetector: the trained De-Pois detector as one object (alibi-detect style).

It scores with torch for the two networks and numpy for everything after them (fusion, boundary,
p-values). The exported ONNX graph re-implements that tail in torch ops; keeping the two paths
separate is what makes the export's parity check a real check rather than a comparison of a
module with itself.

Persistence: ``detector.pt`` holds only tensors and state dicts and is read back with
``torch.load(weights_only=True)`` (nothing is ever unpickled); ``detector.json`` holds the config,
metadata, fusion constants and the report.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from depois_stream.contract import SCHEMA_VERSION, Boundary, ModelMetadata, utc_now_iso
from training.calibration import conformal_p_values, fit_boundary, flagged
from training.config import FitConfig
from training.data import LabeledImages
from training.fusion import FusionParams, combined_score
from training.models import Authenticator, Critic
from training.torchutil import batched, resolve_device

WEIGHTS_FILE = "detector.pt"
STATE_FILE = "detector.json"
_DATA_PARTS = ("calibration", "trusted", "synthetic_preview")


def weights_sha256(authenticator: Authenticator, critic: Critic) -> str:
    """Digest of the two networks' parameters (stable across save/load, unlike file bytes)."""
    h = hashlib.sha256()
    for module in (authenticator, critic):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FittedDetector:
    """Trained networks + fusion constants + calibrated boundary, ready to score or export."""

    def __init__(
        self,
        authenticator: Authenticator,
        critic: Critic,
        fusion: FusionParams,
        metadata: ModelMetadata,
        config: FitConfig,
        calibration: LabeledImages,
        trusted: LabeledImages,
        synthetic_preview: LabeledImages,
        report: dict | None = None,
        device: str = "cpu",
    ):
        self.device = resolve_device(device)
        self.authenticator = authenticator.to(self.device).eval()
        self.critic = critic.to(self.device).eval()
        self.fusion = fusion
        self.metadata = metadata
        self.config = config
        self.calibration = calibration
        self.trusted = trusted
        self.synthetic_preview = synthetic_preview
        self.report = report or {}
        self.reference_scores = np.sort(self.score(calibration.images, calibration.labels))

    # ------------------------------------------------------------------ scoring

    def critic_score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Raw mimic-model output (the paper's score, unstandardised)."""
        return batched(self.critic, images, labels, self.device)

    def log_p_label(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Authenticator log p(label | image): the label-consistency signal."""
        return batched(self.authenticator.log_p_label, images, labels, self.device)

    def score(self, images: np.ndarray, labels: np.ndarray, kind: str | None = None) -> np.ndarray:
        """float32 [N], higher = more trustworthy; ``kind`` defaults to the exported one."""
        kind = kind or self.metadata.score_kind
        log_p = self.log_p_label(images, labels) if kind == "fused" else np.zeros(len(labels), np.float32)
        return combined_score(self.critic_score(images, labels), log_p, self.fusion, kind)

    def predict(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """bool [N]: True = poisoned (score below the boundary of the sample's label)."""
        return flagged(self.score(images, labels), labels, self.metadata.boundary)

    def p_value(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return conformal_p_values(self.score(images, labels), self.reference_scores)

    def infer_threshold(
        self, images: np.ndarray, labels: np.ndarray, target_fpr: float, per_class: bool
    ) -> Boundary:
        """Recalibrate boundary and p-value reference on clean data; returns the new boundary.

        Use it when the stream's clean data differs from the calibration split: the networks stay,
        only the operating point moves."""
        scores = self.score(images, labels)
        boundary, fell_back = fit_boundary(
            scores, labels, self.metadata.num_classes, target_fpr, per_class, self.config.paper_k
        )
        version = model_version(self.config, self.metadata.weights_sha256, self.fusion, boundary)
        self.metadata = self.metadata.model_copy(
            update={"boundary": boundary, "target_fpr": target_fpr, "model_version": version})
        self.reference_scores = np.sort(scores)
        self.report["per_class_fallback"] = fell_back
        self.report["calibration_fpr"] = float(flagged(scores, labels, boundary).mean())
        return boundary

    # ------------------------------------------------------------------ persistence

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, object] = {
            "authenticator": self.authenticator.state_dict(),
            "critic": self.critic.state_dict(),
        }
        for part in _DATA_PARTS:
            data: LabeledImages = getattr(self, part)
            tensors[f"{part}_images"] = torch.from_numpy(data.images)
            tensors[f"{part}_labels"] = torch.from_numpy(data.labels)
        buf = io.BytesIO()
        torch.save(tensors, buf)
        (out / WEIGHTS_FILE).write_bytes(buf.getvalue())
        state = {
            "config": self.config.model_dump(mode="json"),
            "metadata": json.loads(self.metadata.model_dump_json(by_alias=True)),
            "fusion": self.fusion.model_dump(),
            "report": self.report,
        }
        (out / STATE_FILE).write_text(json.dumps(state, indent=2))
        return out

    @classmethod
    def load(cls, out_dir: str | Path, device: str = "cpu") -> FittedDetector:
        out = Path(out_dir)
        state = json.loads((out / STATE_FILE).read_text())
        tensors = torch.load(out / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        metadata = ModelMetadata.model_validate(state["metadata"])
        shape, k = tuple(metadata.input_shape), metadata.num_classes
        authenticator, critic = Authenticator(shape, k), Critic(shape, k)
        authenticator.load_state_dict(tensors["authenticator"])
        critic.load_state_dict(tensors["critic"])
        parts = {
            part: LabeledImages(tensors[f"{part}_images"].numpy(), tensors[f"{part}_labels"].numpy())
            for part in _DATA_PARTS
        }
        return cls(
            authenticator, critic, FusionParams.model_validate(state["fusion"]), metadata,
            FitConfig.model_validate(state["config"]), report=state["report"], device=device, **parts,
        )


def model_version(config: FitConfig, weights_sha: str, fusion: FusionParams, boundary: Boundary) -> str:
    """Names everything that decides a verdict, not just the weights.

    Quarantine headers and the audit trail cite this string, so two models that share networks
    but not fusion constants or boundary (a re-scaled fusion, an ``infer_threshold``) must not
    share it."""
    h = hashlib.sha256(weights_sha.encode())
    h.update(config.score_kind.encode())
    h.update(fusion.model_dump_json().encode())
    h.update(boundary.to_json().encode())
    return f"{config.dataset}-seed{config.seed}-{h.hexdigest()[:12]}"


def build_metadata(
    config: FitConfig, boundary: Boundary, shape: tuple[int, int, int], num_classes: int, sha: str,
    fusion: FusionParams,
) -> ModelMetadata:
    created = utc_now_iso()
    return ModelMetadata(
        schema_version=SCHEMA_VERSION,
        boundary=boundary,
        target_fpr=config.target_fpr,
        input_shape=shape,
        num_classes=num_classes,
        dataset=config.dataset,
        score_kind=config.score_kind,
        model_version=model_version(config, sha, fusion, boundary),
        created_at=created,
        weights_sha256=sha,
        has_p_value=True,
    )
