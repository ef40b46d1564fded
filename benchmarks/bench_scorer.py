"""Detector throughput and latency: torch eager vs onnxruntime fp32 vs onnxruntime int8, and the
union graph against the previous fused graph.

All variants run the same trained weights on the same batches in one process, one after the
other, so the ratios in the table are what a user would see switching between them on this
machine. onnxruntime runs through ``depois_stream.filter.detector.Detector``, i.e. exactly what the consumer
runs. "previous fused" is the graph the exporter wrote before the union (critic + authenticator
log p, min of two rescaled scores, per-class threshold, conformal p-value against the 20 %
calibration split; commit d025caf, training/export.py), rebuilt here around the same two trained
networks, so the ratio union / previous is the cost of the evidence members alone.
``--profile`` adds onnxruntime's per-operator time of the union graph at batch 512.

\b
    python benchmarks/bench_scorer.py --dataset digits                  # fit quick, then time
    python benchmarks/bench_scorer.py --detector-dir runs/digits/detector --clock cpu --profile
    python benchmarks/bench_scorer.py --device cuda --batch-sizes 1024,4096,16384,65536
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import typer

from _common import (Timing, flipped_test_split, fmt_ms, fmt_rate, load_or_fit, markdown_table,
                     provider_agreement, time_call, write_report)

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)

CPU_BATCHES = "1,32,256,512,1024,4096"
GPU_BATCHES = "1024,4096,16384,65536"


@dataclass(frozen=True)
class Variant:
    name: str
    run: Callable[[np.ndarray, np.ndarray], object]


def tiled_batch(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real samples (the calibration split repeated): real data exercises real branches."""
    idx = np.arange(n) % len(labels)
    return np.ascontiguousarray(images[idx]), np.ascontiguousarray(labels[idx])


def torch_variant(det, device: str) -> Variant:
    """The exported module itself (same weights, same graph) run eagerly under inference_mode."""
    import torch
    from training.export import build_scoring_graph

    module = build_scoring_graph(det).to(device).eval()

    def run(images: np.ndarray, labels: np.ndarray) -> object:
        with torch.inference_mode():
            out = module(torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device))
            if device == "cuda":
                torch.cuda.synchronize()
            return out

    return Variant("torch eager", run)


def ort_variant(name: str, path: Path, device: str, single_thread: bool) -> Variant:
    """The consumer's own Detector; with ``single_thread`` its session is rebuilt on one thread
    (onnxruntime then runs every kernel in the calling thread, so its CPU time is measurable)."""
    import onnxruntime as ort

    from depois_stream.filter.detector import Detector

    scorer = Detector.load(path, device=device, require_gpu=device == "cuda")
    if single_thread:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        scorer.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Variant(f"{name} ({scorer.provider.removesuffix('ExecutionProvider')})", scorer.score)


def previous_fused_graph(det):
    """The pre-union export graph (commit d025caf) around ``det``'s networks: same operations,
    same constants' shapes (the reference holds as many scores as the old calibration split)."""
    import copy

    import torch
    from torch import nn

    from training.fusion import FusionParams

    critic_cal = det.critic_score(det.calibration.images, det.calibration.labels)
    log_p_cal = det.log_p_label(det.calibration.images, det.calibration.labels)
    fusion = FusionParams.fit(critic_cal, log_p_cal, det.metadata.target_fpr)
    n_old = max(2, round(det.config.calibration_fraction * len(det.plan.pool)))

    class FusedGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.authenticator = copy.deepcopy(det.authenticator).cpu().eval()
            self.critic = copy.deepcopy(det.critic).cpu().eval()
            self.register_buffer("stats", torch.tensor(
                [fusion.critic.mean, fusion.critic.std, fusion.auth.mean, fusion.auth.std], dtype=torch.float32))
            self.register_buffer("thresholds", torch.full((det.metadata.num_classes,), -1.0))
            self.register_buffer("reference", torch.sort(torch.randn(n_old)).values)

        def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
            score = (self.critic(image, label) - self.stats[0]) / self.stats[1]
            z_auth = (self.authenticator.log_p_label(image, label) - self.stats[2]) / self.stats[3]
            score = torch.minimum(score, z_auth)
            poisoned = score < self.thresholds[label]
            below = (self.reference[None, :] <= score[:, None]).to(torch.float32).sum(dim=1)
            return score, poisoned, (below + 1.0) / (self.reference.shape[0] + 1.0)

    return FusedGraph()


def export_graph(graph, det, path: Path) -> Path:
    """Export an arbitrary (image, label) -> (score, poisoned, p_value) module like the exporter does."""
    import logging
    import warnings

    import onnx
    import torch

    c, h, w = det.metadata.input_shape
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, (torch.zeros(2, c, h, w), torch.zeros(2, dtype=torch.int64)),
            input_names=["image", "label"], output_names=["score", "poisoned", "p_value"],
            dynamic_shapes={"image": {0: torch.export.Dim("N", min=1)}, "label": {0: torch.export.Dim("N", min=1)}},
            opset_version=18, dynamo=True, verbose=False)
    onnx.save(program.model_proto, str(path))
    return path


