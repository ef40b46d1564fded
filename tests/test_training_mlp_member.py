"""The ``mlp_margin`` member: a second classifier's label margin that counts through the label
family's agreement column (training/evidence.py), scored out of fold, shipped in the ONNX graph,
and absent without harm from detectors fitted (or saved) without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from depois_stream.contract import OUTPUT_EVIDENCE, ModelMetadata
from training.conformal import member_weights, reason
from training.config import FitConfig
from training.data import load_dataset
from training.detector import FittedDetector
from training.downstream import predict_proba
from training.evidence import AGREEMENT_ONLY_WEIGHT, MEMBERS, lone_agreement_only_as_plain, logit_margin
from training.export import export_onnx
from training.folds import MLP_SEED, FoldTask, train_fold, train_member_mlp
from training.pipeline import fit
from training.union import calibrate_union, column_names
from training.weighting import Weighting

TINY = {"auth_steps": 20, "gan_steps": 20, "critic_steps": 5, "n_synthetic": 100, "mlp_steps": 30}


def test_the_mlp_member_joins_only_where_the_calibration_set_reads_the_boundary_off_order_statistics() -> None:
    cfg = FitConfig()  # 1 % target: 1,000 calibration samples put 10 below the quantile
    assert not cfg.mlp_margin_joins(252) and not cfg.mlp_margin_joins(999)
    assert cfg.mlp_margin_joins(1000) and cfg.mlp_margin_joins(2400)
    assert FitConfig(target_fpr=0.05).mlp_margin_joins(252)
    assert not FitConfig(members="critic,margin").mlp_margin_joins(2400)
    with pytest.raises(ValueError, match="only mlp_margin"):
        fit(FitConfig.quick(members="mlp_margin", **TINY), progress=False)
MLP = MEMBERS.index("mlp_margin")


def test_the_mlp_margin_of_a_fold_comes_from_an_mlp_trained_on_the_other_folds_only() -> None:
    data = load_dataset("digits").train
    train, held_out = data.subset(np.arange(0, 200)), data.subset(np.arange(200, 260))
    task = FoldTask(1, train, held_out, 10, steps=5, batch_size=16, seed=3, neighbours=2, reference_seed=0,
                    mlp_steps=40)
    models, scores = train_fold(task, torch.device("cpu"))
    again = train_member_mlp(train, 10, 40, 3 + MLP_SEED)  # same data and seed, held-out part never seen
    expected = logit_margin(np.log(predict_proba(again, held_out.images)), held_out.labels)
    np.testing.assert_allclose(scores.raw[:, MLP], expected, rtol=1e-4, atol=1e-4)
    assert models.mlp is not None and np.ptp(scores.raw[:, MLP]) > 0
    assert models.mlp[1].out_features == 64  # no wider than the 8x8 input (28x28: the baseline's 256)
    without = FoldTask(1, train, held_out, 10, steps=5, batch_size=16, seed=3, neighbours=2, reference_seed=0)
    models0, scores0 = train_fold(without, torch.device("cpu"))
    assert models0.mlp is None and not scores0.raw[:, MLP].any()
    np.testing.assert_array_equal(scores0.raw[:, :MLP], scores.raw[:, :MLP])  # the other members as before


def test_the_agreement_only_member_has_a_token_share_while_its_agreement_is_in_the_union() -> None:
    cfg = FitConfig()
    label = dict(cfg.agreements(cfg.members))["label_agreement"]
    assert "mlp_margin" in label
    rel = Weighting(0.1, 0.8, label=2.0).relative(cfg.agreements(cfg.members))
    assert rel["mlp_margin"] == pytest.approx(2.0 * AGREEMENT_ONLY_WEIGHT)
    assert rel["label_agreement"] == pytest.approx(2.0 * 0.8 * 3)  # three members with columns of their own
    # without agreement columns (or without the rest of its family) it is a plain member
    assert Weighting(0.1, 0.0, label=2.0).relative(())["mlp_margin"] == 2.0  # a label member like the others
    assert FitConfig(members="critic,mlp_margin").agreements(("critic", "mlp_margin")) == ()
    lone = lone_agreement_only_as_plain({"critic": 0.1, "mlp_margin": AGREEMENT_ONLY_WEIGHT},
                                        ("critic", "mlp_margin"), ())
    assert lone == {"critic": 0.1, "mlp_margin": 1.0}
    kept = lone_agreement_only_as_plain({"mlp_margin": AGREEMENT_ONLY_WEIGHT}, ("margin", "mlp_margin"),
                                        (("label_agreement", ("margin", "mlp_margin")),))
    assert kept == {"mlp_margin": AGREEMENT_ONLY_WEIGHT}


LABEL = ("margin", "knn", "mahalanobis", "mlp_margin")


def _label_union(rng: np.random.Generator):
    cfg = FitConfig(members=LABEL)
    agreements = cfg.agreements(LABEL)
    cal = rng.normal(size=(4000, 4)).astype(np.float32)
    weights = member_weights(column_names(LABEL, agreements), cfg.relative_weights(LABEL))
    return calibrate_union(cal, np.zeros(4000, np.int64), 10, LABEL, 0.01, per_class=False, weights=weights,
                           agreements=agreements)


def test_the_mlp_adds_its_evidence_to_the_family_and_does_not_fire_alone() -> None:
    """A label flip that the CNN's three members each find a little odd is caught more often
    when the second classifier disagrees too. The MLP's own column never names the reason (its
    share is a token); a sample only the MLP finds far out is flagged by the agreement column."""
    rng = np.random.default_rng(7)
    union = _label_union(rng)
    lab = np.zeros(20_000, np.int64)
    fresh = rng.normal(size=(100_000, 4)).astype(np.float32)
    assert abs(np.mean(union.flagged(union.score(fresh, lab[:1].repeat(100_000)), lab[:1].repeat(100_000)))
               - 0.01) < 0.003
    poison = rng.normal(size=(20_000, 4)).astype(np.float32)
    poison[:, :3] -= 1.5
    agreeing = poison.copy()
    agreeing[:, 3] -= 1.5
    caught = np.mean(union.flagged(union.score(poison, lab), lab))
    caught_agreeing = np.mean(union.flagged(union.score(agreeing, lab), lab))
    assert caught_agreeing > caught + 0.1
    alone = np.zeros((3, 4), np.float32)
    alone[:, 3] = (-3.0, -4.0, -4.5)  # p ~ 1e-3 to 1e-5 for the MLP, the CNN's members typical
    flagged = union.flagged(union.score(alone, lab[:3]), lab[:3])
    assert not flagged[0]  # 1 in 1,000 by the MLP alone: its own column's token share does not fire
    assert flagged[1:].all()  # far out, Fisher's sum carries it: one member's p of 1e-5 is strong evidence
    for rows in (agreeing, alone):
        lp = union.column_log_p(rows, lab[: len(rows)])
        fired = reason(lp, union.weight_vector)[union.flagged(union.score(rows, lab[: len(rows)]), lab[: len(rows)])]
        assert fired.size and not np.any(fired == LABEL.index("mlp_margin"))
    assert np.all(reason(union.column_log_p(alone[1:], lab[:2]), union.weight_vector)
                  == union.columns.index("label_agreement"))


@pytest.mark.slow
def test_with_and_without_the_mlp_member_fit_save_load_and_export(tmp_path: Path) -> None:
    """With the member (the default where the calibration set is large enough): the shipped MLP is
    saved, reloaded and baked into the ONNX graph, whose mlp_margin evidence matches the numpy
    path. Without it (``--members`` leaving it out, like a detector saved before the member
    existed, or a pool too small for it): no MLP anywhere, and the rest works."""
    without = ",".join(m for m in MEMBERS if m != "mlp_margin")
    # 252 trusted digits: 12 calibration samples below a 5 % quantile, the MLP joins; 2.5 below 1 %, it does not
    for extra, has in (({"target_fpr": 0.05}, True), ({"target_fpr": 0.05, "members": without}, False),
                       ({}, False)):
        det = fit(FitConfig.quick(seed=2, **TINY, **extra), progress=False)
        assert (det.mlp is not None) == has and ("mlp_margin" in det.union.columns) == has
        assert det.report["mlp_margin"].startswith(("mlp_margin joins" if has else "mlp_margin not requested")
                                                   if has or "members" in extra else "mlp_margin left out")
        out = det.save(tmp_path / f"det-{len(extra)}")
        back = FittedDetector.load(out)
        assert (back.mlp is not None) == has and back.metadata.model_version == det.metadata.model_version
        cal = det.calibration
        np.testing.assert_array_equal(back.score(cal.images, cal.labels), det.score(cal.images, cal.labels))
        model = tmp_path / f"model-{len(extra)}.onnx"
        export_onnx(back, model)
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
        assert ("mlp_margin" in meta.evidence_members) == has
        if has:
            column = meta.evidence_members.index("mlp_margin")
            assert meta.evidence_weights[column] < 0.01 * min(w for i, w in enumerate(meta.evidence_weights)
                                                              if i != column)
            (evidence,) = session.run([OUTPUT_EVIDENCE], {"image": cal.images, "label": cal.labels})
            np.testing.assert_allclose(evidence[:, column], det.evidence(cal.images, cal.labels)[:, column],
                                       atol=3 * det.union.p_step + 1e-4)
