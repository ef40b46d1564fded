"""FittedDetector: the trained union detector as one object (alibi-detect style).

It scores with torch for the two networks and numpy for everything after them (member formulas,
standardisation, p-values, weighted min-p, boundary). The exported ONNX graph re-implements that tail in
torch ops; keeping the two paths separate is what makes the export's parity check a real check
rather than a comparison of a module with itself.

Persistence: ``detector.pt`` holds only tensors and state dicts and is read back with
``torch.load(weights_only=True)`` (nothing is ever unpickled); ``detector.json`` holds the config,
metadata and report. The member references (kNN, Mahalanobis, PCA) and the union calibration are
not stored but rebuilt at load from the stored pool, networks and out-of-sample calibration
scores: they are deterministic functions of those, so there is one source of truth.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from depois_stream.contract import SCHEMA_VERSION, Boundary, ModelMetadata, utc_now_iso
from training.config import FitConfig
from training.conformal import member_weights
from training.crossfit import CROSSFIT_FOLDS as CV_FOLDS, CalibrationPlan
from training.data import LabeledImages
from training.downstream import make_classifier
from training.evidence import (
    MEMBERS,
    References,
    families_within,
    lone_agreement_only_as_plain,
    member_scores,
    neighbours,
)
from training.models import Authenticator, Critic
from training.torchutil import batched, resolve_device
from training.union import UnionCalibration, calibrate_union, column_names

WEIGHTS_FILE = "detector.pt"
STATE_FILE = "detector.json"


# infer_threshold keeps this many of its samples (a seeded choice) for the export's parity check
# and the int8 gate, which must look where the new boundary sits: 4,096 28 x 28 images are 13 MB.
MAX_PARITY_SAMPLES = 4096


def weights_sha256(authenticator: Authenticator, critic: Critic, mlp: nn.Module | None = None) -> str:
    """Digest of the networks' parameters (stable across save/load, unlike file bytes); a detector
    without the mlp_margin member hashes as before that member existed."""
    h = hashlib.sha256()
    for module in (authenticator, critic, *([mlp] if mlp is not None else [])):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def network_outputs(authenticator: Authenticator, critic: Critic | None, images: np.ndarray, labels: np.ndarray,
                    device: torch.device, batch: int = 2048, mlp: nn.Module | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(critic score [N], logits [N, K], embedding [N, D], MLP logits [N, K] or None) in float32,
    in chunks. The MLP runs on the CPU, where it was trained: it is a few matrix products."""
    crit, logits, emb, mlp_logits = [], [], [], []
    k, d = authenticator.head[4].out_features, authenticator.head[4].in_features
    for i in range(0, len(labels), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device)
        y = torch.from_numpy(np.ascontiguousarray(labels[i : i + batch])).to(device)
        z, e = authenticator.logits_and_embedding(x)
        logits.append(z.float().cpu().numpy())
        emb.append(e.float().cpu().numpy())
        crit.append(critic(x, y).float().cpu().numpy() if critic is not None else np.zeros(len(y), np.float32))
        if mlp is not None:
            mlp_logits.append(mlp(x.cpu()).float().numpy())
    if not labels.size:
        return (np.zeros(0, np.float32), np.zeros((0, k), np.float32), np.zeros((0, d), np.float32),
                np.zeros((0, k), np.float32) if mlp is not None else None)
    return (np.concatenate(crit), np.concatenate(logits), np.concatenate(emb),
            np.concatenate(mlp_logits) if mlp is not None else None)


def build_references(authenticator: Authenticator, data: LabeledImages, num_classes: int, k: int, seed: int,
                     device: torch.device) -> References:
    """kNN / Mahalanobis / novelty references of one model, from the trusted data it trained on."""
    _, _, emb, _ = network_outputs(authenticator, None, data.images, data.labels, device)
    return References.fit(data.images, data.labels, emb, num_classes, k, seed)


def raw_member_scores(authenticator: Authenticator, critic: Critic | None, refs: References, images: np.ndarray,
                      labels: np.ndarray, device: torch.device, mlp: nn.Module | None = None) -> np.ndarray:
    """[N, len(MEMBERS)] raw member scores (critic column 0 when ``critic`` is None, mlp_margin
    column 0 when ``mlp`` is None)."""
    crit, logits, emb, mlp_logits = network_outputs(authenticator, critic, images, labels, device, mlp=mlp)
    return member_scores(crit, logits, emb, images, labels, refs, mlp_logits)


