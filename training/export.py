"""Export a FittedDetector to the single-file ONNX contract of ``depois_stream.contract``.

The graph computes the final verdict itself (networks, the evidence members with their
trusted references, per-class standardisation, per-member conformal p-values, weighted min-p, per-class
boundary, union p-value), so the torch-free runtime only feeds pixels and labels and reads the
answer: there is no second implementation of the maths in the consumer to drift apart. kNN
distances are one Gemm against the stored trusted embeddings followed by TopK (or, with few
references per class, rounds of min-and-remove); tensors of that part and of the p-value lookup
keep the samples innermost, the layout onnxruntime's CPU reductions run fastest on.

Before anything is written, the ONNX model is run with onnxruntime on the calibration samples and
compared with the detector's own numpy scoring path (score, verdict, p-value and every evidence
p-value); a model that disagrees is refused.
"""

from __future__ import annotations

import copy
import logging
import math
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
    OUTPUT_EVIDENCE,
    OUTPUT_P_VALUE,
    OUTPUT_POISONED,
    OUTPUT_SCORE,
    ModelCard,
    card_path_for,
    sha256_file,
)
from training.conformal import fpr_standard_error
from training.detector import FittedDetector
from training.evidence import D2_MIN, PAD_D2, PAD_SIMILARITY

OPSET = 18
# Typical agreement: float32 graphs agree with the numpy path to ~1e-7 of the score; a wrong
# constant or operation moves every sample, so the *median* relative score difference must stay
# below MEDIAN_RTOL.
MEDIAN_RTOL = 1e-5
# Worst case: p-values interpolate linearly between neighbouring reference scores, so where two
# of them lie 1e-6 apart a float32 rounding moves p by up to one step 1 / (n + 1), and that error
# carries from member p-values into the score and the union p-value. Single samples may therefore
# differ by up to P_STEPS reference steps (+ PARITY_ATOL); verdicts, which decide, must agree exactly.
P_STEPS = 3
PARITY_ATOL = 1e-4
SMALL_TOPK = 128  # k * references-per-class up to which the kNN members avoid TopK (see _mean_k_nearest)
REMOVED_D2 = 10.0 * PAD_D2  # beyond every real and padded squared distance: a reference already taken


