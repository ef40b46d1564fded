"""Export a FittedDetector to the single-file ONNX contract of ``depois_stream.contract``.

The graph computes the final verdict itself (networks, standardisation, fusion, per-class
boundary, conformal p-value), so the torch-free runtime only feeds pixels and labels and reads
the answer: there is no second implementation of the maths in the consumer to drift apart.

Before anything is written, the ONNX model is run with onnxruntime on the calibration split and
compared with the detector's own numpy scoring path; a model that disagrees is refused.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from depois_stream.contract import (
    INPUT_IMAGE,
    INPUT_LABEL,
    OUTPUT_P_VALUE,
    OUTPUT_POISONED,
    OUTPUT_SCORE,
    ModelCard,
    card_path_for,
    sha256_file,
)
from training.calibration import conformal_p_values
from training.detector import FittedDetector

OPSET = 18
PARITY_ATOL = 1e-4


class ExportParityError(RuntimeError):
    """The exported graph disagrees with the torch/numpy detector; nothing was written."""


class ScoringGraph(nn.Module):
    """Everything between (image, label) and (score, poisoned, p_value), as torch ops.

    Constants become buffers, so they are baked into the ONNX initialisers with the weights."""

    def __init__(self, det: FittedDetector):
        super().__init__()
        meta, fusion = det.metadata, det.fusion
        self.authenticator = copy.deepcopy(det.authenticator).cpu().eval()
        self.critic = copy.deepcopy(det.critic).cpu().eval()
        self.fused = meta.score_kind == "fused"
        thresholds = meta.boundary.per_class or [meta.boundary.global_] * meta.num_classes
        self.register_buffer("stats", torch.tensor(
            [fusion.critic.mean, fusion.critic.std, fusion.auth.mean, fusion.auth.std], dtype=torch.float32
        ))
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float32))
        self.register_buffer("reference", torch.from_numpy(det.reference_scores.astype(np.float32)))

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
        score = (self.critic(image, label) - self.stats[0]) / self.stats[1]
        if self.fused:
            z_auth = (self.authenticator.log_p_label(image, label) - self.stats[2]) / self.stats[3]
            score = torch.minimum(score, z_auth)
        poisoned = score < self.thresholds[label]
        below = (self.reference[None, :] <= score[:, None]).to(torch.float32).sum(dim=1)
        p_value = (below + 1.0) / (self.reference.shape[0] + 1.0)
        return score, poisoned, p_value


def build_scoring_graph(det: FittedDetector) -> nn.Module:
    return ScoringGraph(det)


def _export_proto(graph: nn.Module, det: FittedDetector) -> onnx.ModelProto:
    c, h, w = det.metadata.input_shape
    example = (torch.zeros(2, c, h, w), torch.zeros(2, dtype=torch.int64))
    batch = torch.export.Dim("N", min=1)
    # The exporter logs about optional torchvision ops and warns about internals we do not use.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            example,
            input_names=[INPUT_IMAGE, INPUT_LABEL],
            output_names=[OUTPUT_SCORE, OUTPUT_POISONED, OUTPUT_P_VALUE],
            dynamic_shapes={"image": {0: batch}, "label": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in det.metadata.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def parity_report(proto_bytes: bytes, det: FittedDetector) -> dict[str, float]:
    """Run the ONNX bytes on the calibration split; compare with the detector's own path."""
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    images, labels = det.calibration.images, det.calibration.labels
    score, poisoned, p_value = session.run(
        [OUTPUT_SCORE, OUTPUT_POISONED, OUTPUT_P_VALUE], {INPUT_IMAGE: images, INPUT_LABEL: labels}
    )
    ref_score = det.score(images, labels)
    return {
        "max_abs_score_diff": float(np.max(np.abs(score - ref_score))),
        "verdict_mismatches": float(np.sum(poisoned != det.predict(images, labels))),
        "max_abs_p_value_diff": float(
            np.max(np.abs(p_value - conformal_p_values(ref_score, det.reference_scores)))
        ),
        "calibration_fpr": float(np.mean(poisoned)),
    }


def _check(parity: dict[str, float]) -> None:
    if parity["max_abs_score_diff"] > PARITY_ATOL or parity["verdict_mismatches"] > 0:
        raise ExportParityError(
            f"ONNX and torch disagree on the calibration split (max |score diff| "
            f"{parity['max_abs_score_diff']:.3g} > {PARITY_ATOL} or "
            f"{int(parity['verdict_mismatches'])} differing verdicts); no model was written"
        )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the consumer may run as another user
    os.replace(tmp, path)


def export_onnx(det: FittedDetector, path: str | Path, quantize: str | None = None) -> ModelCard:
    """Write ``path`` (ONNX) and its model card, or raise ExportParityError and write nothing."""
    if quantize is not None:
        raise NotImplementedError(f"quantize={quantize!r} is not implemented; export float32")
    path = Path(path)
    proto_bytes = _export_proto(build_scoring_graph(det), det).SerializeToString()
    parity = parity_report(proto_bytes, det)
    _check(parity)
    _write_atomically(path, proto_bytes)
    report = det.report
    card = ModelCard(
        onnx_file=path.name,
        onnx_sha256=sha256_file(path),
        metadata=det.metadata,
        dataset=det.metadata.dataset,
        sizes=report.get("sizes", {}),
        seed=det.config.seed,
        steps=report.get("steps", {}),
        times_s=report.get("times_s", {}),
        calibration={
            "achieved_fpr": parity["calibration_fpr"],
            "target_fpr": det.metadata.target_fpr,
            "parity_max_abs_score_diff": parity["max_abs_score_diff"],
            "acceptance_rate": float(report.get("acceptance_rate", float("nan"))),
        },
        notes=[
            (
                f"score_kind={det.metadata.score_kind}: fused = min(s_critic, s_log_p_auth), each "
                "signal scaled so its calibration median is 0 and its target-FPR quantile -1"
            ),
            (
                f"boundary per class: {det.metadata.boundary.per_class is not None}; classes that "
                f"fell back to the global threshold: {report.get('per_class_fallback', [])}"
            ),
        ],
    )
    _write_atomically(card_path_for(path), card.model_dump_json(indent=2, by_alias=True).encode())
    return card
