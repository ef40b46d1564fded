"""The De-Pois detector as one object: load a model file, score and judge (image, label) pairs.

This is the public Python API (``from depois_stream import Detector``) for filtering data
in-process, in the style of alibi-detect's detectors, and the very object the stream filter
scores with, so a notebook and the Kafka service cannot disagree about a sample::

    det = Detector.load("model.onnx")
    pred = det.predict(images, labels)      # verdicts, scores, thresholds, p-values, reasons
    keep = ~pred.poisoned

A model that is missing, half-copied, tampered with or exported by an incompatible trainer must
stop a consumer at start-up rather than quietly mis-route a stream, so every check here ends in
a ``ModelLoadError`` whose message names the problem and the fix, and whose ``reason`` is a
bounded code (card, contract, load) for the metrics.

onnxruntime-gpu falls back to CPU without raising when the CUDA libraries are missing; the only
reliable truth is ``session.get_providers()`` after the session exists, so that is what
``Detector.provider`` reports and what ``require_gpu`` checks.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from depois_stream.contract import (
    INPUT_IMAGE, INPUT_LABEL, OUTPUT_EVIDENCE, OUTPUT_P_VALUE, OUTPUT_POISONED, OUTPUT_SCORE,
    ContractError, ModelCard, ModelMetadata, card_path_for,
)
from depois_stream.contract.arrays import to_contract
from depois_stream.contract.files import read_regular
from depois_stream.contract.model import first_line, first_problem
from depois_stream.contract.signing import RUN_KEY_OPTION, SignatureError, verify_or_warn

log = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]

CUDA = "CUDAExecutionProvider"
# Rows per onnxruntime run on the CPU. Activation memory grows with the rows of one run
# (Fashion-MNIST's authenticator holds ~200 KB a sample: 13 GB for the --batch-size maximum of
# 65,536) while CPU throughput is flat past a few thousand rows (docs/performance.md, "GPU").
CPU_MAX_ROWS = 4096
CPU = "CPUExecutionProvider"

_EXPECTED_INPUTS = {INPUT_IMAGE: ("tensor(float)", 4), INPUT_LABEL: ("tensor(int64)", 1)}
_EXPECTED_OUTPUTS = {
    OUTPUT_SCORE: ("tensor(float)", 1),
    OUTPUT_POISONED: ("tensor(bool)", 1),
    OUTPUT_P_VALUE: ("tensor(float)", 1),
    OUTPUT_EVIDENCE: ("tensor(float)", 2),
}

REASON_BELOW_BOUNDARY = "below_boundary"  # the reason of a model that names no evidence members


class ModelLoadError(Exception):
    """The model cannot be served; the message says what to fix, ``reason`` is a bounded code
    (signature, card, contract, load) for ``depois_model_rejections_total``."""

    def __init__(self, message: str, reason: str = "load") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Prediction:
    """Per-sample outputs of one batch, aligned with the input rows."""

    score: np.ndarray  # float32 [N], higher = more trustworthy
    poisoned: np.ndarray  # bool [N]: score below its threshold
    threshold: np.ndarray  # float32 [N]: boundary applied to each sample (its class's if per class)
    p_value: np.ndarray | None  # float32 [N]: conformal p-value, when the model exports it
    evidence: np.ndarray | None  # float32 [N, K]: per-column p-values (members, agreements), when the model has them
    reason_names: tuple[str, ...]  # the evidence columns (or just below_boundary)
    reason_weights: tuple[float, ...] = ()  # the columns' weights in the score (empty = all equal)

    @property
    def reason_index(self) -> np.ndarray:
        """Per sample, the index in ``reason_names`` of the column that set the score: the
        smallest ``p_c / w_c`` (the score is ``log min_c p_c / w_c``); 0 when the model names
        no columns. Far in the tails several float32 p-values can underflow to 0; the first of
        those is named, a member that alone puts the sample beyond any boundary."""
        if self.evidence is None or self.evidence.shape[1] == 0:
            return np.zeros(len(self.score), dtype=np.int64)
        if self.reason_weights:
            return np.argmin(self.evidence / np.asarray(self.reason_weights, np.float32), axis=1)
        return np.argmin(self.evidence, axis=1)

    @property
    def reasons(self) -> list[str]:
        """Per sample, why it is suspect ("" for samples that passed)."""
        names = self.reason_names
        return [names[k] if bad else "" for k, bad in
                zip(self.reason_index.tolist(), self.poisoned.tolist())]


def requested_providers(device: Device, available: list[str]) -> list[str]:
    """Providers to ask onnxruntime for; ``auto`` asks for CUDA only when the build offers it."""
    if device == "cpu":
        return [CPU]
    if device == "cuda" or CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def session_options(threads: int = 0) -> ort.SessionOptions:
    """No busy-waiting: by default onnxruntime's intra-op threads spin after every run, taking
    the cores the Kafka client's Python thread needs between batches (on 2 cores that cost the
    pipeline a third of its rate; see docs/performance.md). ``threads``: intra-op threads; 0
    leaves onnxruntime's default, one per core it sees, which in a container on a large node
    can be the node's cores rather than the container's share."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return options