def raw_ort_variant(name: str, path: Path, single_thread: bool) -> Variant:
    """A bare onnxruntime session (for graphs that are not full contract models)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if single_thread:
        options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Variant(name, lambda images, labels: session.run(None, {"image": images, "label": labels}))


def paired_ratio(run_a, run_b, images: np.ndarray, labels: np.ndarray, clock, rounds: int = 40) -> tuple[float, float, float]:
    """Median (and 10/90 % quantiles) over ``rounds`` of time(a) / time(b), a and b run back to back
    in every round: a shared machine's load drifts over seconds, and this ratio is what the
    1.5x budget is about."""
    for _ in range(3):
        run_a(images, labels)
        run_b(images, labels)
    ratios = []
    for i in range(rounds):
        order = (run_a, run_b) if i % 2 == 0 else (run_b, run_a)
        spent = {}
        for fn in order:
            t0 = clock()
            fn(images, labels)
            spent[fn] = clock() - t0
        ratios.append(spent[run_a] / spent[run_b])
    q = np.quantile(ratios, [0.5, 0.1, 0.9])
    return float(q[0]), float(q[1]), float(q[2])


def operator_profile(path: Path, images: np.ndarray, labels: np.ndarray, batch: int, runs: int,
                     single_thread: bool) -> str:
    """onnxruntime's own per-node timings at ``batch``, summed per operator type over ``runs`` runs."""
    import json as _json

    import onnxruntime as ort

    import tempfile

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort_profile")  # not into the working tree
    if single_thread:
        options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x, y = tiled_batch(images, labels, batch)
    for _ in range(3 + runs):
        session.run(None, {"image": x, "label": y})
    trace_path = Path(session.end_profiling())
    trace = _json.loads(trace_path.read_text())
    trace_path.unlink()
    per_op: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(event.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    rows = [[op, f"{us / (runs + 3) / batch:.3f}", f"{100 * us / total:.1f}"]
            for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])]
    return markdown_table(["operator", "us per sample", "% of kernel time"], rows)


def heldout_agreement(fp32: Path, int8: Path, dataset: str) -> str:
    """Verdict agreement on the test split with 20 % random label flips: unlike the calibration
    split (clean, small on digits), it has many samples near and below the boundary."""
    from training.quantize import run_onnx, verdict_agreement

    images, labels = flipped_test_split(dataset)
    (_, fp), (_, q) = run_onnx(fp32, images, labels), run_onnx(int8, images, labels)
    return (f"- int8 verdict agreement on the {dataset} test split with 20 % label flips: "
            f"{verdict_agreement(fp, q):.4%} of {len(q)} (flagged: fp32 {fp.mean():.2%}, int8 {q.mean():.2%})")


def measure(variants: list[Variant], images: np.ndarray, labels: np.ndarray, batches: list[int],
            min_time_s: float, clock: Callable[[], float]) -> dict[tuple[str, int], Timing]:
    results = {}
    for b in batches:
        x, y = tiled_batch(images, labels, b)
        for v in variants:
            results[(v.name, b)] = time_call(lambda: v.run(x, y), items=b, min_time_s=min_time_s,
                                             clock=clock)
    return results


def render(variants: list[Variant], batches: list[int], results: dict[tuple[str, int], Timing],
           unit: str) -> str:
    base = variants[0].name
    header = ["batch"] + [f"{v.name} {unit}" for v in variants] + \
             [f"{v.name} / {base}" for v in variants[1:]] + \
             [f"{v.name} p50 {'CPU ' if 'CPU' in unit else ''}ms" for v in variants]
    rows = []
    for b in batches:
        t = [results[(v.name, b)] for v in variants]
        rows.append([b, *(fmt_rate(x.per_second) for x in t),
                     *(f"{x.per_second / t[0].per_second:.2f}x" for x in t[1:]),
                     *(fmt_ms(x.seconds) for x in t)])
    return markdown_table(header, rows)


