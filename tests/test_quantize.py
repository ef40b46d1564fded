"""The int8 gate: a quantised detector is written only when it routes like the fp32 one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from depois_stream.contract import (
    Boundary, ModelCard, ModelMetadata, SCHEMA_VERSION, card_path_for, sha256_file, utc_now_iso,
)
from training.calibration import threshold_at_fpr
from training.quantize import QuantizationRefused, gemm_to_matmul, quantize_int8

WIDTHS = (256, 64, 1)


def _mlp_scores(weights: list[tuple[np.ndarray, np.ndarray]], embed: np.ndarray,
                images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    h = images.reshape(len(images), -1) * embed[labels]
    for i, (w, b) in enumerate(weights):
        h = h @ w.T + b
        if i < len(weights) - 1:
            h = np.where(h > 0, h, 0.2 * h)
    return h[:, 0].astype(np.float32)


def build_mlp_detector(path: Path, images: np.ndarray, labels: np.ndarray,
                       weights: list[tuple[np.ndarray, np.ndarray]], embed: np.ndarray,
                       target_fpr: float = 0.01) -> None:
    """A critic-shaped detector (label embedding x image -> Gemm/LeakyRelu MLP, as the torch
    exporter writes it) with the boundary at ``target_fpr`` on (images, labels), plus its card."""
    shape, dim = tuple(images.shape[1:]), int(np.prod(images.shape[1:]))
    boundary = threshold_at_fpr(_mlp_scores(weights, embed, images, labels), target_fpr)
    nodes = [helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
             helper.make_node("Gather", ["embed", "label"], ["e"], axis=0),
             helper.make_node("Mul", ["flat", "e"], ["h0"])]
    inits = [numpy_helper.from_array(np.array([-1, dim], dtype=np.int64), "flat_shape"),
             numpy_helper.from_array(embed, "embed"),
             numpy_helper.from_array(np.array(boundary, dtype=np.float32), "boundary")]
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [f"h{i}", f"w{i}", f"b{i}"], [f"g{i}"], transB=1, name=f"fc{i}"))
        act = "LeakyRelu" if i < len(weights) - 1 else "Identity"
        nodes.append(helper.make_node(act, [f"g{i}"], [f"h{i + 1}"], **({"alpha": 0.2} if i < len(weights) - 1 else {})))
    nodes += [helper.make_node("Squeeze", [f"h{len(weights)}", "axis1"], ["score"]),
              helper.make_node("Less", ["score", "boundary"], ["poisoned"])]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    graph = helper.make_graph(
        nodes, "mlp_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *shape]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("poisoned", TensorProto.BOOL, ["N"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    meta = ModelMetadata(
        schema_version=SCHEMA_VERSION, boundary=Boundary(**{"global": boundary}), target_fpr=target_fpr,
        input_shape=shape, num_classes=10, dataset="digits", score_kind="critic",
        model_version="mlp-test-1", created_at=utc_now_iso(),
    )
    helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    card = ModelCard(onnx_file=path.name, onnx_sha256=sha256_file(path), metadata=meta,
                     dataset="digits", sizes={"calibration": len(labels)})
    card_path_for(path).write_text(json.dumps(card.model_dump(mode="json")))


def random_weights(dim: int, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(seed)
    weights, width = [], dim
    for out in WIDTHS:
        weights.append(((rng.standard_normal((out, width)) / np.sqrt(width)).astype(np.float32),
                        (0.01 * rng.standard_normal(out)).astype(np.float32)))
        width = out
    return weights, rng.uniform(0.5, 1.5, (10, dim)).astype(np.float32)


def run(path: Path, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score, poisoned = sess.run(["score", "poisoned"], {"image": images, "label": labels})
    return score, poisoned


@pytest.fixture
def calib(digits_arrays) -> tuple[np.ndarray, np.ndarray]:
    xtr, ytr, _, _ = digits_arrays
    return xtr, ytr


def test_gemm_rewrite_is_exact(tmp_path: Path, calib) -> None:
    images, labels = calib
    weights, embed = random_weights(64, seed=0)
    src = tmp_path / "fp32.onnx"
    build_mlp_detector(src, images, labels, weights, embed)
    rewritten = gemm_to_matmul(onnx.load(str(src)))
    assert "Gemm" not in {n.op_type for n in rewritten.graph.node}
    onnx.save(rewritten, str(tmp_path / "matmul.onnx"))
    before, after = run(src, images, labels), run(tmp_path / "matmul.onnx", images, labels)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5)
    assert np.array_equal(after[1], before[1])


def test_int8_model_routes_like_fp32_and_honours_the_contract(tmp_path: Path, calib) -> None:
    images, labels = calib
    weights, embed = random_weights(64, seed=1)
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    build_mlp_detector(src, images, labels, weights, embed)

    report = quantize_int8(src, dst, images, labels)

    assert report.agreement >= 0.995 and report.n == len(labels)
    q = onnx.load(str(dst))
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in q.graph.node}
    fp_verdicts, q_verdicts = run(src, images, labels)[1], run(dst, images, labels)[1]
    assert np.mean(fp_verdicts == q_verdicts) == pytest.approx(report.agreement)
    assert 0 < q_verdicts.sum() < len(labels)
    card = ModelCard.model_validate_json(card_path_for(dst).read_text())
    assert card.onnx_sha256 == sha256_file(dst) and card.onnx_file == "int8.onnx"
    assert card.metadata.model_version == "mlp-test-1+int8"
    assert card.metadata.boundary == ModelMetadata.from_props(
        {p.key: p.value for p in onnx.load(str(src)).metadata_props}).boundary
    from depois_stream.filter.detector import Detector  # the consumer's loader: contract, card hash, boundary probe

    assert Detector.load(dst, device="cpu").metadata.model_version == "mlp-test-1+int8"


def test_refuses_a_model_that_quantisation_breaks(tmp_path: Path, calib) -> None:
    """One huge weight on an always-black pixel sets the per-tensor int8 scale so coarse that every
    other weight of that layer rounds to zero: every int8 score is the same, so with the boundary at
    the median about half of the fp32 verdicts cannot survive."""
    images, labels = calib
    images = images.copy()
    images[:, :, 0, 0] = 0.0
    weights, embed = random_weights(64, seed=2)
    weights[0][0][:, 0] = 1e4
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    build_mlp_detector(src, images, labels, weights, embed, target_fpr=0.5)

    with pytest.raises(QuantizationRefused) as refused:
        quantize_int8(src, dst, images, labels)

    assert refused.value.report.agreement < 0.6
    assert "agreement" in str(refused.value) and "Keep the fp32 model" in str(refused.value)
    assert not dst.exists() and not card_path_for(dst).exists()


def untrained_detector(images: np.ndarray, labels: np.ndarray, target_fpr: float):
    """A FittedDetector with freshly initialised networks, calibrated on (images, labels).

    Training would cost minutes and changes nothing about the export path; references and the
    union are built as ``training.pipeline.fit`` does (holdout plan: first half trains, second
    half calibrates). Untrained networks score every sample almost alike, so standardising
    amplifies int8 rounding: with the boundary at the median the gate must refuse."""
    import torch

    from training.config import FitConfig
    from training.crossfit import HOLDOUT, CalibrationPlan
    from training.data import LabeledImages
    from training.detector import (
        FittedDetector, build_metadata, build_references, raw_member_scores, weights_sha256,
    )
    from training.downstream import make_classifier
    from training.evidence import neighbours
    from training.models import Authenticator, Critic
    from training.union import calibrate_union

    torch.manual_seed(0)
    shape, k = tuple(images.shape[1:]), 10
    auth, critic = Authenticator(shape, k).eval(), Critic(shape, k).eval()
    mlp = make_classifier(int(np.prod(shape)), k, 256).eval()
    cfg = FitConfig(dataset="digits", device="cpu", target_fpr=target_fpr)
    cpu = torch.device("cpu")
    half = len(labels) // 2
    folds = np.where(np.arange(len(labels)) < half, HOLDOUT, 0).astype(np.int64)
    plan = CalibrationPlan("holdout", LabeledImages(images, labels), folds)
    nk = neighbours(plan.min_class_count(k))
    refs = build_references(auth, plan.shipped_training_data(), k, nk, cfg.seed, cpu)
    cal = plan.calibration
    raw = raw_member_scores(auth, critic, refs, cal.images, cal.labels, cpu, mlp)
    union = calibrate_union(raw, cal.labels, k, cfg.members, cfg.target_fpr, cfg.per_class)
    meta = build_metadata(cfg, union, shape, k, weights_sha256(auth, critic, mlp))
    return FittedDetector(auth, critic, meta, cfg, plan, raw, cal.labels, cal.subset(np.arange(10)),
                          report={"acceptance_rate": 1.0}, device="cpu", mlp=mlp)


@pytest.mark.slow
def test_export_onnx_quantize_int8_refuses_and_keeps_the_fp32_model(tmp_path: Path, calib) -> None:
    from typer.testing import CliRunner

    from depois_stream.filter.detector import Detector
    from training.cli import app

    images, labels = calib
    untrained_detector(images, labels, target_fpr=0.5).save(tmp_path / "detector")

    result = CliRunner().invoke(app, ["export-onnx", "--out", str(tmp_path), "--quantize", "int8"])

    assert result.exit_code == 1
    assert "int8 model refused" in result.output and "verdict agreement" in result.output
    assert not (tmp_path / "model.int8.onnx").exists()
    assert Detector.load(tmp_path / "model.onnx").metadata.boundary.per_class is not None