def member_columns(members: tuple[str, ...]) -> list[int]:
    return [MEMBERS.index(m) for m in members]


class FittedDetector:
    """Networks + member references + calibrated union, ready to score or export."""

    def __init__(
        self,
        authenticator: Authenticator,
        critic: Critic,
        metadata: ModelMetadata,
        config: FitConfig,
        plan: CalibrationPlan,
        calibration_raw: np.ndarray,
        calibration_labels: np.ndarray,
        synthetic_preview: LabeledImages,
        calibration_log_p: np.ndarray | None = None,
        report: dict | None = None,
        device: str = "cpu",
        recalibration: LabeledImages | None = None,
        mlp: nn.Module | None = None,
    ):
        self.device = resolve_device(device)
        self.authenticator = authenticator.to(self.device).eval()
        self.critic = critic.to(self.device).eval()
        self.mlp = mlp.cpu().eval() if mlp is not None else None  # the mlp_margin member's network (CPU)
        self.metadata = metadata
        self.config = config
        self.plan = plan
        self.calibration_raw = np.asarray(calibration_raw, np.float32)  # [n, len(MEMBERS)], out of sample
        self.calibration_labels = np.asarray(calibration_labels, np.int64)
        self.calibration_log_p = calibration_log_p  # out-of-sample authenticator log p(y|x), for the old fusion
        self.synthetic_preview = synthetic_preview
        self.report = report or {}
        self.recalibration = recalibration  # the samples of the last infer_threshold (at most MAX_PARITY_SAMPLES)
        if "mlp_margin" in self.members and self.mlp is None:
            raise ValueError("the detector's union has an mlp_margin member but no MLP was given")
        self.k = neighbours(plan.min_class_count(metadata.num_classes))
        self.references = build_references(self.authenticator, plan.shipped_training_data(), metadata.num_classes,
                                           self.k, config.seed, self.device)
        self.union = self.calibrate(self.members, metadata.target_fpr, metadata.boundary.per_class is not None)

    # ------------------------------------------------------------------ parts

    @property
    def members(self) -> tuple[str, ...]:
        """The evidence members (scores of their own; agreement columns are not members)."""
        meta = self.metadata
        if meta.evidence_members:
            agreements = {name for name, _ in meta.evidence_agreements}
            return tuple(m for m in meta.evidence_members if m not in agreements)
        return tuple(self.config.members)

    @property
    def calibration(self) -> LabeledImages:
        """The samples the union's boundary was read off, where the export's parity check and the
        int8 verdict gate look: the trusted samples whose out-of-sample scores calibrated it at fit
        time, or, after ``infer_threshold``, the samples given there (up to
        ``MAX_PARITY_SAMPLES`` of them), whose raw scores ``calibration_raw`` then holds."""
        return self.recalibration if self.recalibration is not None else self.plan.calibration

    @property
    def trusted(self) -> LabeledImages:
        """What the shipped networks trained on (the holdout's training part, or the whole pool)."""
        return self.plan.shipped_training_data()

    def relative_weights(self) -> dict[str, float]:
        """The columns' weights as this detector was calibrated with: from its metadata (a model
        saved before weights existed has none there and used equal ones), else from the config."""
        meta = self.metadata
        if meta.evidence_members:
            return dict(zip(meta.evidence_members, meta.member_weights()))
        return self.config.relative_weights(self.members)

    def agreements(self, members: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The agreement columns of a union of ``members``: this detector's (from its metadata, so
        a model saved before agreements existed has none; else from the config), each kept while
        two or more of its members remain."""
        meta = self.metadata
        full = meta.evidence_agreements if meta.evidence_members else self.config.agreements(self.members)
        return families_within(full, members)

    def calibrate(self, members: tuple[str, ...], target_fpr: float, per_class: bool,
                  folds: np.ndarray | None = None, with_agreements: bool = True) -> UnionCalibration:
        """A union of ``members`` calibrated on the stored out-of-sample scores (ablations use this;
        a subset keeps the columns' relative weights, re-scaled to its size, and the agreement
        columns with two or more of their members left). ``with_agreements=False`` drops the
        agreement columns and hands each one's weight back to its members in equal parts (the
        union as it was before agreement columns: the ``without-agreements`` ablation)."""
        cols = member_columns(members)
        relative = self.relative_weights()
        agreements = self.agreements(members)
        if not with_agreements:
            full, relative = relative, dict(relative)
            for name, parts in self.agreements(self.members):
                relative.pop(name, None)
                for m in parts:
                    relative[m] = full.get(m, 1.0) + full.get(name, 1.0) / len(parts)
            agreements = ()
        else:
            relative = lone_agreement_only_as_plain(relative, members, agreements)
        return calibrate_union(self.calibration_raw[:, cols], self.calibration_labels, self.metadata.num_classes,
                               members, target_fpr, per_class, folds, self.config.paper_k,
                               member_weights(column_names(members, agreements), relative), agreements)

    # ------------------------------------------------------------------ scoring

    def raw_evidence(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[N, len(MEMBERS)] raw scores of every member (higher = more trustworthy)."""
        return raw_member_scores(self.authenticator, self.critic, self.references, images, labels, self.device,
                                 self.mlp)

    def critic_score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Raw mimic-model output (the paper's score)."""
        return batched(self.critic, images, labels, self.device)

    def log_p_label(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Authenticator log p(label | image)."""
        return batched(self.authenticator.log_p_label, images, labels, self.device)

    def evidence(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[N, C] p-value of every column (members, then agreements: ``self.union.columns``), the
        ONNX ``evidence``."""
        raw = self.raw_evidence(images, labels)[:, member_columns(self.members)]
        return np.exp(self.union.column_log_p(raw, labels)).astype(np.float32)

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """float32 [N]: log of the smallest weighted column p-value ``min_c p_c / w_c``; higher =
        more trustworthy."""
        raw = self.raw_evidence(images, labels)[:, member_columns(self.members)]
        return self.union.score(raw, labels)

    def predict(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """bool [N]: True = poisoned (score below the boundary of the sample's label)."""
        return self.union.flagged(self.score(images, labels), labels)

    def p_value(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.union.p_value(self.score(images, labels))

    def infer_threshold(
        self, images: np.ndarray, labels: np.ndarray, target_fpr: float, per_class: bool
    ) -> Boundary:
        """Recalibrate the union (member references, p-values, boundary) on new clean data.

        New data is out of sample for the shipped networks, so it can replace the cross-fitted
        calibration scores directly. Use it when the stream's clean data differs from the trusted
        pool: the networks stay, only the operating point moves. The out-of-sample FPR the card
        reports is re-measured on the new data (ten folds: each fold flagged by a boundary read off
        the other nine)."""
        n = len(labels)
        self.calibration_raw = self.raw_evidence(images, labels)
        self.calibration_labels = np.asarray(labels, np.int64)
        self.calibration_log_p = self.log_p_label(images, labels)
        rng = np.random.default_rng(self.config.seed)
        folds = rng.permutation(n) % min(CV_FOLDS, n)
        self.union = self.calibrate(self.members, target_fpr, per_class, folds=folds)
        keep = np.sort(rng.permutation(n)[:MAX_PARITY_SAMPLES])
        self.recalibration = LabeledImages(np.asarray(images, np.float32)[keep], np.asarray(labels, np.int64)[keep])
        boundary = self.union.boundary
        version, parent = model_version(self.config, self.metadata.weights_sha256 or "", self.union), \
            self.metadata.model_version
        self.metadata = self.metadata.model_copy(
            update={"boundary": boundary, "target_fpr": target_fpr, "model_version": version,
                    "created_at": utc_now_iso()})
        cv = [float(x) for x in self.union.cv_fpr]
        self.report["per_class_fallback"] = self.union.fell_back
        self.report["cv_fpr"] = cv
        self.report["cv_fpr_mean"] = float(np.mean(cv)) if cv else None
        # provenance for the card: which model this one was recalibrated from (a chain keeps the first fit's)
        previous = self.report.get("calibration", {})
        self.report["calibration"] = {"source": "infer_threshold", "n": n,
                                      "recalibrated_from": parent, "recalibrated_at": self.metadata.created_at,
                                      "fitted_as": previous.get("fitted_as", parent)}
        self.report.setdefault("sizes", {})["calibration"] = n
        return boundary

    # ------------------------------------------------------------------ persistence

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, object] = {
            "authenticator": self.authenticator.state_dict(),
            "critic": self.critic.state_dict(),
            **({"mlp": self.mlp.state_dict()} if self.mlp is not None else {}),
            "pool_images": torch.from_numpy(self.plan.pool.images),
            "pool_labels": torch.from_numpy(self.plan.pool.labels),
            "folds": torch.from_numpy(self.plan.folds),
            "calibration_raw": torch.from_numpy(self.calibration_raw),
            "calibration_labels": torch.from_numpy(self.calibration_labels),
            "synthetic_preview_images": torch.from_numpy(self.synthetic_preview.images),
            "synthetic_preview_labels": torch.from_numpy(self.synthetic_preview.labels),
        }
        if self.calibration_log_p is not None:
            tensors["calibration_log_p"] = torch.from_numpy(np.asarray(self.calibration_log_p, np.float32))
        if self.recalibration is not None:
            tensors["recalibration_images"] = torch.from_numpy(self.recalibration.images)
            tensors["recalibration_labels"] = torch.from_numpy(self.recalibration.labels)
        buf = io.BytesIO()
        torch.save(tensors, buf)
        (out / WEIGHTS_FILE).write_bytes(buf.getvalue())
        state = {
            "config": self.config.model_dump(mode="json"),
            "metadata": json.loads(self.metadata.model_dump_json(by_alias=True)),
            "plan": self.plan.mode,
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
        mlp = None
        if "mlp" in tensors:  # detectors saved before the mlp_margin member (or fitted without it) have none
            mlp_state = tensors["mlp"]
            mlp = make_classifier(math.prod(shape), k, int(mlp_state["1.weight"].shape[0]))
            mlp.load_state_dict(mlp_state)
        plan = CalibrationPlan(state["plan"], LabeledImages(tensors["pool_images"].numpy(),
                                                            tensors["pool_labels"].numpy()),
                               tensors["folds"].numpy())
        log_p = tensors.get("calibration_log_p")
        recal = (LabeledImages(tensors["recalibration_images"].numpy(), tensors["recalibration_labels"].numpy())
                 if "recalibration_images" in tensors else None)
        det = cls(
            authenticator, critic, metadata, FitConfig.model_validate(state["config"]), plan,
            tensors["calibration_raw"].numpy(), tensors["calibration_labels"].numpy(),
            LabeledImages(tensors["synthetic_preview_images"].numpy(), tensors["synthetic_preview_labels"].numpy()),
            calibration_log_p=log_p.numpy() if log_p is not None else None,
            report=state["report"], device=device, recalibration=recal, mlp=mlp,
        )
        if det.union.boundary != metadata.boundary:
            raise ValueError(f"{out}: the boundary rebuilt from the stored calibration scores differs from the "
                             "saved one; the detector files do not belong together")
        return det


def union_digest(union: UnionCalibration) -> str:
    h = hashlib.sha256()
    for arr in (union.references, union.betas, union.union_reference, union.standardiser.loc,
                union.standardiser.scale, *(k.values for k in union.knots), union.union_knots.values):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(",".join(union.members).encode())
    if union.weights is not None:  # weights decide verdicts; a union calibrated without any hashes as before
        h.update(np.ascontiguousarray(union.weights).tobytes())
    for a in union.agreements:  # likewise agreement columns
        h.update(f"{a.name}={a.parts}".encode())
        h.update(np.ascontiguousarray(a.reference).tobytes())
    return h.hexdigest()


def model_version(config: FitConfig, weights_sha: str, union: UnionCalibration) -> str:
    """Names everything that decides a verdict, not just the weights.

    Quarantine headers and the audit trail cite this string, so two models that share networks
    but not calibration or boundary (an ``infer_threshold``) must not share it."""
    h = hashlib.sha256(weights_sha.encode())
    h.update(b"union")
    h.update(union_digest(union).encode())
    h.update(union.boundary.to_json().encode())
    return f"{config.data_name}-seed{config.seed}-{h.hexdigest()[:12]}"


def build_metadata(config: FitConfig, union: UnionCalibration, shape: tuple[int, int, int], num_classes: int,
                   sha: str) -> ModelMetadata:
    return ModelMetadata(
        schema_version=SCHEMA_VERSION,
        boundary=union.boundary,
        target_fpr=union.target_fpr,
        input_shape=shape,
        num_classes=num_classes,
        dataset=config.data_name,
        score_kind="union",
        model_version=model_version(config, sha, union),
        created_at=utc_now_iso(),
        weights_sha256=sha,
        has_p_value=True,
        evidence_members=union.columns,
        evidence_weights=tuple(float(w) for w in union.weight_vector),
        evidence_agreements=tuple((a.name, tuple(union.members[j] for j in a.parts)) for a in union.agreements),
    )
