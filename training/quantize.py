"""int8 dynamic quantisation of an exported detector, accepted only if its verdicts match fp32.

Why dynamic quantisation of the fully connected layers only: weights become int8 ahead of time and
activations are quantised per batch at run time, so no representative calibration pass is needed
and the score stays a float. The critic is an MLP, which is where int8 pays off; onnxruntime's
``ConvInteger`` kernel is slower on CPU than its float convolution, so convolutions stay fp32.

Why a verdict gate: the boundary sits in a gap between clean calibration scores, and quantisation
noise moves scores. A quantised model is only the same product if it routes (almost) every sample
the same way, so we measure the agreement of the ``poisoned`` output with the fp32 model on the
calibration split and refuse to write a model below ``MIN_AGREEMENT``.

The torch exporter writes linear layers as ``Gemm``, which onnxruntime cannot quantise dynamically;
``gemm_to_matmul`` rewrites them as ``MatMul`` + ``Add`` (the exact same arithmetic) first, which
onnxruntime then fuses into ``DynamicQuantizeMatMul``. Only those network MatMuls are quantised
(``network_matmuls``): the union's distance computations against trusted references stay fp32.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper
from pydantic import BaseModel

from depois_stream.contract import (
    INPUT_IMAGE, INPUT_LABEL, OUTPUT_POISONED, OUTPUT_SCORE, META_MODEL_VERSION, ModelCard,
    card_path_for, sha256_file,
)

if TYPE_CHECKING:
    from training.detector import FittedDetector

MIN_AGREEMENT = 0.995
QUANTIZED_OPS = ("MatMul",)
INT8_VERSION_SUFFIX = "+int8"


class QuantizeReport(BaseModel):
    """What the gate measured; printed by the CLI and stored in the int8 model's card."""

    n: int
    agreement: float
    disagreements: int
    min_agreement: float
    max_abs_score_diff: float
    fp32_flag_rate: float
    int8_flag_rate: float
    fp32_bytes: int
    int8_bytes: int

    @property
    def accepted(self) -> bool:
        return self.agreement >= self.min_agreement

    def summary(self) -> str:
        verdict = "accepted" if self.accepted else "REFUSED"
        return (
            f"int8 verdict agreement with fp32: {self.agreement:.4%} on {self.n} calibration samples "
            f"({self.disagreements} differ; required >= {self.min_agreement:.2%}) -> {verdict}; "
            f"max |score diff| {self.max_abs_score_diff:.3g}; flag rate fp32 {self.fp32_flag_rate:.2%} "
            f"vs int8 {self.int8_flag_rate:.2%}; size {self.fp32_bytes / 1024:.0f} KiB -> "
            f"{self.int8_bytes / 1024:.0f} KiB"
        )


class QuantizationRefused(RuntimeError):
    """The int8 model routes too many calibration samples differently from fp32; nothing was written."""

    def __init__(self, report: QuantizeReport) -> None:
        super().__init__(
            report.summary() + ". Keep the fp32 model, or re-export after more training "
            "(a wider score gap around the boundary survives quantisation better)."
        )
        self.report = report


