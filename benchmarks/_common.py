"""What every benchmark needs: the machine it ran on, a fair timer, a table, a model to time.

Numbers without the machine and the command are not reproducible, so every result block starts
with both. Timings are medians of repeated runs after a warm-up (first calls pay for allocation and
kernel selection), and every variant of one table is measured in the same process, one after the
other, so ratios compare like with like.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]


def _load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


LOAD_AT_START = _load_average()  # benchmarks import this module first, before any work


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine_description() -> str:
    """One line per fact a reader needs to compare our numbers with theirs."""
    return "\n".join([
        f"- machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, {_memory_gib():.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"- load average (1, 5, 15 min) at start: {LOAD_AT_START}, at the end: {_load_average()}",
        f"- python {platform.python_version()}, numpy {_version('numpy')}, "
        f"onnxruntime-gpu {_version('onnxruntime-gpu')}, onnxruntime {_version('onnxruntime')}, "
        f"torch {_version('torch')}, kafka-python {_version('kafka-python')}, "
        f"confluent-kafka {_version('confluent-kafka')}, "
        f"crc32c {_version('crc32c')}",
        f"- git commit {_git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ])


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


@dataclass(frozen=True)
class Timing:
    """Median wall time of one call and the throughput it implies for ``items`` per call."""

    seconds: float
    p90_seconds: float
    items: int
    repeats: int

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


def time_call(fn: Callable[[], object], items: int, min_time_s: float = 1.0,
              min_repeats: int = 5, warmup: int = 3,
              clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Call ``fn`` until ``min_time_s`` and ``min_repeats`` are both reached; median and p90.

    ``clock=time.thread_time`` measures CPU time of the calling thread instead of wall time: on
    a shared machine that is what stays reproducible, provided all the work runs in this thread."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_repeats or time.perf_counter() - start < min_time_s:
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    samples.sort()
    return Timing(statistics.median(samples), samples[int(0.9 * (len(samples) - 1))], items,
                  len(samples))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured table, right-aligned numbers, readable in a terminal as well."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                      *(fmt(r) for r in cells[1:])])


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def load_or_fit(detector_dir: Path | None, dataset: str, steps: str):
    """A FittedDetector: loaded when a directory is given, else fitted now (quick or default steps).

    Speed does not depend on how long the networks trained, but the int8 verdict agreement does,
    so report int8 numbers from a fully trained detector."""
    from training.detector import FittedDetector
    from training.pipeline import FitConfig, fit

    if detector_dir is not None:
        return FittedDetector.load(detector_dir, device="cpu")
    if steps not in ("quick", "default"):
        raise ValueError(f"steps must be quick or default, got {steps!r}")
    cfg = FitConfig.quick(dataset=dataset) if steps == "quick" else FitConfig(dataset=dataset, device="cpu")
    return fit(cfg, progress=False)


def flipped_test_split(dataset: str, stream: Path | None = None):
    """(images, labels): the test split with 20 % random label flips (seed 0), where many samples
    sit near and below the boundary, unlike the clean calibration split; or the same saved as
    ``images``/``labels`` in an .npz (for a host without the data set on disk)."""
    import numpy as np

    if stream is not None:
        saved = np.load(stream)
        return saved["images"], saved["labels"]
    from depois_stream.sim.attacks import random_flip
    from depois_stream.sim.datasets import load_dataset

    flipped = random_flip(load_dataset(dataset).test, 0.2, seed=0)
    return flipped.images, flipped.labels


def provider_agreement(cpu, gpu, images, labels) -> str:
    """One line: verdict agreement of two ``Detector``s of one model on CUDA and on the CPU. The
    GPU kernels (cuDNN convolutions, cuBLAS for the kNN distances, TF32) round differently from
    the CPU's; only a verdict that crosses the boundary matters to the stream."""
    import numpy as np

    a, b = cpu.predict(images, labels), gpu.predict(images, labels)
    rel = np.abs(b.score - a.score) / (1.0 + np.abs(a.score))
    return (f"- CUDA vs CPU provider on {len(a.score)} samples (test split, 20 % label flips): verdicts agree "
            f"on {np.mean(a.poisoned == b.poisoned):.4%} (flagged: CPU {a.poisoned.mean():.2%}, CUDA "
            f"{b.poisoned.mean():.2%}); score |diff| / (1 + |score|): median {np.median(rel):.1e}, "
            f"max {rel.max():.1e}")


def write_report(path: Path | None, title: str, body: str) -> str:
    """Print the block and append it to ``path`` (if given) with the machine and the command."""
    block = "\n".join([f"### {title}", "", machine_description(), f"- command: `{command_line()}`",
                       "", body, ""])
    print(block)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(block + "\n")
    return block