class ExportParityError(RuntimeError):
    """The exported graph disagrees with the torch/numpy detector; nothing was written."""


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table.reshape(-1)[index]`` as one ONNX Gather (plain indexing exports as GatherND)."""
    return torch.index_select(table.reshape(-1), 0, index.reshape(-1)).reshape(index.shape)


def _count_at_most(knots: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[J, N] ``#{knots[j] <= z[j, n]}`` for sorted knots [J, K]: numpy's
    ``searchsorted(side="right")``, which ONNX lacks.

    Two levels instead of one comparison per knot: the knots are cut into G blocks of B
    (B = ceil(sqrt(K)), the last block padded with +inf). Counting the blocks whose first knot is
    <= z finds the one block that can hold the boundary (every knot before it is <= z, every knot
    after it > z); only its B knots are then compared. G + B comparisons instead of K (23 for
    128 knots), each the same float32 comparison, so the count is exact. The block's knots are
    gathered as rows ([J * N, B]): a Gather along the second axis cost more than it saved."""
    j, k = knots.shape
    b = math.isqrt(k - 1) + 1 if k > 1 else 1
    g = -(-k // b)
    pad = torch.full((j, g * b - k), math.inf, dtype=knots.dtype, device=knots.device)
    blocks = torch.cat([knots, pad], dim=1).reshape(j * g, b)
    firsts = blocks[:, 0].reshape(j, g)
    block = torch.clamp((firsts[:, :, None] <= z[:, None, :]).to(torch.float32).sum(dim=1).to(torch.int64) - 1, min=0)
    rows = torch.arange(j, dtype=torch.int64, device=knots.device)[:, None] * g + block  # [J, N]
    inside = torch.index_select(blocks, 0, rows.reshape(-1))  # [J*N, B]
    within = (inside <= z.reshape(-1, 1)).to(torch.float32).sum(dim=1).to(torch.int64).reshape(j, -1)
    return block * b + within


def _log_p(z: torch.Tensor, knots: torch.Tensor, counts: torch.Tensor, n: int, beta: torch.Tensor) -> torch.Tensor:
    """``training.conformal.log_p_knots`` for every member at once: z [J, N] (member, sample),
    knots [J, K] sorted, counts [J, K] = #{r <= knot} in the full reference of size n, beta [J].
    Samples innermost, as in ``_mean_k_nearest``."""
    k = knots.shape[1]
    idx = _count_at_most(knots, z)
    offsets = torch.arange(knots.shape[0], dtype=torch.int64, device=knots.device)[:, None] * k
    lo_pos = offsets + torch.clamp(idx - 1, min=0, max=k - 1)
    hi_pos = offsets + torch.clamp(idx, min=0, max=k - 1)
    lo, hi, lo_c, hi_c = _take(knots, lo_pos), _take(knots, hi_pos), _take(counts, lo_pos), _take(counts, hi_pos)
    frac = torch.clamp((z - lo) / torch.clamp(hi - lo, min=1e-12), min=0.0, max=1.0)
    log_n1 = math.log(n + 1.0)
    inner = torch.log(torch.clamp(lo_c + frac * (hi_c - lo_c), min=1.0)) - log_n1
    tail = torch.clamp((z - knots[:, :1]) / beta[:, None] - log_n1, max=-log_n1)
    return torch.where(idx == 0, tail, torch.where(idx >= k, math.log(n / (n + 1.0)), inner))


def _mean_k_nearest(d2: torch.Tensor, k: int) -> torch.Tensor:
    """``training.evidence.mean_k_nearest``: squared distances laid out [K, M, N] (class, reference,
    sample) -> [N, K] mean distance to the k nearest of each class.

    Samples innermost: every reduction and mask below then runs over rows of N contiguous floats
    instead of N * K rows of M (29 on digits), which onnxruntime's kernels pay for per row."""
    m = d2.shape[1]
    if k * m <= SMALL_TOPK:
        # Few references per class (digits: k = 2 of 29): TopK over 10 tiny rows per sample is
        # dominated by per-row overhead; k rounds of min-and-remove are 2x cheaper and give the
        # same multiset of the k smallest distances. A round removes every reference at the
        # minimum and counts its copies (capped at k in all), so ties come out as numpy's sort
        # gives them without an ArgMin, and removal is an Add, not a Where (both slower in
        # onnxruntime than the Equal, Cast and ReduceSum they are replaced by).
        dist = torch.zeros_like(d2[:, 0, :])
        taken = torch.zeros_like(dist)  # how many of the k are already summed
        for _ in range(k - 1):
            best = d2.min(dim=1, keepdim=True).values
            at_best = (d2 == best).to(torch.float32)
            copies = torch.clamp(at_best.sum(dim=1), max=k - taken)  # ties count once each, k in all
            dist = dist + copies * torch.sqrt(torch.clamp(best[:, 0, :], min=D2_MIN))
            taken = taken + copies
            d2 = d2 + at_best * REMOVED_D2  # removed: beyond every reference left
        last = d2.min(dim=1).values  # the last round takes what is still missing of the k
        return ((dist + (k - taken) * torch.sqrt(torch.clamp(last, min=D2_MIN))) / k).T
    top = torch.topk(d2, k, dim=1, largest=False, sorted=False).values
    return torch.sqrt(torch.clamp(top, min=D2_MIN)).mean(dim=1).T


def _distance_ratio(dist: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``training.evidence.distance_ratio``: log d_other - log d_same from [N, K] class distances."""
    same = torch.gather(dist, 1, label[:, None])[:, 0]
    mask = torch.nn.functional.one_hot(label, dist.shape[1]).to(dist.dtype) * 1e6
    return torch.log((dist + mask).min(dim=1).values) - torch.log(same)


def _logit_margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``training.evidence.logit_margin``: z_y - max_{y' != y} z_y' from [N, K] logits."""
    own = torch.gather(logits, 1, label[:, None])[:, 0]
    mask = torch.nn.functional.one_hot(label, logits.shape[1]).to(logits.dtype) * 1e9
    return own - (logits - mask).max(dim=1).values


class ScoringGraph(nn.Module):
    """Everything between (image, label) and (score, poisoned, p_value, evidence), as torch ops.

    Constants (trusted embeddings, Mahalanobis means and Cholesky factor, PCA basis and trusted
    projections, standardisation, p-value references, thresholds) become buffers, so they are
    baked into the ONNX initialisers with the weights."""

    def __init__(self, det: FittedDetector):
        super().__init__()
        meta, refs, union = det.metadata, det.references, det.union
        self.authenticator = copy.deepcopy(det.authenticator).cpu().eval()
        self.critic = copy.deepcopy(det.critic).cpu().eval()
        self.members = tuple(union.members)
        self.mlp = copy.deepcopy(det.mlp).cpu().eval() if "mlp_margin" in self.members else None
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        kk, m, d = refs.knn.reference.shape
        self.knn_shape, self.knn_k = (kk, m), refs.knn.k
        # d2 = 2 - 2 (sim + pad) as one Gemm: -2 * reference is exact (a power of two), padded rows
        # are zeros, so -2 sim + (2 - 2 pad) rounds exactly as the numpy member does
        self.register_buffer("knn_ref_m2", f32(-2.0 * refs.knn.reference.reshape(kk * m, d)))
        self.register_buffer("knn_d2_bias", f32(2.0 - 2.0 * np.where(refs.knn.valid.reshape(-1), 0.0, PAD_SIMILARITY)))
        self.register_buffer("maha_means", f32(refs.mahalanobis.means))
        self.register_buffer("maha_chol", f32(refs.mahalanobis.chol))
        self.novelty_k = refs.novelty.k
        self.register_buffer("nov_mean", f32(refs.novelty.mean))
        self.register_buffer("nov_comp_t", f32(refs.novelty.components.T))
        self.register_buffer("nov_ref_t", f32(refs.novelty.reference.T))
        self.register_buffer("nov_ref_sq", f32(refs.novelty.reference_sq))
        kk, m, d = refs.pixel_knn.reference.shape
        self.pknn_shape, self.pknn_k = (kk, m), refs.pixel_knn.k
        self.register_buffer("pknn_ref", f32(refs.pixel_knn.reference.reshape(kk * m, d)))
        self.register_buffer("pknn_ref_sq", f32(refs.pixel_knn.reference_sq.reshape(-1)))
        self.register_buffer("dens_chol", f32(refs.density.chol))
        self.register_buffer("dens_means_t", f32(refs.density.whitened_means.T))
        self.register_buffer("dens_means_sq", f32(np.sum(refs.density.whitened_means**2, axis=1)))
        self.register_buffer("loc", f32(union.standardiser.loc))  # [J, K]
        self.register_buffer("scale", f32(union.standardiser.scale))
        self.n_ref, self.n_union = union.knots[0].n, union.union_knots.n
        self.register_buffer("knots", f32(np.stack([k.values for k in union.knots])))
        self.register_buffer("knot_counts", f32(np.stack([k.counts for k in union.knots])))
        self.register_buffer("betas", f32(union.betas))
        self.register_buffer("log_weights", f32(np.log(union.weight_vector))[:, None])  # weighted min-p
        # Agreement columns: Fisher's sum of member log p-values (a Gather and a ReduceSum each), then
        # a p-value against its own reference, exactly as for a member.
        agreements = union.agreements
        self.n_agree = agreements[0].knots.n if agreements else 0
        for i, a in enumerate(agreements):  # buffers, so that .to(device) takes them along
            self.register_buffer(f"agree_parts_{i}", torch.tensor(a.parts, dtype=torch.int64))
        self.register_buffer("agree_knots", f32(np.stack([a.knots.values for a in agreements]) if agreements
                                                else np.zeros((0, 1))))
        self.register_buffer("agree_counts", f32(np.stack([a.knots.counts for a in agreements]) if agreements
                                                 else np.zeros((0, 1))))
        self.register_buffer("agree_betas", f32([a.beta for a in agreements]))
        self.register_buffer("union_knots", f32(union.union_knots.values)[None, :])
        self.register_buffer("union_counts", f32(union.union_knots.counts)[None, :])
        self.register_buffer("union_beta", f32([union.union_beta]))
        thresholds = meta.boundary.per_class or [meta.boundary.global_] * meta.num_classes
        self.register_buffer("thresholds", f32(thresholds))

    def _agree_parts(self) -> list[torch.Tensor]:
        return [getattr(self, f"agree_parts_{i}") for i in range(len(self.agree_betas))]

    def _knn_d2(self, e: torch.Tensor) -> torch.Tensor:
        kk, m = self.knn_shape
        return (self.knn_ref_m2 @ e.T + self.knn_d2_bias[:, None]).reshape(kk, m, -1)

    def _pixel_knn_d2(self, centred: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        kk, m = self.pknn_shape
        d2 = (centred * centred).sum(dim=1)[None, :] - 2.0 * (self.pknn_ref @ z.T) + self.pknn_ref_sq[:, None]
        return d2.reshape(kk, m, -1)

    def _mahalanobis(self, e: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        t = (e - torch.index_select(self.maha_means, 0, label)) @ self.maha_chol
        return -(t * t).sum(dim=1)

    def _novelty(self, centred: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d2 = (centred * centred).sum(dim=1, keepdim=True) - 2.0 * (z @ self.nov_ref_t) + self.nov_ref_sq[None, :]
        nearest = torch.topk(d2, self.novelty_k, dim=1, largest=False, sorted=False).values
        return -torch.sqrt(torch.clamp(nearest, min=D2_MIN)).mean(dim=1)

    def _class_d2(self, image: torch.Tensor) -> torch.Tensor:
        """[N, K] pixel Mahalanobis distances to every class mean: one whitening shared by
        ``density`` (their minimum) and ``pixel_mahalanobis`` (the claimed class's)."""
        y = image.flatten(1) @ self.dens_chol
        return (y * y).sum(dim=1, keepdim=True) - 2.0 * (y @ self.dens_means_t) + self.dens_means_sq[None, :]

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, emb = self.authenticator.logits_and_embedding(image)
        e = torch.nn.functional.normalize(emb, dim=1, eps=1e-12)
        centred = image.flatten(1) - self.nov_mean[None, :]  # novelty and pixel_knn share the PCA projection
        z = centred @ self.nov_comp_t
        class_d2 = self._class_d2(image) if {"density", "pixel_mahalanobis"} & set(self.members) else None
        columns = []
        for name in self.members:
            if name == "critic":
                columns.append(self.critic(image, label))
            elif name == "margin":
                columns.append(_logit_margin(logits, label))
            elif name == "mlp_margin":
                columns.append(_logit_margin(self.mlp(image), label))
            elif name == "knn":
                columns.append(_distance_ratio(_mean_k_nearest(self._knn_d2(e), self.knn_k), label))
            elif name == "mahalanobis":
                columns.append(self._mahalanobis(e, label))
            elif name == "novelty":
                columns.append(self._novelty(centred, z))
            elif name == "pixel_knn":
                columns.append(_distance_ratio(_mean_k_nearest(self._pixel_knn_d2(centred, z), self.pknn_k), label))
            elif name == "pixel_mahalanobis":
                columns.append(-torch.gather(class_d2, 1, label[:, None])[:, 0])
            else:
                columns.append(-class_d2.min(dim=1).values)
        raw = torch.stack(columns, dim=0)  # [J, N]: samples innermost from here on (see _log_p)
        z = (raw - torch.index_select(self.loc, 1, label)) / torch.index_select(self.scale, 1, label)
        log_p = _log_p(z, self.knots, self.knot_counts, self.n_ref, self.betas)
        if self.n_agree:
            fisher = torch.stack([torch.index_select(log_p, 0, parts).sum(dim=0) for parts in self._agree_parts()], dim=0)
            log_p = torch.cat([log_p, _log_p(fisher, self.agree_knots, self.agree_counts, self.n_agree,
                                              self.agree_betas)], dim=0)
        score = (log_p - self.log_weights).min(dim=0).values
        poisoned = score < torch.index_select(self.thresholds, 0, label)
        p_value = torch.exp(_log_p(score[None, :], self.union_knots, self.union_counts, self.n_union, self.union_beta)[0])
        return score, poisoned, p_value, torch.exp(log_p).T


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
            output_names=[OUTPUT_SCORE, OUTPUT_POISONED, OUTPUT_P_VALUE, OUTPUT_EVIDENCE],
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


def on_cpu(det: FittedDetector) -> FittedDetector:
    """The detector with CPU copies of its networks: the graph is traced from CPU copies, so parity
    compares like with like. A GPU-trained detector's own path runs cuDNN convolutions (TF32 by
    default), which round differently and moved a Fashion-MNIST union p-value by 0.0025 on an H200."""
    if det.device.type == "cpu":
        return det
    cpu = copy.copy(det)
    cpu.device = torch.device("cpu")
    cpu.authenticator = copy.deepcopy(det.authenticator).cpu().eval()
    cpu.critic = copy.deepcopy(det.critic).cpu().eval()
    return cpu


def parity_report(proto_bytes: bytes, det: FittedDetector) -> dict[str, float]:
    """Run the ONNX bytes on the calibration samples; compare with the detector's own path (on the CPU)."""
    det = on_cpu(det)
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    images, labels = det.calibration.images, det.calibration.labels
    score, poisoned, p_value, evidence = session.run(
        [OUTPUT_SCORE, OUTPUT_POISONED, OUTPUT_P_VALUE, OUTPUT_EVIDENCE], {INPUT_IMAGE: images, INPUT_LABEL: labels}
    )
    ref_score = det.score(images, labels)
    rel = np.abs(score - ref_score) / (1.0 + np.abs(ref_score))
    return {
        "max_abs_score_diff": float(np.max(np.abs(score - ref_score))),
        "median_rel_score_diff": float(np.median(rel)),
        "max_rel_score_diff": float(np.max(rel)),
        "verdict_mismatches": float(np.sum(poisoned != det.union.flagged(ref_score, labels))),
        "max_abs_p_value_diff": float(np.max(np.abs(p_value - det.union.p_value(ref_score)))),
        "max_abs_evidence_diff": float(np.max(np.abs(evidence - det.evidence(images, labels)))),
        "p_step": det.union.p_step,
    }


def _check(parity: dict[str, float]) -> None:
    """Typical scores must agree to ``MEDIAN_RTOL``, every p-value to ``P_STEPS`` reference steps,
    every verdict exactly (see the constants for why)."""
    tolerance = P_STEPS * parity["p_step"] + PARITY_ATOL
    p_bad = max(parity["max_abs_p_value_diff"], parity["max_abs_evidence_diff"]) > tolerance
    if parity["median_rel_score_diff"] > MEDIAN_RTOL or p_bad or parity["verdict_mismatches"] > 0:
        raise ExportParityError(
            f"ONNX and torch disagree on the calibration split (median |score diff| / (1 + |score|) "
            f"{parity['median_rel_score_diff']:.3g} vs {MEDIAN_RTOL}; max |p-value diff| "
            f"{parity['max_abs_p_value_diff']:.3g}, max |evidence diff| {parity['max_abs_evidence_diff']:.3g} vs "
            f"{tolerance:.3g}; {int(parity['verdict_mismatches'])} differing verdicts); no model was written"
        )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the consumer may run as another user
    os.replace(tmp, path)


def export_onnx(det: FittedDetector, path: str | Path) -> ModelCard:
    """Write ``path`` (ONNX) and its model card, or raise ExportParityError and write nothing."""
    path = Path(path)
    proto_bytes = _export_proto(build_scoring_graph(det), det).SerializeToString()
    parity = parity_report(proto_bytes, det)
    _check(parity)
    _write_atomically(path, proto_bytes)
    _write_atomically(card_path_for(path), model_card(det, path, parity).model_dump_json(
        indent=2, by_alias=True).encode())
    return ModelCard.model_validate_json(card_path_for(path).read_text())


def _weighting_note(w: dict) -> str:
    """One sentence of the card on how the weights were chosen (``training.weighting``)."""
    if not w.get("candidates"):
        return f"budget split as configured (no search: --fixed-weights): {w['chosen']}"
    rates = lambda r: ", ".join(f"{k} {v:.1%}" for k, v in r.items())  # noqa: E731
    head = (f"budget split chosen on synthetic negatives ({w['candidates']} candidates): {w['chosen']}"
            if w["accepted"] else f"budget split as configured: {w['chosen']}")
    if w.get("skipped"):
        head += f" (no search: {w['skipped']})"
    return (f"{head}; share of the synthetic negatives flagged, configured split: "
            f"{rates(w['synthetic_detection_configured'])}; best candidate: {rates(w['synthetic_detection_best'])} "
            f"(gain {w['gain']:.1%}, standard error {w['standard_error']:.1%}; {w['rule']})")


def model_card(det: FittedDetector, path: Path, parity: dict[str, float]) -> ModelCard:
    """Provenance, sizes, stage times and the calibration as measured *out of sample*.

    The boundary flags at most ``target_fpr`` of the samples it was read off by construction, so
    that number says nothing; the card reports the cross-validated FPR of the calibration rule
    (``training.union.cross_validated_fpr``) and its expected spread instead."""
    report, union = det.report, det.union
    cv = [float(x) for x in report.get("cv_fpr", [])]
    plan = report.get("plan", {})
    calibration = {
        "target_fpr": det.metadata.target_fpr,
        "calibration_samples": float(union.n),
        "out_of_sample_fpr": float(np.mean(cv)) if cv else float("nan"),
        "out_of_sample_fpr_min": float(np.min(cv)) if cv else float("nan"),
        "out_of_sample_fpr_max": float(np.max(cv)) if cv else float("nan"),
        "expected_fpr_spread": fpr_standard_error(det.metadata.target_fpr, union.n),
        "parity_max_abs_score_diff": parity["max_abs_score_diff"],
        "parity_max_abs_evidence_diff": parity["max_abs_evidence_diff"],
        "acceptance_rate": float(report.get("acceptance_rate", float("nan"))),
        "authenticator_out_of_fold_accuracy": float(report.get("authenticator_out_of_fold_accuracy", float("nan"))),
    }
    calibration = {k: v for k, v in calibration.items() if math.isfinite(v)}  # JSON has no NaN: omit unknowns
    weights = ", ".join(f"{m} {w:.3g}" for m, w in zip(union.columns, union.weight_vector))
    agreements = "; ".join(f"{a.name} = {' + '.join(union.members[j] for j in a.parts)}" for a in union.agreements)
    notes = [
        (f"score = log min_c p_c / w_c over the evidence columns (weights: {weights}): each member's "
         "conformal p-value against its clean out-of-sample scores (standardised per claimed class, "
         "exponential tail below the smallest), divided by its share of the false-alarm budget; the "
         "boundary is the target-FPR quantile of the calibration samples' leave-one-out union statistic"),
        (f"agreement columns (Fisher's sum of the members' log p-values, calibrated as its own p-value on the "
         f"calibration samples' leave-one-out p-values): {agreements or 'none'}"),
        (f"calibration plan: {plan.get('mode', '?')} ({plan.get('folds', '?')} fold(s)), {union.n} calibration "
         f"samples, kNN k = {plan.get('neighbours_k', '?')}, novelty PCA dims = {plan.get('pca_dims', '?')}"),
        (f"boundary per class: {det.metadata.boundary.per_class is not None}; classes that fell back to the "
         f"global threshold (fewer than 1/target_fpr calibration samples): {report.get('per_class_fallback', [])}"),
        ("out_of_sample_fpr: mean over folds of the flag rate on a fold whose boundary, standardisation and "
         "references came from the other folds; the FPR on new clean data scatters around the target by about "
         "expected_fpr_spread"),
    ]
    recalibrated = report.get("calibration", {})
    if recalibrated.get("source") == "infer_threshold":
        repeats = recalibrated.get("repeats_dropped") or 0  # exact repeats of the file, not counted in n
        source = (f" of {recalibrated['clean_file']} (sha256 {recalibrated['clean_sha256'][:16]}...)"
                  if recalibrated.get("clean_sha256") else "")
        lineage = (f"; recalibrated from {recalibrated['recalibrated_from']} at {recalibrated.get('recalibrated_at')}, "
                   f"first fitted as {recalibrated.get('fitted_as')}" if recalibrated.get("recalibrated_from") else "")
        notes.append(f"recalibrated on {recalibrated.get('n')} clean samples{source} given after training "
                     "(`depois-train recalibrate`, FittedDetector.infer_threshold"
                     + (f"; {repeats} exact repeats in the file dropped" if repeats else "")
                     + lineage + "), scored by the shipped "
                     "networks: the member references, standardisation, boundary and out_of_sample_fpr "
                     "come from them, not from the trusted pool; the networks are unchanged")
    if report.get("weighting"):
        notes.append(_weighting_note(report["weighting"]))
    if report.get("pixel_knn_gate"):
        notes.append(str(report["pixel_knn_gate"]))
    if report.get("mlp_margin"):
        notes.append(str(report["mlp_margin"]))
    if plan.get("warning"):
        notes.append(f"warning: {plan['warning']}")
    return ModelCard(
        onnx_file=path.name,
        onnx_sha256=sha256_file(path),
        metadata=det.metadata,
        dataset=det.metadata.dataset,
        sizes=report.get("sizes", {}),
        seed=det.config.seed,
        steps=report.get("steps", {}),
        times_s=report.get("times_s", {}),
        calibration=calibration,
        notes=notes,
    )
