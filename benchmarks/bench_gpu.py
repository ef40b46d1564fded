"""The consumer's scorer on CUDA against the CPU provider of the same host, on an exported model.

What a user deciding on a GPU node asks: how many samples per second does the filter's own
``Detector`` (onnxruntime, IO binding) score on the GPU, against onnxruntime's CPU provider with
all the host's cores, and do the two reach the same verdicts? Agreement is measured on the
test split with 20 % random label flips, where many samples sit near the boundary: the GPU's
kernels (cuDNN convolutions, cuBLAS for the kNN distances) round differently from the CPU's.

Needs only the exported model (no torch, no detector folder), so it runs wherever the stream
filter runs. The CPU column stops at 16,384 rows, past which CPU throughput is flat.

\b
    python benchmarks/bench_gpu.py --model runs/digits/model.onnx --dataset digits
    python benchmarks/bench_gpu.py --model runs/fashion/model.onnx --dataset fashion-mnist
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from _common import fmt_ms, fmt_rate, flipped_test_split, markdown_table, provider_agreement, time_call, write_report

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)

CPU_LARGEST = 16384


@app.command(help=__doc__)
def main(
    model: Path = typer.Option(..., exists=True, help="Exported ONNX model (card beside it)."),
    dataset: str = typer.Option("digits", help="Data set whose flipped test split is scored."),
    stream: Optional[Path] = typer.Option(None, help="An .npz with images and labels to use instead of "
                                                     "the data set (e.g. saved where the data set is)."),
    batch_sizes: str = typer.Option("512,4096,16384,65536", help="Comma-separated rows per call."),
    min_time: float = typer.Option(1.5, help="Seconds spent timing each (provider, batch) cell."),
    out: Optional[Path] = typer.Option(None, help="Append the result block to this markdown file."),
) -> None:
    from depois_stream.filter.detector import CUDA, Detector

    images, labels = flipped_test_split(dataset, stream)
    gpu = Detector.load(model, device="cuda", require_gpu=True)
    cpu = Detector.load(model, device="cpu")
    notes = [f"- model: {gpu.metadata.model_version}, CUDA provider {gpu.provider}; CPU provider with "
             "onnxruntime's default threads", provider_agreement(cpu, gpu, images, labels)]
    x0, y0 = gpu._prepare(images, labels)
    rows = []
    for n in (int(v) for v in batch_sizes.split(",")):
        idx = np.arange(n) % len(y0)
        x, y = np.ascontiguousarray(x0[idx]), np.ascontiguousarray(y0[idx])
        g = time_call(lambda: gpu.run(x, y), items=n, min_time_s=min_time, clock=time.perf_counter)
        c = (time_call(lambda: cpu.run(x, y), items=n, min_time_s=min_time, clock=time.perf_counter)
             if n <= CPU_LARGEST else None)
        rows.append([n, fmt_rate(g.per_second), fmt_ms(g.seconds),
                     fmt_rate(c.per_second) if c else "-", fmt_ms(c.seconds) if c else "-",
                     f"{g.per_second / c.per_second:.1f}x" if c else "-"])
    if gpu.provider == CUDA and gpu.max_rows is not None:
        notes.append(f"- CUDA refused a run along the way: runs of at most {gpu.max_rows} rows since")
    table = markdown_table(["batch", "CUDA samples/s", "CUDA p50 ms", "CPU samples/s", "CPU p50 ms",
                            "CUDA / CPU"], rows)
    write_report(out, "Scorer on CUDA vs the CPU provider (wall clock)", "\n".join(notes) + "\n\n" + table)


if __name__ == "__main__":
    app()
