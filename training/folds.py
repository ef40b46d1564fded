"""Out-of-fold authenticator evidence: one authenticator per cross-fit fold, scoring its held-out
fold, the folds whose model is not shipped trained in background processes.

Why a process: the cGAN and the mimic model need only the shipped fold's authenticator, while the
other folds' models exist only to give the calibration samples out-of-sample scores. Every stage
reseeds torch (``training.torchutil.seeded``), so a fold's numbers do not depend on where or in
which order it runs: a second process trains those folds while this one trains the cGAN and the
mimic model, and ``fit`` returns the same detector, bit for bit, in less wall time on a machine
with a spare core (digits on the 2-core VM: 273 -> 149 s for ``depois-train all``).

A plain child interpreter (``python -m training.folds TASKS RESULTS``), not ``multiprocessing``:
its ``spawn`` re-runs the caller's main script in the child, so a user's script that calls
``fit`` without an ``if __name__ == "__main__"`` guard would run twice; ``fork`` can deadlock
under torch's OpenMP pool. Tasks and results travel as pickles in a private temporary directory.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.augment import train_authenticator
from training.data import LabeledImages
from training.detector import build_references, raw_member_scores
from training.models import Authenticator
from training.torchutil import batched, intra_op_threads


@dataclass(frozen=True)
class FoldTask:
    """Everything one fold needs, picklable (numpy and plain numbers only)."""

    fold: int
    train: LabeledImages
    held_out: LabeledImages
    num_classes: int
    steps: int
    batch_size: int
    seed: int  # the fold authenticator's training seed
    neighbours: int  # k of the kNN members
    reference_seed: int  # seed of the references (PCA) built from the fold's training part


@dataclass(frozen=True)
class FoldScores:
    fold: int
    raw: np.ndarray  # float32 [n_held_out, len(MEMBERS)], critic column 0 (scored later)
    log_p: np.ndarray  # float32 [n_held_out]: log p(label | image) of the fold's model
    seconds: float  # wall time of the fold, wherever it ran


def train_fold(task: FoldTask, device: torch.device, progress: bool = False) -> tuple[Authenticator, list[float], FoldScores]:
    """Train the fold's authenticator on its training part and score its held-out part."""
    start = time.perf_counter()
    model, losses = train_authenticator(task.train, task.num_classes, task.steps, task.batch_size, task.seed,
                                        device, progress)
    refs = build_references(model, task.train, task.num_classes, task.neighbours, task.reference_seed, device)
    images, labels = task.held_out.images, task.held_out.labels
    raw = raw_member_scores(model, None, refs, images, labels, device)
    log_p = batched(model.log_p_label, images, labels, device)
    return model, losses, FoldScores(task.fold, raw, log_p, time.perf_counter() - start)


def score_folds(tasks: list[FoldTask], threads: int) -> list[FoldScores]:
    """What a background process runs: the folds on CPU, with the parent's torch thread count."""
    with intra_op_threads(threads):
        return [train_fold(task, torch.device("cpu"))[2] for task in tasks]


class BackgroundFoldError(RuntimeError):
    """A background fold process died without a result (killed, out of memory)."""


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    results: Path
    log: Path


class PendingFolds:
    """Folds handed to background processes, or kept for this one (``workers=0`` or a GPU)."""

    def __init__(self, tasks: list[FoldTask], workers: list[_Worker]):
        self._tasks, self._workers = tasks, workers

    def results(self, device: torch.device, progress: bool = False) -> list[FoldScores]:
        """Every fold's scores: waits for the background ones (re-raising a fold's own error),
        trains the rest here."""
        if not self._workers:
            return [train_fold(task, device, progress)[2] for task in self._tasks]
        out: list[FoldScores] = []
        for worker in self._workers:
            code = worker.process.wait()
            if not worker.results.exists():
                tail = worker.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise BackgroundFoldError(f"background fold process exited with code {code} and no result: {tail[0]}")
            with worker.results.open("rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise value
            out.extend(value)
        return out


@contextmanager
def background_folds(tasks: list[FoldTask], workers: int, threads: int, device: torch.device) -> Iterator[PendingFolds]:
    """Start ``tasks`` in up to ``workers`` child processes (CPU only; on a GPU the folds are short
    and share the device, so they stay here); yield a handle to collect them. The children are
    killed if the ``with`` body fails, and their files removed either way."""
    workers = min(workers, len(tasks))
    if workers <= 0 or device.type != "cpu":
        yield PendingFolds(tasks, [])
        return
    with tempfile.TemporaryDirectory(prefix="depois-folds-") as tmp:
        started: list[_Worker] = []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)}
        try:
            for w in range(workers):
                job, results, log = (Path(tmp) / f"{name}-{w}" for name in ("tasks.pkl", "results.pkl", "log.txt"))
                with job.open("wb") as f:
                    pickle.dump((tasks[w::workers], threads), f)
                with log.open("wb") as f:
                    process = subprocess.Popen([sys.executable, "-m", "training.folds", str(job), str(results)],
                                               stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env)
                started.append(_Worker(process, results, log))
            yield PendingFolds(tasks, started)
        finally:
            for worker in started:
                if worker.process.poll() is None:
                    worker.process.kill()
                    worker.process.wait()


def _main(job: str, results: str) -> None:
    with open(job, "rb") as f:
        tasks, threads = pickle.load(f)
    try:
        outcome: tuple[str, object] = ("ok", score_folds(tasks, threads))
    except Exception as error:  # handed to the parent, which raises it as its own
        outcome = ("error", error)
    partial = results + ".part"
    with open(partial, "wb") as f:
        pickle.dump(outcome, f)
    os.replace(partial, results)


if __name__ == "__main__":
    # Through the module's own name, so that results pickle as training.folds.FoldScores, not
    # __main__.FoldScores (which the parent could not load).
    from training.folds import _main as main

    main(*sys.argv[1:3])
