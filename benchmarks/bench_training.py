"""Wall time of ``depois-train all`` (fit + export) per data set, as a user would run it.

The command runs in a child process exactly as typed on a shell, so the number includes the
interpreter and torch start-up, the data loading and the ONNX export a user also pays for. The
stage split and the step counts come from the model card the run writes.

\b
    python benchmarks/bench_training.py --datasets digits,fashion-mnist
    python benchmarks/bench_training.py --datasets digits --device cuda
    python benchmarks/bench_training.py --datasets digits --rounds 2 --against=--fold-workers --against=0

With ``--against`` a second variant (the same command plus those arguments) runs alternately with
the first (A B, then B A, ...), so that a change of machine speed hits both alike, and the report
adds each round's wall-time ratio.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from _common import markdown_table, write_report

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


def train_command(dataset: str, out_dir: Path, device: str, extra: list[str]) -> list[str]:
    exe = shutil.which("depois-train")
    base = [exe] if exe else [sys.executable, "-m", "training"]
    return [*base, "all", "--dataset", dataset, "--out", str(out_dir), "--device", device, *extra]


def run_timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of exactly this child, via ``wait4``; exits on failure."""
    with log.open("w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {code}")
    return wall, usage.ru_maxrss / 1024


def card_facts(out_dir: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Stage times and step counts from the model card the run wrote (empty when none)."""
    for path in sorted(out_dir.rglob("*.card.json")):
        card = json.loads(path.read_text())
        return ({k: float(v) for k, v in card.get("times_s", {}).items()},
                {k: int(v) for k, v in card.get("steps", {}).items()})
    return {}, {}


def run_once(dataset: str, device: str, extra: list[str]) -> tuple[float, float, dict[str, float], dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = train_command(dataset, Path(tmp), device, extra)
        wall, rss_mib = run_timed(cmd, Path(tmp) / "train.log")
        stages, steps = card_facts(Path(tmp))
    return wall, rss_mib, stages, steps


@app.command(help=__doc__)
def main(
    datasets: str = typer.Option("digits,fashion-mnist", help="Comma-separated data sets to train."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto, passed to depois-train."),
    extra: list[str] = typer.Option([], help="Extra arguments for depois-train all (repeatable), "
                                             "e.g. --extra=--seed --extra=1."),
    against: list[str] = typer.Option([], help="Extra arguments of a second variant, run alternately with the "
                                               "first (repeatable), e.g. --against=--fold-workers --against=0."),
    rounds: int = typer.Option(1, min=1, help="Runs of each variant per data set (alternating with --against)."),
    out: Optional[Path] = typer.Option(None, help="Append the result block to this markdown file."),
) -> None:
    """Run `depois-train all` per data set (and variant) and tabulate wall time and stage times."""
    variants = [("A", extra)] + ([("B", [*extra, *against])] if against else [])
    rows, notes = [], []
    for dataset in datasets.split(","):
        walls: dict[str, list[float]] = {name: [] for name, _ in variants}
        for r in range(rounds):
            for name, args in (variants if r % 2 == 0 else variants[::-1]):
                wall, rss_mib, stages, steps = run_once(dataset, device, args)
                walls[name].append(wall)
                rows.append([dataset, name, " ".join(args) or "-", str(r + 1),
                             "/".join(str(v) for v in steps.values()) or "-", f"{wall:.0f}", f"{wall / 60:.1f}",
                             ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) or "-", f"{rss_mib:.0f}"])
        if against:
            ratios = [b / a for a, b in zip(walls["A"], walls["B"])]
            notes.append(f"- {dataset}: wall time B / A per round {', '.join(f'{x:.2f}' for x in ratios)} "
                         f"(median {statistics.median(ratios):.2f}); A = `{' '.join(extra) or 'defaults'}`, "
                         f"B = A + `{' '.join(against)}`")
    table = markdown_table(["data set", "variant", "extra arguments", "round", "steps auth/gan/critic", "wall s",
                            "wall min", "stages s (model card)", "peak RSS MiB (largest one process)"], rows)
    write_report(out, f"Training wall time (`depois-train all`, {device})", "\n".join([*notes, "", table]) if notes else table)


if __name__ == "__main__":
    app()
