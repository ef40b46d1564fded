"""Run every benchmark on one digits model and append the result blocks to one markdown file.

`make bench` runs this: it trains a digits model with `depois-train all` (unless --model-dir
names one), then the scorer benchmark, the side-by-side peers benchmark (depois-stream with both
clients, a minimal confluent-kafka loop, a Quix Streams app, raw consume, latency) and the
training wall-time benchmark. About half an hour on 2 CPU cores; it saturates the machine, so
run it alone, and copy the blocks you want to keep into docs/performance.md.

\b
    python benchmarks/run_all.py --out runs/benchmarks.md
    python benchmarks/run_all.py --model-dir runs/digits --skip-training
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

HERE = Path(__file__).resolve().parent

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(help=__doc__)
def main(
    out: Path = typer.Option(Path("runs/benchmarks.md"), help="Markdown file the blocks are appended to."),
    model_dir: Path = typer.Option(None, help="A `depois-train all --out` folder of a digits model "
                                   "(model.onnx and detector/); default: train one into runs/bench-digits."),
    skip_training: bool = typer.Option(False, help="Skip the (slow) training wall-time benchmark."),
    quix_python: Path = typer.Option(None, help=(
        "Interpreter of the Quix Streams environment, passed to bench_peers.py (default: its "
        ".venv-quix, which `make bench` builds): Quix pins confluent-kafka < 2.13, depois-stream "
        "needs 2.16 or later.")),
) -> None:
    if model_dir is None:
        model_dir = Path("runs/bench-digits")
        subprocess.run([sys.executable, "-m", "training", "all", "--dataset", "digits", "--out",
                        str(model_dir)], check=True)
    runs = [["bench_scorer.py", "--detector-dir", str(model_dir / "detector"), "--clock", "cpu"],
            ["bench_peers.py", "--model", str(model_dir / "model.onnx"), "--dataset", "digits",
             *(["--quix-python", str(quix_python)] if quix_python else [])]]
    if not skip_training:
        runs.append(["bench_training.py"])
    for script, *args in runs:
        subprocess.run([sys.executable, str(HERE / script), *args, "--out", str(out)], check=True)
    print(f"results appended to {out}")


if __name__ == "__main__":
    app()