def verdict_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples with the same verdict in both arrays."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty verdict arrays of one shape, got {a.shape} and {b.shape}")
    return float(np.mean(a == b))


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def gemm_to_matmul(model: ModelProto) -> ModelProto:
    """A copy of ``model`` with every ``Gemm(x, W, b)`` on a constant W as ``MatMul(x, W') + b``.

    Only plain linear layers (alpha = beta = 1, x not transposed) are rewritten; anything else is
    left alone and simply stays fp32."""
    out = ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        a = _attrs(node)
        plain = a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if a.get("transB", 0):
            weight = weight.T
        w_name = f"{node.input[1]}__kn"
        out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=f"{node.name}__matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}__bias"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in out.graph.node for i in n.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def network_matmuls(model: ModelProto) -> list[str]:
    """The MatMul nodes that ``gemm_to_matmul`` made out of the networks' linear layers.

    The union graph also multiplies by its trusted references (kNN embeddings, PCA basis and
    projections, the Mahalanobis Cholesky factor); int8 rounding of those would move distances,
    not activations, so they stay fp32."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith("__matmul")]


def run_onnx(path: str | Path, images: np.ndarray, labels: np.ndarray,
             batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(score, poisoned) of a contract model on CPU, in chunks of ``batch``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, verdicts = [], []
    for i in range(0, len(labels), batch):
        s, p = sess.run([OUTPUT_SCORE, OUTPUT_POISONED],
                        {INPUT_IMAGE: images[i:i + batch], INPUT_LABEL: labels[i:i + batch]})
        scores.append(s)
        verdicts.append(p)
    return np.concatenate(scores), np.concatenate(verdicts)


def _retag_version(model: ModelProto) -> None:
    """Mark the model version so routed records say which variant judged them."""
    for prop in model.metadata_props:
        if prop.key == META_MODEL_VERSION and not prop.value.endswith(INT8_VERSION_SUFFIX):
            prop.value += INT8_VERSION_SUFFIX


def _write_card(src: Path, dst: Path, report: QuantizeReport) -> None:
    """The fp32 card with this file's name, hash and metadata, and the gate's numbers."""
    from depois_stream.contract import ModelMetadata

    props = {p.key: p.value for p in onnx.load(str(dst), load_external_data=False).metadata_props}
    src_card = card_path_for(src)
    base = json.loads(src_card.read_text()) if src_card.exists() else {"dataset": props.get("depois.dataset", "")}
    card = ModelCard.model_validate({
        **base,
        "onnx_file": dst.name,
        "onnx_sha256": sha256_file(dst),
        "metadata": ModelMetadata.from_props(props).model_dump(mode="json"),
        "quantization": {"scheme": "onnxruntime dynamic int8 (MatMul weights, per tensor)",
                         "source_onnx_sha256": sha256_file(src), **report.model_dump()},
        "notes": [*base.get("notes", []), report.summary()],
    })
    card_path_for(dst).write_text(json.dumps(card.model_dump(mode="json"), indent=2))


def int8_path_for(fp32_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (its card: ``model.int8.card.json``)."""
    p = Path(fp32_path)
    return p.with_name(p.stem + ".int8.onnx")


def quantize_detector(det: "FittedDetector", fp32_path: str | Path) -> QuantizeReport:
    """Quantise an exported detector, gated on its own calibration split (what the CLI calls)."""
    return quantize_int8(fp32_path, int8_path_for(fp32_path), det.calibration.images,
                         det.calibration.labels)


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    calib_images: np.ndarray,
    calib_labels: np.ndarray,
    min_agreement: float = MIN_AGREEMENT,
) -> QuantizeReport:
    """Write an int8 copy of the fp32 model ``src`` to ``dst`` (+ its card) if the gate passes.

    ``calib_images``/``calib_labels`` should be the calibration split the boundary was set on.
    Raises ``QuantizationRefused`` (and writes nothing) when the verdict agreement is too low."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    images = np.ascontiguousarray(calib_images, dtype=np.float32)
    labels = np.ascontiguousarray(calib_labels, dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        matmul_path, int8_path = Path(tmp) / "matmul.onnx", Path(tmp) / "int8.onnx"
        rewritten = gemm_to_matmul(onnx.load(str(src)))
        onnx.save(rewritten, str(matmul_path))
        quantize_dynamic(matmul_path, int8_path, op_types_to_quantize=list(QUANTIZED_OPS),
                         nodes_to_quantize=network_matmuls(rewritten), weight_type=QuantType.QInt8)
        q = onnx.load(str(int8_path))
        _retag_version(q)
        onnx.save(q, str(int8_path))
        fp_scores, fp_verdicts = run_onnx(src, images, labels)
        q_scores, q_verdicts = run_onnx(int8_path, images, labels)
        agreement = verdict_agreement(fp_verdicts, q_verdicts)
        report = QuantizeReport(
            n=len(labels), agreement=agreement, disagreements=int(np.sum(fp_verdicts != q_verdicts)),
            min_agreement=min_agreement,
            max_abs_score_diff=float(np.max(np.abs(fp_scores - q_scores))),
            fp32_flag_rate=float(fp_verdicts.mean()), int8_flag_rate=float(q_verdicts.mean()),
            fp32_bytes=src.stat().st_size, int8_bytes=int8_path.stat().st_size,
        )
        if not report.accepted:
            raise QuantizationRefused(report)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(int8_path.read_bytes())
    _write_card(src, dst, report)
    return report