class Detector:
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
        names = {o.name for o in session.get_outputs()}
        self.has_p_value = OUTPUT_P_VALUE in names
        self.has_evidence = OUTPUT_EVIDENCE in names and bool(metadata.evidence_members)
        self._outputs = [OUTPUT_SCORE, OUTPUT_POISONED]
        if self.has_p_value:
            self._outputs.append(OUTPUT_P_VALUE)
        if self.has_evidence:
            self._outputs.append(OUTPUT_EVIDENCE)
        self.reason_names: tuple[str, ...] = (metadata.evidence_members if self.has_evidence
                                              else (REASON_BELOW_BOUNDARY,))
        self.reason_weights: tuple[float, ...] = metadata.evidence_weights if self.has_evidence else ()
        self.signature_key_id: str | None = None  # the verified signer's key id, if any
        # Rows per onnxruntime run: bounded on the CPU; on CUDA the whole batch until the GPU
        # refuses a size, then the largest halving that ran (see _run_rows).
        self.max_rows: int | None = None if self.provider == CUDA else CPU_MAX_ROWS

    @classmethod
    def load(cls, path: str | Path, device: Device = "auto", require_gpu: bool = False,
             verify_card: bool = True, public_key: str | Path | None = None,
             signature_option: str = RUN_KEY_OPTION, threads: int = 0) -> Detector:
        """Open and verify a model exported by ``depois-train export-onnx``.

        Checks, in order: the file exists; with ``public_key``, the model and its card are
        exactly what the holder of the matching private key signed (``model.sig`` beside them,
        see ``contract.signing``), and the session is built from the very bytes that were
        verified; its sha256 matches the model card beside it (unless ``verify_card=False``
        without a key); onnxruntime can load it; its inputs, outputs and ``depois.*`` metadata
        honour the contract; its ``poisoned`` output agrees with the metadata boundary.
        ``signature_option``: how the caller's user passes ``public_key``, named by the warning
        about an unsigned model (``replay rescore`` has the flag only, not the variable).
        ``threads``: onnxruntime intra-op threads on the CPU (0: onnxruntime's default); set it
        to the cores the process may use where other work shares the host.
        """
        if threads < 0:
            raise ModelLoadError(f"threads must be 0 (onnxruntime's default) or more, got {threads}", "load")
        path = Path(path)
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
            inside = sorted(str(p) for p in path.glob("*.onnx")) if is_dir else []
        except OSError as exc:  # a folder on the way that cannot be searched, say
            raise ModelLoadError(f"model file {path} cannot be read ({exc.strerror or exc})",
                                 "load") from None
        if is_dir:  # `depois-train all --out DIR` writes DIR/model.onnx: name it
            found = f" ({', '.join(inside[:3])} in it)" if inside else " (it holds no .onnx file)"
            raise ModelLoadError(
                f"model path {path} is a folder{found}: pass the .onnx file that `depois-train "
                "export-onnx` wrote, its .card.json beside it", "load")
        if not is_file and path.exists():  # a device, a FIFO, a socket
            raise ModelLoadError(f"model path {path} is not a regular file: pass the .onnx file that "
                                 "`depois-train export-onnx` wrote", "load")
        if not is_file:
            raise ModelLoadError(
                f"model file {path} does not exist: train and export one with "
                "`depois-train all` (or pass --model-path / DEPOIS_MODEL_PATH)", "load")
        try:
            verified = verify_or_warn(path, public_key, option=signature_option)
        except SignatureError as exc:
            raise ModelLoadError(str(exc), "signature") from None
        except OSError as exc:
            raise ModelLoadError(f"model {path} or its signature cannot be read "
                                 f"({exc.strerror or exc})", "signature") from None
        if verified is not None:
            sha, source = verified.model_sha256, verified.model_bytes
            _verify_card(path, sha, verified.card_bytes)
        else:
            # Read once: hashed and loaded from the same bytes, so a file replaced between the
            # two (a deployment copying while the filter reloads) cannot leave a detector whose
            # sha256, in every routed record's headers, names a graph it does not run.
            try:
                source = read_regular(path)  # not a FIFO or device swapped in since the check
            except OSError as exc:
                raise ModelLoadError(f"model file {path} cannot be read ({exc.strerror or exc})",
                                     "load") from None
            sha = hashlib.sha256(source).hexdigest()
            if verify_card:
                _verify_card(path, sha)
        requested = requested_providers(device, ort.get_available_providers())
        session = _open_session(path, source, requested,
                                quiet=device == "auto" and requested[0] == CUDA, threads=threads)
        _check_io(session, path)
        try:
            meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
        except ContractError as exc:
            raise ModelLoadError(f"{path}: {exc}", "contract") from exc
        _check_shape(session, meta, path)
        det = cls(session, meta, path, sha, requested, device)
        det.signature_key_id = verified.key_id if verified is not None else None
        if det.provider_fallback:
            log.warning("model %s: --device cuda was requested but onnxruntime runs on %s (CUDA "
                        "libraries missing or no GPU visible)", path.name, det.provider)
        elif det.cuda_unavailable:
            log.info("model %s: no usable CUDA, scoring on %s (device auto)", path.name,
                     det.provider)
        if require_gpu and det.provider != CUDA:
            raise ModelLoadError(
                f"--require-gpu is set but onnxruntime runs {path.name} on {det.provider}: "
                "install the CUDA and cuDNN libraries that onnxruntime-gpu needs and make a GPU "
                "visible, or drop --require-gpu to accept CPU scoring", "load")
        det._check_boundary_agrees()
        # DEBUG: the caller says what it does with the model (the filter's start-up says it
        # serves it; a hot reload may still refuse it for a contract change)
        log.debug("opened model %s version=%s sha256=%s provider=%s", path.name,
                  meta.model_version, sha[:12], det.provider)
        return det

    # ---------------------------------------------------------------- the detector API

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Score per sample, float32 [N]: higher means more like trusted data."""
        return self.predict(images, labels).score

    def predict(self, images: np.ndarray, labels: np.ndarray) -> Prediction:
        """Verdicts and everything behind them for a batch of samples.

        ``images``: [N, C, H, W] (or [N, H, W] for one channel), float in [0, 1] or uint8
        0..255; ``labels``: [N] integers, the labels the samples claim. One onnxruntime run.
        """
        return self.run(*self._prepare(images, labels))

    def run(self, images: np.ndarray, labels: np.ndarray) -> Prediction:
        """``predict`` for inputs already in the contract's form (float32 [N, C, H, W] in
        [0, 1], int64 labels), as the stream filter's decoder produces them."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        threshold = np.asarray(self.metadata.boundary.for_labels(labels), dtype=np.float32)
        if len(labels) == 0:
            empty = np.zeros(0, dtype=np.float32)
            members = len(self.metadata.evidence_members)
            return Prediction(empty, np.zeros(0, dtype=bool), threshold,
                              empty if self.has_p_value else None,
                              np.zeros((0, members), np.float32) if self.has_evidence else None,
                              self.reason_names, self.reason_weights)
        outs = self._run_rows(np.ascontiguousarray(images, dtype=np.float32), labels)
        return Prediction(
            score=np.asarray(outs[0], dtype=np.float32),
            poisoned=np.asarray(outs[1], dtype=bool),
            threshold=threshold,
            p_value=np.asarray(outs[2], dtype=np.float32) if self.has_p_value else None,
            evidence=np.asarray(outs[-1], dtype=np.float32) if self.has_evidence else None,
            reason_names=self.reason_names,
            reason_weights=self.reason_weights,
        )

    def _prepare(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Public inputs -> the contract's (float32 [N, C, H, W] in [0, 1], int64 [N]), by the
        rules every entry point that takes a user's arrays applies (``contract.arrays``)."""
        return to_contract(images, labels, tuple(self.metadata.input_shape), self.metadata.num_classes)

    def _run_rows(self, images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        """The batch in runs of at most ``max_rows`` rows, outputs joined in input order.

        The graph scores each row on its own, so splitting changes no verdict. On CUDA a run the
        GPU refuses (cuDNN rejects tensors past 2**31 elements, or memory runs out) is retried in
        halves and the size that ran is kept for later batches: one logged refusal instead of a
        batch that fails on every retry and stalls its partitions. A single row that still fails
        is a real error and is raised."""
        n, start, parts = len(labels), 0, []
        while start < n:
            rows = n - start if self.max_rows is None else min(self.max_rows, n - start)
            x, y = images[start:start + rows], labels[start:start + rows]
            try:
                if self.provider == CUDA:
                    parts.append(self._run_io_binding(x, y))
                else:
                    parts.append(self.session.run(self._outputs, {INPUT_IMAGE: x, INPUT_LABEL: y}))
            except Exception as exc:  # noqa: BLE001  (onnxruntime's Fail is no RuntimeError)
                if self.provider != CUDA or rows == 1:
                    raise
                self.max_rows = rows // 2
                log.warning("model %s: CUDA refused a run of %d rows (%s); scoring in runs of at "
                            "most %d rows from now on", self.path.name, rows,
                            first_line(exc)[:200], self.max_rows)
                continue
            start += rows
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self._outputs))]

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
        """The graph must run on batches of any size, and its ``poisoned`` output and the
        metadata boundary must tell the same story, because the router sends the metadata
        threshold downstream as the reason for a verdict.

        Probed at three batch sizes (one row per class up to 64, one row, and an odd size past
        both): a graph that only runs at one size (a fixed reshape inside) would pass a single
        probe and then fail on the stream's first batch, or, hot-reloaded, take down a filter
        that was serving. The probe stays within 64 MB of input whatever the metadata claims.
        """
        shape = self.metadata.input_shape
        k = self.metadata.num_classes
        values = int(np.prod(shape))
        rows = max(1, min(k, 64, (1 << 24) // values))
        for n in (rows, 1, rows + 7):
            labels = np.arange(n, dtype=np.int64) % k
            probe = np.linspace(0.0, 1.0, n * values, dtype=np.float32)
            try:
                res = self.run(probe.reshape(n, *shape), labels)
            except Exception as exc:  # onnxruntime's own untyped errors
                raise ModelLoadError(
                    f"{self.path}: the graph fails on a probe batch of {n} samples "
                    f"({type(exc).__name__}: {first_line(exc)[:300]}); re-export it with "
                    "`depois-train export-onnx`", "contract") from None
            if len(res.score) != n or len(res.poisoned) != n:
                raise ModelLoadError(
                    f"{self.path}: the graph answers {len(res.score)} scores for a batch of {n} "
                    "samples; re-export it with `depois-train export-onnx`", "contract")
            self._check_agreement(res, labels)

    def _check_agreement(self, res: Prediction, labels: np.ndarray) -> None:
        members = self.metadata.evidence_members
        if res.evidence is not None and res.evidence.shape != (len(labels), len(members)):
            raise ModelLoadError(
                f"{self.path}: the `evidence` output has shape {list(res.evidence.shape)} for "
                f"{len(labels)} samples but the metadata names {len(members)} members "
                f"({', '.join(members)}); re-export the model", "contract")
        expected = res.score < res.threshold
        clear = np.abs(res.score - res.threshold) > 1e-5 * (1.0 + np.abs(res.threshold))
        if np.any((res.poisoned != expected) & clear):
            raise ModelLoadError(
                f"{self.path}: the graph's `poisoned` output disagrees with the boundary in its "
                "depois.boundary metadata; re-export the model so both come from one calibration",
                "contract")


def _open_session(path: Path, source: str | bytes, providers: list[str],
                  quiet: bool, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session on ``providers``. ``quiet``: trying CUDA for ``--device auto``,
    where a CPU-only host is normal, so onnxruntime's own error line about missing CUDA
    libraries is silenced (the provider actually used is logged and exported instead)."""
    if quiet:
        ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(source, session_options(threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
        first = first_line(exc) or type(exc).__name__
        raise ModelLoadError(
            f"onnxruntime cannot load {path} ({first[:300]}); the file is not a valid ONNX "
            "model, re-export it with `depois-train export-onnx`", "load") from None
    finally:
        if quiet:
            ort.set_default_logger_severity(2)


def _verify_card(path: Path, sha: str, card_bytes: bytes | None = None) -> None:
    """The card beside the model names the model's sha256 (``card_bytes``: the signed card)."""
    card_path = card_path_for(path)
    if card_bytes is None and not card_path.is_file():
        raise ModelLoadError(
            f"model card {card_path} is missing: copy it together with {path.name} "
            "(`depois-train export-onnx` writes both), or pass --no-verify-card to skip the check",
            "card")
    try:
        card = ModelCard.model_validate_json(card_bytes if card_bytes is not None
                                             else card_path.read_bytes())
    except ValidationError as exc:
        raise ModelLoadError(f"model card {card_path} is not valid ({first_problem(exc)}); "
                             "copy the card that was exported with the model", "card") from None
    except OSError as exc:
        raise ModelLoadError(f"model card {card_path} cannot be read ({exc.strerror})",
                             "card") from None
    if card.onnx_sha256 != sha:
        raise ModelLoadError(
            f"{path.name} has sha256 {sha[:12]}… but its card {card_path.name} expects "
            f"{card.onnx_sha256[:12]}…: the file was modified or only partly copied; copy the "
            "model and its card again, or re-export them together", "card")


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
                "contract is in depois_stream/contract/model.py; re-export with "
                "`depois-train export-onnx`", "contract")
        for name, arg in have.items():
            if name not in expected:
                continue
            dtype, rank = expected[name]
            if arg.type != dtype or len(arg.shape) != rank:
                raise ModelLoadError(
                    f"{path}: {kind} {name!r} is {arg.type} of rank {len(arg.shape)}, the "
                    f"contract needs {dtype} of rank {rank}; re-export with "
                    "`depois-train export-onnx`", "contract")


def _check_shape(session: ort.InferenceSession, meta: ModelMetadata, path: Path) -> None:
    graph_shape = next(i.shape for i in session.get_inputs() if i.name == INPUT_IMAGE)[1:]
    for got, want in zip(graph_shape, meta.input_shape):
        if isinstance(got, int) and got != want:
            raise ModelLoadError(
                f"{path}: graph input image is [N, {', '.join(map(str, graph_shape))}] but the "
                f"metadata says input_shape {list(meta.input_shape)}; re-export the model",
                "contract")
