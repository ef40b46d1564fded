"""Load a De-Pois ONNX model, check it against the contract, and score batches with onnxruntime.

A model that is missing, half-copied, tampered with or exported by an incompatible trainer must
stop the consumer at start-up rather than quietly mis-route a stream, so every check here ends in
a ``ModelLoadError`` whose message names the problem and the fix.

onnxruntime-gpu falls back to CPU without raising when the CUDA libraries are missing; the only
reliable truth is ``session.get_providers()`` after the session exists, so that is what
``Scorer.provider`` reports and what ``--require-gpu`` checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from depois_stream.contract import (
    INPUT_IMAGE, INPUT_LABEL, OUTPUT_EVIDENCE, OUTPUT_P_VALUE, OUTPUT_POISONED, OUTPUT_SCORE, ContractError,
    ModelCard, ModelMetadata, card_path_for, sha256_file,
)

log = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_EXPECTED_INPUTS = {INPUT_IMAGE: ("tensor(float)", 4), INPUT_LABEL: ("tensor(int64)", 1)}
_EXPECTED_OUTPUTS = {
    OUTPUT_SCORE: ("tensor(float)", 1),
    OUTPUT_POISONED: ("tensor(bool)", 1),
    OUTPUT_P_VALUE: ("tensor(float)", 1),
    OUTPUT_EVIDENCE: ("tensor(float)", 2),
}


class ModelLoadError(Exception):
    """The model cannot be served; the message says what to fix."""


@dataclass(frozen=True)
class ScoreResult:
    """Per-sample outputs of one batch, aligned with the input rows."""

    score: np.ndarray  # float32 [N], higher = more trustworthy
    poisoned: np.ndarray  # bool [N]
    p_value: np.ndarray | None  # float32 [N] when the model exports it
    threshold: np.ndarray  # float32 [N]: boundary applied to each sample (its class's if per class)
    evidence: np.ndarray | None = None  # float32 [N, K]: per-member p-values when the model has them


def requested_providers(device: Device, available: list[str]) -> list[str]:
    """Providers to ask onnxruntime for; ``auto`` asks for CUDA only when the build offers it."""
    if device == "cpu":
        return [CPU]
    if device == "cuda" or CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def session_options() -> ort.SessionOptions:
    """No busy-waiting: by default onnxruntime's intra-op threads spin after every run, taking
    the cores the Kafka client's Python thread needs between batches (on 2 cores that cost the
    pipeline a third of its rate; see docs/performance.md)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Scorer:
    """One onnxruntime session plus the contract metadata read from the same file."""

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata, path: Path,
                 sha256: str, requested: list[str], device: Device = "auto") -> None:
        self.session = session
        self.metadata = metadata
        self.path = path
        self.sha256 = sha256
        self.provider = session.get_providers()[0]
        # CUDA was tried but the session runs on CPU (missing CUDA/cuDNN libraries or no GPU).
        self.cuda_unavailable = requested[0] == CUDA and self.provider != CUDA
        # A fallback only counts (metric, warning, alert) when a GPU was demanded: `auto` on a
        # CPU host with the onnxruntime-gpu wheel is a normal CPU deployment, not a fault.
        self.provider_fallback = self.cuda_unavailable and device == "cuda"
        self.has_p_value = OUTPUT_P_VALUE in {o.name for o in session.get_outputs()}
        names = {o.name for o in session.get_outputs()}
        self.has_evidence = OUTPUT_EVIDENCE in names and bool(metadata.evidence_members)
        self._outputs = [OUTPUT_SCORE, OUTPUT_POISONED]
        if self.has_p_value:
            self._outputs.append(OUTPUT_P_VALUE)
        if self.has_evidence:
            self._outputs.append(OUTPUT_EVIDENCE)

    @classmethod
    def load(cls, path: str | Path, device: Device = "auto", require_gpu: bool = False,
             verify_card: bool = True) -> "Scorer":
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(
                f"model file {path} does not exist: train and export one with "
                "`depois-train all` (or pass --model-path / DEPOIS_MODEL_PATH)")
        sha = sha256_file(path)
        if verify_card:
            _verify_card(path, sha)
        requested = requested_providers(device, ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(path), session_options(), providers=requested)
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise ModelLoadError(
                f"onnxruntime cannot load {path} ({exc}); the file is not a valid ONNX model, "
                "re-export it with `depois-train export-onnx`") from exc
        _check_io(session, path)
        try:
            meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
        except ContractError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        _check_shape(session, meta, path)
        scorer = cls(session, meta, path, sha, requested, device)
        if scorer.provider_fallback:
            log.warning("model %s: --device cuda was requested but onnxruntime runs on %s (CUDA "
                        "libraries missing or no GPU visible)", path.name, scorer.provider)
        elif scorer.cuda_unavailable:
            log.info("model %s: no usable CUDA, scoring on %s (device auto)", path.name,
                     scorer.provider)
        if require_gpu and scorer.provider != CUDA:
            raise ModelLoadError(
                f"--require-gpu is set but onnxruntime runs {path.name} on {scorer.provider}: "
                "install the CUDA and cuDNN libraries that onnxruntime-gpu needs and make a GPU "
                "visible, or drop --require-gpu to accept CPU scoring")
        scorer._check_boundary_agrees()
        log.info("loaded model %s version=%s sha256=%s provider=%s", path.name,
                 meta.model_version, sha[:12], scorer.provider)
        return scorer

    def score(self, images: np.ndarray, labels: np.ndarray) -> ScoreResult:
        """Score one batch in a single onnxruntime run (an empty batch costs nothing)."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        threshold = np.asarray(self.metadata.boundary.for_labels(labels), dtype=np.float32)
        if len(labels) == 0:
            empty = np.zeros(0, dtype=np.float32)
            members = len(self.metadata.evidence_members)
            return ScoreResult(empty, np.zeros(0, dtype=bool),
                               empty if self.has_p_value else None, threshold,
                               np.zeros((0, members), np.float32) if self.has_evidence else None)
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.provider == CUDA:
            outs = self._run_io_binding(images, labels)
        else:
            outs = self.session.run(self._outputs, {INPUT_IMAGE: images, INPUT_LABEL: labels})
        return ScoreResult(
            score=np.asarray(outs[0], dtype=np.float32),
            poisoned=np.asarray(outs[1], dtype=bool),
            p_value=np.asarray(outs[2], dtype=np.float32) if self.has_p_value else None,
            threshold=threshold,
            evidence=np.asarray(outs[-1], dtype=np.float32) if self.has_evidence else None,
        )

    def _run_io_binding(self, images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        """Copy inputs to the GPU once and let outputs stay there until one copy back."""
        binding = self.session.io_binding()
        for name, array in ((INPUT_IMAGE, images), (INPUT_LABEL, labels)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for name in self._outputs:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _check_boundary_agrees(self) -> None:
        """The graph's ``poisoned`` output and the metadata boundary must tell the same story,
        because the router sends the metadata threshold downstream as the reason for a verdict."""
        shape = self.metadata.input_shape
        labels = np.arange(self.metadata.num_classes, dtype=np.int64)
        probe = np.linspace(0.0, 1.0, len(labels) * int(np.prod(shape)), dtype=np.float32)
        res = self.score(probe.reshape(len(labels), *shape), labels)
        members = self.metadata.evidence_members
        if res.evidence is not None and res.evidence.shape != (len(labels), len(members)):
            raise ModelLoadError(
                f"{self.path}: the `evidence` output has shape {list(res.evidence.shape)} for "
                f"{len(labels)} samples but the metadata names {len(members)} members "
                f"({', '.join(members)}); re-export the model")
        expected = res.score < res.threshold
        clear = np.abs(res.score - res.threshold) > 1e-5 * (1.0 + np.abs(res.threshold))
        if np.any((res.poisoned != expected) & clear):
            raise ModelLoadError(
                f"{self.path}: the graph's `poisoned` output disagrees with the boundary in its "
                "depois.boundary metadata; re-export the model so both come from one calibration")


def _verify_card(path: Path, sha: str) -> None:
    card_path = card_path_for(path)
    if not card_path.is_file():
        raise ModelLoadError(
            f"model card {card_path} is missing: copy it together with {path.name} "
            "(`depois-train export-onnx` writes both), or pass --no-verify-card to skip the check")
    try:
        card = ModelCard.model_validate_json(card_path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"model card {card_path} is not valid: {exc}") from exc
    if card.onnx_sha256 != sha:
        raise ModelLoadError(
            f"{path.name} has sha256 {sha[:12]}… but its card {card_path.name} expects "
            f"{card.onnx_sha256[:12]}…: the file was modified or only partly copied; copy the "
            "model and its card again, or re-export them together")


def _check_io(session: ort.InferenceSession, path: Path) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    for kind, have, expected, required in (
        ("input", inputs, _EXPECTED_INPUTS, _EXPECTED_INPUTS),
        ("output", outputs, _EXPECTED_OUTPUTS, (OUTPUT_SCORE, OUTPUT_POISONED)),
    ):
        missing = [n for n in required if n not in have]
        if missing:
            raise ModelLoadError(
                f"{path}: graph lacks {kind}(s) {missing} (has {sorted(have)}); the runtime "
                "contract is in depois_stream/contract.py; re-export with "
                "`depois-train export-onnx`")
        for name, arg in have.items():
            if name not in expected:
                continue
            dtype, rank = expected[name]
            if arg.type != dtype or len(arg.shape) != rank:
                raise ModelLoadError(
                    f"{path}: {kind} {name!r} is {arg.type} of rank {len(arg.shape)}, the "
                    f"contract needs {dtype} of rank {rank}; re-export with "
                    "`depois-train export-onnx`")


def _check_shape(session: ort.InferenceSession, meta: ModelMetadata, path: Path) -> None:
    graph_shape = next(i.shape for i in session.get_inputs() if i.name == INPUT_IMAGE)[1:]
    for got, want in zip(graph_shape, meta.input_shape):
        if isinstance(got, int) and got != want:
            raise ModelLoadError(
                f"{path}: graph input image is [N, {', '.join(map(str, graph_shape))}] but the "
                f"metadata says input_shape {list(meta.input_shape)}; re-export the model")
