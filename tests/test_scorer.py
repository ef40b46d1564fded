"""The scorer serves contract-conforming models and refuses anything else with a fix-it message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from depois_stream.contract import (
    META_BOUNDARY, META_INPUT_SHAPE, SCHEMA_VERSION, Boundary, ContractError, ModelMetadata, card_path_for,
    sha256_file,
)
from depois_stream.filter.detector import CPU, CUDA, ModelLoadError, Detector, requested_providers
from tests.helpers.onnx_models import build_centroid_model


def _copy_model(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    shutil.copy(card_path_for(src), card_path_for(dst))
    return dst


def _rewrite(path: Path, edit) -> None:
    """Edit the ONNX file in place and re-issue a matching card (so only the edit is wrong)."""
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))
    card_file = card_path_for(path)
    card = json.loads(card_file.read_text())
    card["onnx_sha256"] = sha256_file(path)
    card_file.write_text(json.dumps(card))


def _set_prop(model: onnx.ModelProto, key: str, value: str | None) -> None:
    props = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    if value is not None:
        model.metadata_props.add(key=key, value=value)


def test_scores_follow_the_claimed_label(centroid_model: Path, digits_arrays) -> None:
    _, _, xte, yte = digits_arrays
    scorer = Detector.load(centroid_model, device="cpu")
    honest = scorer.predict(xte, yte)
    flipped = scorer.predict(xte, (yte + 1) % 10)
    assert honest.poisoned.mean() < 0.15  # boundary calibrated at 5 % FPR on the training split
    assert flipped.poisoned.mean() > 0.6  # a wrong label is far from its class centroid
    np.testing.assert_array_equal(honest.poisoned, honest.score < honest.threshold)
    np.testing.assert_allclose(honest.threshold, scorer.metadata.boundary.global_)
    assert honest.p_value is None and scorer.has_p_value is False
    assert scorer.sha256 == sha256_file(centroid_model)


def test_empty_batch_needs_no_inference(centroid_model: Path) -> None:
    scorer = Detector.load(centroid_model, device="cpu")
    res = scorer.predict(np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))
    assert res.score.shape == res.poisoned.shape == res.threshold.shape == (0,)


def test_provider_reported_is_the_one_onnxruntime_uses(centroid_model: Path) -> None:
    scorer = Detector.load(centroid_model, device="auto")
    assert scorer.provider == scorer.session.get_providers()[0]
    asked_gpu = CUDA in ort.get_available_providers()
    assert scorer.cuda_unavailable == (asked_gpu and scorer.provider != CUDA)
    assert scorer.provider_fallback is False  # auto accepts CPU: not a fault to alert on
    assert Detector.load(centroid_model, device="cpu").provider == CPU


def test_cuda_demanded_but_not_used_is_a_fallback(centroid_model: Path) -> None:
    scorer = Detector.load(centroid_model, device="cuda")
    assert scorer.provider_fallback == (scorer.provider != CUDA)


def test_provider_request_follows_device() -> None:
    assert requested_providers("cpu", [CUDA, CPU]) == [CPU]
    assert requested_providers("auto", [CPU]) == [CPU]
    assert requested_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert requested_providers("cuda", [CPU]) == [CUDA, CPU]


def test_require_gpu_refuses_a_cpu_session(centroid_model: Path) -> None:
    if Detector.load(centroid_model, device="auto").provider == CUDA:
        pytest.skip("CUDA works here; the refusal path needs a machine without it")
    with pytest.raises(ModelLoadError, match="--require-gpu"):
        Detector.load(centroid_model, device="cuda", require_gpu=True)


def test_io_binding_matches_plain_run_on_gpu(centroid_model: Path, digits_arrays) -> None:
    scorer = Detector.load(centroid_model, device="auto")
    if scorer.provider != CUDA:
        pytest.skip("IO binding is only used on the CUDA provider")
    _, _, xte, yte = digits_arrays
    cpu = Detector.load(centroid_model, device="cpu").predict(xte, yte)
    np.testing.assert_allclose(scorer.predict(xte, yte).score, cpu.score, rtol=1e-5, atol=1e-6)


def _rows_seen(scorer: Detector, limit: int | None = None) -> list[int]:
    """Record the rows of every onnxruntime run; with ``limit``, fail runs above it the way the
    CUDA provider does (seen on an H200: cuDNN's MaxPool refused a Fashion-MNIST batch of 65,536,
    whose activations pass 2**31 elements; a GPU out of memory fails the same way)."""
    seen: list[int] = []
    plain = scorer.session.run

    def run(outputs, feeds):
        rows = len(feeds["label"])
        seen.append(rows)
        if limit is not None and rows > limit:
            raise RuntimeError("Error in execution: CUDNN failure 3000: CUDNN_STATUS_NOT_SUPPORTED")
        return plain(outputs, feeds)

    scorer.session.run = run
    return seen


def _as_cuda(scorer: Detector, limit: int) -> list[int]:
    """Take the CUDA path (whole batches, halving on refusal) through the CPU session, whose runs
    above ``limit`` rows fail as the GPU's do; returns the rows of every run."""
    seen = _rows_seen(scorer, limit)
    scorer.provider, scorer.max_rows = CUDA, None
    scorer._run_io_binding = lambda images, labels: scorer.session.run(
        scorer._outputs, {"image": images, "label": labels})
    return seen


