"""Run every benchmark with its defaults and append the result blocks to one markdown file.

`make bench` runs this. It takes tens of minutes on 2 CPU cores (training dominates) and
saturates the machine, so run it alone; copy the blocks you want to keep into
docs/performance.md.

\b
    python benchmarks/run_all.py --out runs/benchmarks.md
    python benchmarks/run_all.py --skip-training
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
    skip_training: bool = typer.Option(False, help="Skip the (slow) training wall-time benchmark."),
) -> None:
    scripts = ["bench_scorer.py", "bench_pipeline.py"] + ([] if skip_training else ["bench_training.py"])
    for script in scripts:
        subprocess.run([sys.executable, str(HERE / script), "--out", str(out)], check=True)
    print(f"results appended to {out}")


if __name__ == "__main__":
    app()