@app.command(help=__doc__)
def main(
    detector_dir: Optional[Path] = typer.Option(
        None, help="A trained detector directory (OUT/detector of `depois-train fit|all --out OUT`). "
                   "Without it a detector is fitted first with --steps."),
    dataset: str = typer.Option("digits", help="Data set to fit on when no --detector-dir is given."),
    steps: str = typer.Option("quick", help="quick | default: training length when fitting here."),
    device: str = typer.Option("cpu", help="cpu | cuda. cuda uses the CUDA provider with IO binding "
                                           "and fails if no GPU is visible."),
    batch_sizes: Optional[str] = typer.Option(
        None, help=f"Comma-separated batch sizes (default {CPU_BATCHES} on cpu, {GPU_BATCHES} on cuda)."),
    threads: int = typer.Option(os.cpu_count() or 1, help="torch intra-op threads (onnxruntime uses "
                                                          "its default: one per physical core)."),
    clock: str = typer.Option(
        "wall", help="wall: samples per wall-clock second with the threads above. cpu: samples per "
                     "CPU-second with torch and onnxruntime on one thread each (the calling thread), "
                     "which stays reproducible on a shared, busy machine."),
    min_time: float = typer.Option(1.0, help="Seconds spent timing each (variant, batch) cell."),
    int8: bool = typer.Option(True, help="Also quantise to int8 (only if the verdict gate passes)."),
    out: Optional[Path] = typer.Option(None, help="Append the result block to this markdown file."),
    previous: bool = typer.Option(True, help="Also time the previous fused graph around the same networks."),
    profile: bool = typer.Option(False, help="Per-operator onnxruntime time of the union graph at batch 512."),
) -> None:
    """Time torch eager, onnxruntime fp32 and int8 on the same detector and batches."""
    import torch

    from training.export import export_onnx
    from training.quantize import QuantizationRefused, quantize_int8

    if clock not in ("wall", "cpu") or (clock == "cpu" and device != "cpu"):
        raise typer.BadParameter("--clock is wall or cpu, and cpu only with --device cpu")
    single = clock == "cpu"
    torch.set_num_threads(1 if single else threads)
    batches = [int(b) for b in (batch_sizes or (GPU_BATCHES if device == "cuda" else CPU_BATCHES)).split(",")]
    det = load_or_fit(detector_dir, dataset, steps)
    cal = det.calibration
    notes = [f"- model: {det.metadata.model_version} ({det.metadata.dataset}, score {det.metadata.score_kind}, "
             f"input {list(det.metadata.input_shape)}), device {device}, "
             + ("clock: CPU time of one thread (torch and onnxruntime single-threaded)" if single else
                f"clock: wall, torch threads {threads}, onnxruntime default threads")]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(det, fp32)
        variants = [torch_variant(det, device), ort_variant("ort fp32", fp32, device, single)]
        if previous and device == "cpu":
            old = export_graph(previous_fused_graph(det), det, Path(tmp) / "previous.onnx")
            variants.append(raw_ort_variant("previous fused ort fp32", old, single))
        if device == "cuda":
            from depois_stream.filter.detector import Detector

            notes.append(provider_agreement(Detector.load(fp32, device="cpu"),
                                            Detector.load(fp32, device="cuda", require_gpu=True),
                                            *flipped_test_split(det.metadata.dataset)))
        if int8 and device == "cuda":
            notes.append("- int8 not timed: dynamic quantisation targets CPU kernels "
                         "(onnxruntime runs DynamicQuantizeMatMul on the CPU provider only)")
        elif int8:
            int8_path = Path(tmp) / "model.int8.onnx"
            try:
                notes.append(f"- gate: {quantize_int8(fp32, int8_path, cal.images, cal.labels).summary()}")
                variants.append(ort_variant("ort int8", int8_path, device, single))
                notes.append(heldout_agreement(fp32, int8_path, det.metadata.dataset))
            except QuantizationRefused as refused:
                notes.append(f"- gate: {refused.report.summary()}")
        results = measure(variants, cal.images, cal.labels, batches, min_time,
                          time.thread_time if single else time.perf_counter)
        if previous and device == "cpu":
            union_v = next(v for v in variants if v.name.startswith("ort fp32"))
            old_v = next(v for v in variants if v.name.startswith("previous fused"))
            ratios = []
            for b in batches:
                x, y = tiled_batch(cal.images, cal.labels, b)
                median, lo, hi = paired_ratio(union_v.run, old_v.run, x, y,
                                              time.thread_time if single else time.perf_counter)
                ratios.append(f"batch {b}: {median:.2f}x (rounds' 10-90 % range {lo:.2f} to {hi:.2f})")
            notes.append("- cost per sample, union / previous fused (fp32 onnxruntime, interleaved rounds so "
                         "that load changes hit both alike, median of per-round ratios): " + "; ".join(ratios))
        if profile and device == "cpu":
            notes.append("\n#### Per-operator time of the union graph (onnxruntime profiling, batch 512)\n\n"
                         + operator_profile(fp32, cal.images, cal.labels, 512, 20, single))
    unit = "samples/CPU-s" if single else "samples/s"
    write_report(out, f"Detector throughput ({device}, {clock} clock)",
                 "\n".join(notes) + "\n\n" + render(variants, batches, results, unit))


if __name__ == "__main__":
    app()