def test_gpu_batch_too_large_for_one_run_is_scored_in_halves(centroid_model: Path, digits_arrays,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A batch the GPU refuses in one run is split, not failed: the stream filter would otherwise
    fail that batch on every retry (up to --batch-size 65536 is allowed) and stall its partitions."""
    _, _, xte, yte = digits_arrays
    expected = Detector.load(centroid_model, device="cpu").predict(xte, yte)
    scorer = Detector.load(centroid_model, device="cpu")
    seen = _as_cuda(scorer, limit=100)
    got = scorer.predict(xte, yte)
    np.testing.assert_array_equal(got.score, expected.score)
    np.testing.assert_array_equal(got.poisoned, expected.poisoned)
    assert 50 < scorer.max_rows <= 100  # halved until it ran, then kept
    assert sum(r for r in seen if r <= 100) == len(yte)  # every row scored once, in runs that worked
    assert "CUDA refused" in caplog.text
    seen.clear()
    scorer.predict(xte, yte)
    assert max(seen) == scorer.max_rows  # the size that worked is remembered: no failed run


def test_gpu_failure_on_single_rows_still_raises(centroid_model: Path, digits_arrays) -> None:
    _, _, xte, yte = digits_arrays
    scorer = Detector.load(centroid_model, device="cpu")
    _as_cuda(scorer, limit=0)
    with pytest.raises(RuntimeError, match="CUDNN"):
        scorer.predict(xte[:8], yte[:8])


def test_cpu_runs_are_bounded_so_a_large_batch_cannot_exhaust_memory(centroid_model: Path,
                                                                     digits_arrays) -> None:
    """Activation memory grows with rows per run (Fashion-MNIST: ~200 KB a sample, 13 GB at
    65,536) while CPU throughput is flat past a few thousand rows, so CPU runs are capped."""
    _, _, xte, yte = digits_arrays
    scorer = Detector.load(centroid_model, device="cpu")
    n = 2 * scorer.max_rows + 7
    idx = np.arange(n) % len(yte)
    whole = scorer.predict(xte[idx], yte[idx])
    seen = _rows_seen(scorer)
    again = scorer.predict(xte[idx], yte[idx])
    assert seen == [scorer.max_rows, scorer.max_rows, 7]
    np.testing.assert_array_equal(again.score, whole.score)
    assert again.score.shape == (n,)


def test_missing_model_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist.*depois-train"):
        Detector.load(tmp_path / "nope.onnx")


def test_a_folder_given_as_the_model_is_named_a_folder_not_missing(tmp_path: Path) -> None:
    """`depois-train all --out runs/digits` writes runs/digits/model.onnx; a user who passes the
    folder was told it "does not exist" (the folder is right there)."""
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        Detector.load(tmp_path)
    text = str(err.value)
    assert "does not exist" not in text and "is a folder" in text, text
    assert str(tmp_path / "model.onnx") in text, text


def test_missing_card_is_refused_unless_waived(centroid_model: Path, tmp_path: Path) -> None:
    path = _copy_model(centroid_model, tmp_path)
    card_path_for(path).unlink()
    with pytest.raises(ModelLoadError, match="card .* is missing"):
        Detector.load(path, device="cpu")
    assert Detector.load(path, device="cpu", verify_card=False).metadata.num_classes == 10


def test_modified_model_fails_the_card_checksum(centroid_model: Path, tmp_path: Path) -> None:
    path = _copy_model(centroid_model, tmp_path)
    model = onnx.load(str(path))
    _set_prop(model, "depois.dataset", "tampered")
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="sha256 .* modified or only partly copied"):
        Detector.load(path, device="cpu")


def test_corrupt_file_is_not_an_onnx_model(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        Detector.load(path, verify_card=False)


def test_missing_metadata_key_is_named(centroid_model: Path, tmp_path: Path) -> None:
    path = _copy_model(centroid_model, tmp_path)
    _rewrite(path, lambda m: _set_prop(m, META_BOUNDARY, None))
    with pytest.raises(ModelLoadError, match="depois.boundary"):
        Detector.load(path, device="cpu")


def test_renamed_output_breaks_the_contract(centroid_model: Path, tmp_path: Path) -> None:
    path = _copy_model(centroid_model, tmp_path)

    def rename(model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            node.output[:] = ["trust" if o == "score" else o for o in node.output]
            node.input[:] = ["trust" if i == "score" else i for i in node.input]
        model.graph.output[0].name = "trust"

    _rewrite(path, rename)
    with pytest.raises(ModelLoadError, match=r"lacks output.*'score'"):
        Detector.load(path, device="cpu")


def test_metadata_shape_must_match_the_graph(centroid_model: Path, tmp_path: Path) -> None:
    path = _copy_model(centroid_model, tmp_path)
    _rewrite(path, lambda m: _set_prop(m, META_INPUT_SHAPE, "1,28,28"))
    with pytest.raises(ModelLoadError, match="input_shape"):
        Detector.load(path, device="cpu")


def test_graph_and_metadata_boundary_must_agree(tmp_path: Path, digits_arrays) -> None:
    xtr, ytr, _, _ = digits_arrays
    path = tmp_path / "m.onnx"
    build_centroid_model(path, xtr, ytr, num_classes=10, boundary=-0.05)
    _rewrite(path, lambda m: _set_prop(m, META_BOUNDARY, json.dumps({"global": -10.0})))
    with pytest.raises(ModelLoadError, match="disagrees with the boundary"):
        Detector.load(path, device="cpu")



def _union_metadata(**changes: object) -> ModelMetadata:
    base = dict(schema_version=SCHEMA_VERSION, boundary=Boundary(**{"global": -5.0}), target_fpr=0.01,
                input_shape=(1, 8, 8), num_classes=10, dataset="digits", score_kind="union",
                model_version="m1", created_at="2026-01-01T00:00:00Z", has_p_value=True,
                evidence_members=("critic", "margin", "knn"), evidence_weights=(0.2, 1.4, 1.4))
    return ModelMetadata(**{**base, **changes})


def test_evidence_weights_travel_in_the_metadata_and_old_models_mean_equal_weights() -> None:
    meta = _union_metadata()
    props = meta.to_props()
    assert props["depois.evidence_weights"] == "0.2,1.4,1.4"
    assert ModelMetadata.from_props(props) == meta
    old = {k: v for k, v in props.items() if k != "depois.evidence_weights"}
    assert ModelMetadata.from_props(old).member_weights() == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("changes", [
    {"model_version": "v" * 129},
    {"evidence_members": ("critic", "m" * 65, "knn")},
])
def test_header_values_a_model_names_are_bounded(changes: dict) -> None:
    """The model version and the member names travel in every routed record's headers, inside
    the pipeline's fixed allowance (test_router): a longer one is a contract error at load."""
    with pytest.raises(ValueError, match="at most"):
        _union_metadata(**changes)


@pytest.mark.parametrize("weights", ["0.2,1.4", "0,1,2", "-1,2,2", "nan,1,1", "x,1,1"])
def test_bad_evidence_weights_are_a_contract_error(weights: str) -> None:
    props = {**_union_metadata().to_props(), "depois.evidence_weights": weights}
    with pytest.raises(ContractError, match="metadata is invalid") as err:
        ModelMetadata.from_props(props)
    # one line (before stop 23 a pydantic error came through as several lines with URLs)
    assert "\n" not in str(err.value) and "pydantic.dev" not in str(err.value)


def test_evidence_agreements_travel_in_the_metadata_and_old_models_have_none() -> None:
    meta = _union_metadata(evidence_members=("critic", "margin", "knn", "label_agreement"),
                           evidence_weights=(0.2, 0.7, 0.7, 2.4),
                           evidence_agreements=(("label_agreement", ("margin", "knn")),))
    props = meta.to_props()
    assert props["depois.evidence_agreements"] == "label_agreement=margin+knn"
    assert ModelMetadata.from_props(props) == meta
    assert "depois.evidence_agreements" not in _union_metadata().to_props()
    assert ModelMetadata.from_props(_union_metadata().to_props()).evidence_agreements == ()
    hash(meta)  # frozen and hashable, agreements included


@pytest.mark.parametrize("agreements", ["label_agreement=margin", "label_agreement=margin+oops",
                                        "nope=margin+knn", "label_agreement=margin+label_agreement", "=margin+knn",
                                        "label_agreement", "label_agreement=margin+margin",
                                        "label_agreement=margin+knn;label_agreement=critic+knn"])
def test_bad_evidence_agreements_are_a_one_line_contract_error(agreements: str) -> None:
    meta = _union_metadata(evidence_members=("critic", "margin", "knn", "label_agreement"),
                           evidence_weights=(0.2, 0.7, 0.7, 2.4),
                           evidence_agreements=(("label_agreement", ("margin", "knn")),))
    props = {**meta.to_props(), "depois.evidence_agreements": agreements}
    with pytest.raises(ContractError, match="metadata is invalid") as err:
        ModelMetadata.from_props(props)
    assert "\n" not in str(err.value) and "pydantic.dev" not in str(err.value)


def test_reason_is_the_member_with_the_smallest_weighted_p_value() -> None:
    from depois_stream.filter.detector import Prediction

    evidence = np.array([[0.001, 0.004, 0.5], [0.5, 0.004, 0.5], [0.5, 0.5, 0.5]], np.float32)
    common = dict(score=np.zeros(3, np.float32), poisoned=np.array([True, True, False]),
                  threshold=np.zeros(3, np.float32), p_value=None, evidence=evidence,
                  reason_names=("critic", "margin", "knn"))
    assert Prediction(**common).reasons == ["critic", "margin", ""]
    # critic weight 0.2: its 0.001 counts as 0.005, above the margin's 0.004 / 1.4
    assert Prediction(**common, reason_weights=(0.2, 1.4, 1.4)).reasons == ["margin", "margin", ""]
