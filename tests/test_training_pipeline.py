"""End to end: `depois-train all` on digits, the ONNX contract, parity refusal, determinism."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from depois_stream.contract import (
    INPUT_IMAGE,
    INPUT_LABEL,
    OUTPUT_EVIDENCE,
    OUTPUT_P_VALUE,
    OUTPUT_POISONED,
    OUTPUT_SCORE,
    ModelCard,
    ModelMetadata,
    card_path_for,
    sha256_file,
)
from training import export as export_mod
from training.augment import authenticator_log_p, synthesize
from training.cli import app
from training.config import FitConfig
from training.conformal import member_weights
from training.data import load_dataset
from training.detector import FittedDetector, build_metadata, member_columns
from training.pipeline import fit
from training.negatives import NEGATIVE_KINDS
from training.union import calibrate_union
from training.weighting import Weighting

pytestmark = pytest.mark.slow

TINY = {"auth_steps": 20, "gan_steps": 20, "critic_steps": 5, "n_synthetic": 100}


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`depois-train all` on digits with FitConfig.quick() step counts; returns the output folder."""
    out = tmp_path_factory.mktemp("depois-train")
    q = FitConfig.quick()
    args = [
        "all", "--dataset", "digits", "--device", "cpu", "--seed", "0", "--out", str(out),
        "--auth-steps", str(q.auth_steps), "--gan-steps", str(q.gan_steps),
        "--critic-steps", str(q.critic_steps), "--n-synthetic", str(q.n_synthetic),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (out / "console.txt").write_text(result.output)
    return out


@pytest.fixture(scope="session")
def digits_detector(digits_run: Path) -> FittedDetector:
    return FittedDetector.load(digits_run / "detector")


def _session(model: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def _label_flip(labels: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(labels)) < rate
    poisoned = labels.copy()
    poisoned[flipped] = (labels[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    return poisoned, flipped


def test_onnx_model_separates_label_flips_on_the_digits_test_split(digits_run: Path) -> None:
    test = load_dataset("digits").test
    labels, flipped = _label_flip(test.labels, 0.2, seed=7)
    score, poisoned, p_value, _ = _session(digits_run / "model.onnx").run(
        None, {INPUT_IMAGE: test.images, INPUT_LABEL: labels}
    )
    assert roc_auc_score(flipped, -score) >= 0.9
    assert poisoned[flipped].mean() > 0.5  # most flips are stopped at the calibrated boundary
    assert poisoned[~flipped].mean() < 0.1  # while clean traffic mostly passes
    assert roc_auc_score(flipped, -p_value) >= 0.9


def test_run_writes_plots_card_and_a_loadable_detector(digits_run: Path, digits_detector: FittedDetector) -> None:
    for name in ("losses.png", "synthetic_grid.png"):
        assert (digits_run / name).read_bytes()[:4] == b"\x89PNG"
    card = ModelCard.model_validate_json(card_path_for(digits_run / "model.onnx").read_text())
    assert card.onnx_sha256 == sha256_file(digits_run / "model.onnx")
    # cross-fitting: every one of the 252 trusted digits is scored out of fold and calibrates
    assert card.sizes["calibration"] == len(digits_detector.calibration) == 252
    # the card reports the FPR measured out of sample (never the in-sample flag rate, <= target by
    # construction); with 252 samples it scatters, but a broken calibration flags far more
    assert 0.0 <= card.calibration["out_of_sample_fpr"] <= 5 * digits_detector.metadata.target_fpr
    assert 0.0 < digits_detector.report["acceptance_rate"] <= 1.0


def test_the_summary_says_how_far_this_fit_s_fpr_may_land_from_the_target(digits_run: Path) -> None:
    """The out-of-sample FPR row is read off the same 252 calibration samples: over 16 digits
    pools it did not predict where a fit's realised FPR landed (docs/evaluation.md), so the
    summary states the scatter next to it, and the warning says to recalibrate on the stream."""
    text = " ".join((digits_run / "console.txt").read_text().split())
    assert re.search(r"FPR scatter, new data \(binomial sd\) │ +\+-0\.63% │", text), text[-3000:]
    assert "depois-train recalibrate" in text


def test_onnx_contract_names_dtypes_dynamic_batch_and_metadata(
    digits_run: Path, digits_detector: FittedDetector
) -> None:
    model = digits_run / "model.onnx"
    session = _session(model)
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        (INPUT_IMAGE, "tensor(float)"), (INPUT_LABEL, "tensor(int64)")
    ]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_SCORE, OUTPUT_POISONED, OUTPUT_P_VALUE, OUTPUT_EVIDENCE]
    assert onnx.load(str(model)).opset_import[0].version >= 17
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    assert meta == digits_detector.metadata
    assert meta.input_shape == (1, 8, 8) and meta.has_p_value
    cal = digits_detector.calibration
    for n in (1, 7, len(cal)):
        score, poisoned, p_value, evidence = session.run(
            None, {INPUT_IMAGE: cal.images[:n], INPUT_LABEL: cal.labels[:n]}
        )
        assert score.shape == poisoned.shape == p_value.shape == (n,)
        assert score.dtype == np.float32 and poisoned.dtype == np.bool_ and p_value.dtype == np.float32
        np.testing.assert_allclose(score, digits_detector.score(cal.images[:n], cal.labels[:n]), rtol=1e-4, atol=1e-4)
        assert evidence.shape == (n, len(meta.evidence_members)) and evidence.dtype == np.float32
        np.testing.assert_allclose(evidence, digits_detector.evidence(cal.images[:n], cal.labels[:n]), atol=1e-3)
        # the score is the log of the smallest weighted evidence p-value, min_j p_j / w_j
        w = np.asarray(meta.evidence_weights, np.float32)
        np.testing.assert_allclose(score, np.log((evidence / w).min(axis=1)), rtol=1e-4, atol=1e-4)
    # every member, then one agreement column per family (Fisher's sum of its members' log p, its own
    # p-value); the weights are the split fit chose (test_fit_uses_records_and_cards_the_budget_split_it_chose)
    assert meta.evidence_members == ("critic", "margin", "knn", "mahalanobis", "novelty", "density", "pixel_knn",
                                     "pixel_mahalanobis", "label_agreement", "pixel_agreement")
    assert meta.evidence_agreements == (("label_agreement", ("margin", "knn", "mahalanobis")),
                                        ("pixel_agreement", ("density", "pixel_knn", "pixel_mahalanobis")))
    assert sum(meta.evidence_weights) == pytest.approx(len(meta.evidence_members))


def test_runtime_reason_is_the_member_that_set_the_weighted_score(digits_run: Path) -> None:
    """The consumer's depois.reason header must name the member whose p_j / w_j is the score,
    not the plain smallest p-value (which would blame the down-weighted critic)."""
    from depois_stream.filter.detector import Detector

    det = Detector.load(digits_run / "model.onnx", device="cpu")
    test = load_dataset("digits").test
    rng = np.random.default_rng(0)
    labels = (test.labels + rng.integers(1, 10, len(test.labels))) % 10  # flipped: most get flagged
    pred = det.predict(test.images, labels)
    w = np.asarray(det.metadata.evidence_weights, np.float32)
    setter = np.argmin(pred.evidence / w, axis=1)
    np.testing.assert_array_equal(pred.reason_index, setter)
    flagged = pred.poisoned
    assert flagged.mean() > 0.5
    # the named member's weighted p-value is the score (where float32 has not underflowed to 0) ...
    rows = np.flatnonzero(pred.evidence[np.arange(len(setter)), setter] > 0)
    np.testing.assert_allclose(np.log(pred.evidence[rows, setter[rows]] / w[setter[rows]]), pred.score[rows],
                               rtol=1e-4, atol=1e-4)
    # ... and it is not always the plain smallest p-value (else this test could not tell them apart):
    # on clean samples the down-weighted critic often has the smallest p but does not set the score
    clean = det.predict(test.images, test.labels)
    assert np.any(clean.reason_index != clean.evidence.argmin(axis=1))
    assert np.all(clean.reason_index == np.argmin(clean.evidence / w, axis=1))
    assert [r for r, f in zip(pred.reasons, flagged) if f] == [det.reason_names[k] for k in setter[flagged]]


def test_export_refuses_a_graph_that_disagrees_with_torch(
    digits_detector: FittedDetector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Shifted(export_mod.ScoringGraph):
        def forward(self, image, label):
            score, poisoned, p_value, evidence = super().forward(image, label)
            return score + 1e-2, poisoned, p_value, evidence

    monkeypatch.setattr(export_mod, "build_scoring_graph", Shifted)
    target = tmp_path / "broken.onnx"
    with pytest.raises(export_mod.ExportParityError, match="no model was written"):
        export_mod.export_onnx(digits_detector, target)
    assert list(tmp_path.iterdir()) == []


def test_synthesis_keeps_only_samples_the_authenticator_vouches_for(digits_detector: FittedDetector) -> None:
    import torch

    from training.augment import train_cgan

    trusted = digits_detector.trusted
    cgan = train_cgan(trusted, digits_detector.authenticator, 10, 30, 64, seed=5, device=torch.device("cpu"))
    result = synthesize(
        cgan.generator, digits_detector.authenticator, 300, 10, threshold=0.9, seed=6,
        device=torch.device("cpu"), batch_size=256, max_attempts_factor=3,
    )
    log_p = authenticator_log_p(
        digits_detector.authenticator, result.accepted.images, result.accepted.labels, torch.device("cpu")
    )
    assert len(result.accepted) > 0 and np.all(np.exp(log_p) >= 0.9 - 1e-6)
    assert result.acceptance_rate < 1.0  # an undertrained generator's samples get rejected
    assert result.passed >= len(result.accepted) and result.attempted >= 256


def test_fit_is_deterministic_under_a_seed() -> None:
    test = load_dataset("digits").test
    runs = [fit(FitConfig.quick(seed=s, **TINY), progress=False) for s in (11, 11, 12)]
    scores = [d.score(test.images, test.labels) for d in runs]
    np.testing.assert_array_equal(scores[0], scores[1])
    assert runs[0].metadata.boundary == runs[1].metadata.boundary
    assert not np.allclose(scores[0], scores[2])


def test_infer_threshold_moves_the_operating_point_on_new_clean_data(digits_run: Path) -> None:
    det = FittedDetector.load(digits_run / "detector")  # a private copy: this test mutates it
    version_before = det.metadata.model_version
    test = load_dataset("digits").test
    boundary = det.infer_threshold(test.images, test.labels, target_fpr=0.05, per_class=False)
    assert det.metadata.boundary == boundary and det.metadata.target_fpr == 0.05
    # another boundary is another model: quarantine headers must be able to tell them apart
    assert det.metadata.model_version != version_before
    assert det.metadata.model_version.startswith("digits-seed")
    assert 0.03 <= det.predict(test.images, test.labels).mean() <= 0.05
    assert abs(np.mean(det.p_value(test.images, test.labels) <= 0.05) - 0.05) < 0.02


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test key")
def test_export_onnx_signs_the_model_and_card_that_a_consumer_then_verifies(
        digits_run: Path, tmp_path: Path) -> None:
    from depois_stream.contract.signing import verify_model

    private, public = tmp_path / "team.pem", tmp_path / "team.pub"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                    str(private)], check=True)
    subprocess.run(["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)],
                   check=True, capture_output=True)
    model = tmp_path / "signed" / "model.onnx"
    result = CliRunner().invoke(app, ["export-onnx", "--out", str(digits_run), "--model",
                                      str(model), "--sign-key", str(private)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "signed" / "model.sig").is_file()
    verified = verify_model(model, public)
    assert verified.model_bytes == model.read_bytes()


def test_a_detector_saved_before_member_weights_still_loads_as_plain_min_p(digits_run: Path, tmp_path: Path) -> None:
    """Detector folders written before ``evidence_weights`` existed carry no weights in their
    metadata; they were calibrated with plain min-p and must load (and score) as such."""
    from training.conformal import union_log_p

    det = FittedDetector.load(digits_run / "detector")
    det.metadata = det.metadata.model_copy(update={"evidence_weights": (), "evidence_agreements": (),
                                                   "evidence_members": det.members})
    det.union = det.calibrate(det.members, det.metadata.target_fpr, True)
    det.metadata = det.metadata.model_copy(update={"boundary": det.union.boundary})
    det.save(tmp_path / "old")
    # as written then: neither the metadata nor the config knew weights or agreements
    state_file = tmp_path / "old" / "detector.json"
    state = json.loads(state_file.read_text())
    for key in ("evidence_weights", "evidence_agreements"):
        del state["metadata"][key]
    for key in ("critic_weight", "agreement_share"):
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    old = FittedDetector.load(tmp_path / "old")
    np.testing.assert_array_equal(old.union.weight_vector, np.ones(len(old.members)))
    assert old.union.agreements == () and old.union.columns == old.members
    test = load_dataset("digits").test
    raw = old.raw_evidence(test.images, test.labels)[:, member_columns(old.members)]  # every MEMBERS column -> its members'
    lp = old.union.member_log_p(raw, test.labels)
    np.testing.assert_allclose(old.score(test.images, test.labels), union_log_p(lp).astype(np.float32))


def test_without_agreements_hands_each_agreement_weight_back_to_its_members(digits_detector: FittedDetector) -> None:
    """The ``without-agreements`` ablation is the union as it was before agreement columns: the
    critic at 0.1 and every other member at 1, no extra columns."""
    det = digits_detector
    plain = det.calibrate(det.members, det.metadata.target_fpr, True, with_agreements=False)
    assert plain.columns == det.members and plain.agreements == ()
    np.testing.assert_allclose(plain.weight_vector / plain.weight_vector[1], [0.1] + [1.0] * (len(det.members) - 1))
    stop22 = calibrate_union(det.calibration_raw[:, member_columns(det.members)], det.calibration_labels, 10,
                             det.members, det.metadata.target_fpr, True,
                             weights=member_weights(det.members, {"critic": 0.1}))
    assert plain.boundary == stop22.boundary
    # ablations drop a member from its family's agreement and keep the agreement while two remain
    subset = tuple(m for m in det.members if m != "density")
    assert det.calibrate(subset, det.metadata.target_fpr, True).columns == subset + (
        "label_agreement", "pixel_agreement")
    assert det.agreements(subset)[1] == ("pixel_agreement", ("pixel_knn", "pixel_mahalanobis"))


def test_a_union_without_agreement_columns_exports_with_parity(digits_detector: FittedDetector, tmp_path: Path) -> None:
    """``--agreement-share 0`` (or a union with no family of two members): the graph has no
    agreement columns and still matches the numpy path."""
    import copy

    det = copy.copy(digits_detector)
    det.union = det.calibrate(det.members, det.metadata.target_fpr, True, with_agreements=False)
    det.metadata = build_metadata(det.config, det.union, det.metadata.input_shape, det.metadata.num_classes,
                                  det.metadata.weights_sha256 or "")
    assert det.metadata.evidence_agreements == () and det.metadata.evidence_members == det.members
    export_mod.export_onnx(det, tmp_path / "plain.onnx")
    cal = det.calibration
    score, _, _, evidence = _session(tmp_path / "plain.onnx").run(
        None, {INPUT_IMAGE: cal.images, INPUT_LABEL: cal.labels})
    assert evidence.shape == (len(cal), len(det.members))
    np.testing.assert_allclose(score, det.score(cal.images, cal.labels), rtol=1e-4, atol=1e-4)


def test_by_default_fit_searches_the_split_but_digits_is_too_small_and_its_card_says_so(
        digits_run: Path, digits_detector: FittedDetector) -> None:
    """The search is on by default (stop 33); digits' 252 calibration samples cannot compare splits
    at one order-statistic boundary, so the configured split stays (the model is unchanged)."""
    assert FitConfig().weight_search
    det = digits_detector
    weighting = det.report["weighting"]
    assert weighting["accepted"] is False and weighting["skipped"].startswith("252 calibration samples")
    configured = FitConfig().weighting().vector(det.members, det.agreements(det.members))
    np.testing.assert_allclose(det.metadata.evidence_weights, configured)
    card = ModelCard.model_validate_json(card_path_for(digits_run / "model.onnx").read_text())
    assert any(note.startswith("budget split as configured") and "(no search: 252 calibration samples" in note
               for note in card.notes)


def test_fixed_weights_skips_the_search_and_its_card_says_so() -> None:
    det = fit(FitConfig.quick(seed=11, weight_search=False, **TINY), progress=False)
    assert det.report["weighting"]["candidates"] == 0 and det.report["weighting"]["accepted"] is False
    assert export_mod._weighting_note(det.report["weighting"]).startswith("budget split as configured (no search")


def test_digits_is_too_small_for_the_search_at_1_percent_and_the_report_says_why() -> None:
    det = fit(FitConfig.quick(seed=11, weight_search=True, **TINY), progress=False)
    w = det.report["weighting"]
    assert w["candidates"] == 1 and w["accepted"] is False and "252 calibration samples" in w["skipped"]
    assert set(w["synthetic_detection_configured"]) == set(NEGATIVE_KINDS)
    configured = FitConfig().weighting().vector(det.members, det.agreements(det.members))
    np.testing.assert_allclose(det.metadata.evidence_weights, configured)


def test_a_searched_split_is_what_the_model_scores_with_and_survives_save_and_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """At a 5 % target the 252 digits put 12 below the quantile, so fit searches all candidates;
    whatever split it takes is the one in the metadata, the graph's weights and a reloaded detector.
    The search's own pick is replaced by a fixed one so that the test does not depend on it."""
    import training.pipeline as pipeline_mod
    from training.weighting import CANDIDATES, WeightChoice

    forced = Weighting(0.3, 0.3, label=2.0, novelty=0.25)
    calls, search = [], pipeline_mod.choose_weighting

    def choose(*args: object, **kwargs: object) -> WeightChoice:
        real = search(*args, **kwargs)
        calls.append(real)
        return WeightChoice(forced, real.anchor, real.searched, real.anchor_rates, real.best_rates, forced,
                            real.gain, real.standard_error, real.skipped)

    monkeypatch.setattr(pipeline_mod, "choose_weighting", choose)
    det = fit(FitConfig.quick(seed=11, target_fpr=0.05, weight_search=True, **TINY), progress=False)
    assert len(calls) == 1 and calls[0].skipped is None and calls[0].searched > 1
    assert det.report["weighting"]["chosen"] == {"critic": 0.3, "agreement_share": 0.3, "label": 2.0, "pixel": 1.0,
                                                 "novelty": 0.25}
    expected = forced.vector(det.members, det.agreements(det.members))
    assert not np.allclose(expected, FitConfig().weighting().vector(det.members, det.agreements(det.members)))
    np.testing.assert_allclose(det.metadata.evidence_weights, expected)
    np.testing.assert_allclose(det.union.weight_vector, expected)
    det.save(tmp_path / "det")
    again = FittedDetector.load(tmp_path / "det")
    np.testing.assert_allclose(again.union.weight_vector, expected)
    assert again.metadata.model_version == det.metadata.model_version
    test = load_dataset("digits").test
    np.testing.assert_array_equal(again.score(test.images[:64], test.labels[:64]),
                                  det.score(test.images[:64], test.labels[:64]))
    assert len(CANDIDATES) == 72


def test_scoring_graph_follows_the_module_to_another_device(digits_detector: FittedDetector) -> None:
    """`module.to(device)` must take every tensor the forward pass uses: the torch-eager scorer
    (bench_scorer.py --device cuda, evaluate on a GPU) failed on CUDA with 'cuda:0 and cpu'. The
    meta device stands in for CUDA on this CPU-only machine: any tensor left behind on the CPU
    raises the same device-mismatch error."""
    from training.export import build_scoring_graph

    graph = build_scoring_graph(digits_detector).to("meta")
    c, h, w = digits_detector.metadata.input_shape
    with torch.inference_mode():
        score, poisoned, p_value, evidence = graph(torch.zeros(3, c, h, w, device="meta"),
                                                   torch.zeros(3, dtype=torch.int64, device="meta"))
    assert score.device.type == poisoned.device.type == p_value.device.type == "meta"
    assert evidence.shape == (3, len(digits_detector.metadata.evidence_members))


def test_export_of_a_gpu_trained_detector_checks_parity_on_the_cpu(digits_detector: FittedDetector,
                                                                   tmp_path: Path) -> None:
    """The graph is traced from CPU copies of the networks, so parity must compare it with the
    detector's own path on the CPU. On an H200 `depois-train all --device cuda` (Fashion-MNIST)
    refused its own export: the reference ran on the GPU, whose cuDNN (TF32) convolutions round
    differently, and one union p-value moved by 0.0025, past the 3-step tolerance. Here the
    detector claims CUDA on a machine without it: any scoring on that device raises."""
    import copy

    on_gpu = copy.copy(digits_detector)
    on_gpu.device = torch.device("cuda")
    card = export_mod.export_onnx(on_gpu, tmp_path / "model.onnx")
    assert card.metadata.model_version == digits_detector.metadata.model_version
    assert on_gpu.device.type == "cuda"  # the caller's detector is left as it was


def _exported_samples(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """samples.npz exactly as `depois-stream replay export --topic <ingest>` writes it: the records
    are ingest-topic records (wire-encoded, no router headers)."""
    from depois_stream.audit.export import SAMPLES, export
    from depois_stream.audit.records import QuarantinedRecord
    from depois_stream.contract import headers as H
    from depois_stream.contract.wire import encode_batch

    ids = [f"s{i}" for i in range(len(labels))]
    records = [QuarantinedRecord.from_kafka("ingest", 0, i, 0, sid.encode(), value,
                                            [(H.CONTENT_TYPE, ctype.encode())])
               for i, (sid, (value, ctype)) in enumerate(zip(ids, encode_batch(ids, images, labels,
                                                                              encoding="binary")))]
    export(records, folder)
    return folder / SAMPLES


def test_recalibrate_moves_the_boundary_onto_clean_samples_and_keeps_the_original(
        digits_run: Path, tmp_path: Path) -> None:
    test = load_dataset("digits").test
    samples = _exported_samples(tmp_path / "vetted", test.images, test.labels)
    before = FittedDetector.load(digits_run / "detector")
    into = tmp_path / "recal"
    result = CliRunner().invoke(app, ["recalibrate", "--out", str(digits_run), "--clean", str(samples),
                                      "--into", str(into), "--target-fpr", "0.05", "--global"])
    assert result.exit_code == 0, result.output
    assert f"export-onnx --out {into}" in result.output
    det = FittedDetector.load(into / "detector")
    assert det.metadata.target_fpr == 0.05 and det.metadata.boundary.per_class is None
    assert det.metadata.model_version != before.metadata.model_version
    assert 0.03 <= det.predict(test.images, test.labels).mean() <= 0.05
    assert len(det.report["cv_fpr"]) == 10 and 0.0 < det.report["cv_fpr_mean"] < 0.12
    # the original is untouched
    assert FittedDetector.load(digits_run / "detector").metadata == before.metadata
    # and the recalibrated one exports, its card saying where its calibration came from
    result = CliRunner().invoke(app, ["export-onnx", "--out", str(into)])
    assert result.exit_code == 0, result.output
    card = ModelCard.model_validate_json(card_path_for(into / "model.onnx").read_text())
    assert card.calibration["calibration_samples"] == len(test.labels)
    assert card.metadata.model_version == det.metadata.model_version
    assert any(f"recalibrated on {len(test.labels)} clean samples" in note for note in card.notes)
    score, poisoned, _, _ = _session(into / "model.onnx").run(
        None, {INPUT_IMAGE: test.images, INPUT_LABEL: test.labels})
    np.testing.assert_array_equal(poisoned.astype(bool), det.predict(test.images, test.labels))


@pytest.mark.parametrize(("content", "needle"), [
    (b"", "cannot read"), (b"PK\x03\x04broken", "cannot read"), ("npy", "single array")])
def test_recalibrate_refuses_a_file_that_is_not_an_npz_in_one_line(digits_run: Path, tmp_path: Path,
                                                                     content, needle: str) -> None:
    path = tmp_path / "samples.npz"
    if content == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros((200, 1, 8, 8), np.float32))
    else:
        path.write_bytes(content)
    result = CliRunner().invoke(app, ["recalibrate", "--out", str(digits_run), "--clean", str(path),
                                      "--into", str(tmp_path / "recal")])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --clean:") and needle in lines[0], result.output
    assert not (tmp_path / "recal").exists()  # nothing written, not even the folder


@pytest.mark.parametrize(("arrays", "needle"), [
    ({"images": np.zeros((200, 1, 28, 28), np.float32), "labels": np.zeros(200, np.int64)}, "must be [N, 1, 8, 8]"),
    ({"images": np.zeros((200, 1, 8, 8), np.float32), "labels": np.int64(3)}, "labels of shape"),
    ({"images": np.full((200, 1, 8, 8), "x"), "labels": np.zeros(200, np.int64)}, "pass uint8 0..255 or float"),
    ({"images": np.zeros((0, 1, 8, 8), np.float32), "labels": np.zeros(0, np.int64)}, "no images"),
    ({"images": np.zeros((200, 1, 8, 8), np.float32), "labels": np.full(200, 10)}, "labels must be"),
    ({"images": np.full((200, 1, 8, 8), 16.0, np.float32), "labels": np.zeros(200, np.int64)}, "scaled to [0, 1]"),
    ({"pictures": np.zeros((200, 1, 8, 8), np.float32)}, "no 'images' and 'labels'"),
    ({"images": np.zeros((10, 1, 8, 8), np.float32), "labels": np.zeros(10, np.int64)}, "cannot place"),
])
def test_recalibrate_refuses_unusable_clean_samples_in_one_line(digits_run: Path, tmp_path: Path,
                                                                  arrays: dict, needle: str) -> None:
    path = tmp_path / "samples.npz"
    np.savez(path, **arrays)
    result = CliRunner().invoke(app, ["recalibrate", "--out", str(digits_run), "--clean", str(path),
                                      "--into", str(tmp_path / "recal")])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --clean:") and needle in lines[0], result.output
    assert not (tmp_path / "recal").exists()


def test_recalibrate_refuses_samples_the_current_model_flags_far_beyond_its_target(
        digits_run: Path, tmp_path: Path) -> None:
    """200 noise images labelled 0, given as "clean": recalibrating on them switched the pixel
    evidence off (noise caught 5 % instead of 100 %). Refused in one line; an operator who means
    it says so with --max-flagged."""
    rng = np.random.default_rng(0)
    path = tmp_path / "samples.npz"
    np.savez(path, images=rng.random((200, 1, 8, 8), dtype=np.float32), labels=np.zeros(200, np.int64))
    args = ["recalibrate", "--out", str(digits_run), "--clean", str(path)]
    result = CliRunner().invoke(app, [*args, "--into", str(tmp_path / "recal")])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "flags" in lines[0] and "--max-flagged" in lines[0], result.output
    assert not (tmp_path / "recal").exists()
    forced = CliRunner().invoke(app, [*args, "--into", str(tmp_path / "forced"), "--max-flagged", "1"])
    assert forced.exit_code == 0, forced.output


def test_recalibrate_never_overwrites_the_original_or_another_detector(digits_run: Path, tmp_path: Path) -> None:
    for into in (digits_run, digits_run.parent / digits_run.name / ".", tmp_path / "taken"):
        (tmp_path / "taken" / "detector").mkdir(parents=True, exist_ok=True)
        result = CliRunner().invoke(app, ["recalibrate", "--out", str(digits_run), "--clean", "x.npz",
                                          "--into", str(into)])
        assert result.exit_code == 2, result.output
        assert "--into must differ" in result.output or "exists already" in result.output, result.output


def test_recalibrate_writes_next_to_out_by_default_and_its_parity_samples_survive_a_reload(
        digits_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    shutil.copytree(digits_run / "detector", out / "detector")
    test = load_dataset("digits").test
    samples = _exported_samples(tmp_path / "vetted", test.images, test.labels)
    result = CliRunner().invoke(app, ["recalibrate", "--out", f"{out}/", "--clean", str(samples)])
    assert result.exit_code == 0, result.output
    det = FittedDetector.load(tmp_path / "model-recalibrated" / "detector")
    # the export's parity check and int8 gate look where the new boundary was read off
    np.testing.assert_array_equal(det.calibration.labels, test.labels)
    assert det.calibration.images.shape == test.images.shape
    assert det.report["plan"]["warning"].startswith(f"recalibrated on {len(test.labels)} clean samples")
    assert det.metadata.boundary.per_class is not None  # as fitted (digits: per class)
