"""Out-of-fold authenticator evidence: one authenticator per cross-fit fold, scoring its held-out
fold, the folds whose model is not shipped trained in background processes.

Why a process: the cGAN and the mimic model need only the shipped fold's authenticator, while the
other folds' models exist only to give the calibration samples out-of-sample scores. Every stage
reseeds torch (``training.torchutil.seeded``), so a fold's numbers do not depend on where or in
which order it runs: a second process trains those folds while this one trains the cGAN and the
mimic model, and ``fit`` returns the same detector, bit for bit, in less wall time on a machine
with a spare core (digits on the 2-core VM, ``depois-train all``: 216 -> 142 s and 169 -> 153 s in
two interleaved rounds, benchmarks/bench_training.py).

A plain child interpreter (``python -m training.folds TASKS RESULTS``), not ``multiprocessing``:
its ``spawn`` re-runs the caller's main script in the child, so a user's script that calls
``fit`` without an ``if __name__ == "__main__"`` guard would run twice; ``fork`` can deadlock
under torch's OpenMP pool. Tasks and results travel as pickles in a private temporary directory;
the child deletes its task file once read, and exits (removing the directory) if its parent dies.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.augment import train_authenticator
from training.data import LabeledImages
from training.detector import build_references, raw_member_scores
from training.downstream import ClassifierConfig, train_classifier
from training.models import Authenticator
from training.negatives import synthetic_negatives
from training.torchutil import batched, intra_op_threads


NEGATIVES_SEED = 5000  # offset from the fold's training seed (seed + 100 + fold): its synthetic negatives' seed
MLP_SEED = 7000  # offset from the fold's training seed: the mlp_margin member's MLP


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
    negatives: bool = False  # also score synthetic negatives of the held-out part (--weight-search)
    mlp_steps: int = 0  # steps of the mlp_margin member's MLP; 0 = no such member (its column stays 0)


@dataclass(frozen=True)
class FoldScores:
    """One fold's out-of-sample scores, and where and how long it ran (for the model card)."""

    fold: int
    raw: np.ndarray  # float32 [n_held_out, len(MEMBERS)], critic column 0 (scored later)
    log_p: np.ndarray  # float32 [n_held_out]: log p(label | image) of the fold's model
    seconds: float  # wall time of the fold, wherever it ran
    pid: int  # the process that trained it
    # training.negatives kind -> (the negatives made from the held-out part, their raw scores
    # [n, len(MEMBERS)], critic column 0): out of sample like ``raw`` (training.weighting)
    negatives: dict[str, tuple[LabeledImages, np.ndarray]] = field(default_factory=dict)


def train_member_mlp(data: LabeledImages, num_classes: int, steps: int, seed: int) -> nn.Sequential:
    """The ``mlp_margin`` member's network: the trusted-clf baseline's two-layer pixel MLP
    (``training.downstream``), with its optimiser settings, on the same data as the fold's
    authenticator, on the CPU (a few seconds; on one thread, as the baseline is trained).

    Its hidden layers are no wider than its input (the baseline's width, or as many as the image
    has pixels): on 8x8 digits the baseline's 256 units cost the ONNX graph 12 % more per sample
    (17.8 vs 15.9 us at batch 512, interleaved) for capacity that ~230 training images cannot
    use; on 28x28 images the layers are the baseline's."""
    hidden = min(ClassifierConfig().hidden, int(np.prod(data.images.shape[1:])))
    return train_classifier(data.images, data.labels, num_classes, seed, ClassifierConfig(hidden=hidden, steps=steps))


@dataclass(frozen=True)
class FoldModels:
    """The networks of one fold: what ``fit`` ships when the fold is the shipped one."""

    authenticator: Authenticator
    mlp: nn.Sequential | None  # None without the mlp_margin member
    losses: list[float]  # the authenticator's training losses


def train_fold(task: FoldTask, device: torch.device, progress: bool = False) -> tuple[FoldModels, FoldScores]:
    """Train the fold's networks on its training part and score its held-out part (and, with
    ``task.negatives``, the synthetic negatives made from it: ``training.negatives``)."""
    start = time.perf_counter()
    model, losses = train_authenticator(task.train, task.num_classes, task.steps, task.batch_size, task.seed,
                                        device, progress)
    mlp = (train_member_mlp(task.train, task.num_classes, task.mlp_steps, task.seed + MLP_SEED)
           if task.mlp_steps else None)
    refs = build_references(model, task.train, task.num_classes, task.neighbours, task.reference_seed, device)
    images, labels = task.held_out.images, task.held_out.labels
    raw = raw_member_scores(model, None, refs, images, labels, device, mlp)
    log_p = batched(model.log_p_label, images, labels, device)
    made = synthetic_negatives(task.held_out, task.num_classes, task.seed + NEGATIVES_SEED) if task.negatives else {}
    negatives = {kind: (data, raw_member_scores(model, None, refs, data.images, data.labels, device, mlp))
                 for kind, data in made.items()}
    return (FoldModels(model, mlp, losses),
            FoldScores(task.fold, raw, log_p, time.perf_counter() - start, os.getpid(), negatives))


def score_folds(tasks: list[FoldTask], threads: int) -> list[FoldScores]:
    """What a background process runs: the folds on CPU, with the parent's torch thread count."""
    with intra_op_threads(threads):
        return [train_fold(task, torch.device("cpu"))[1] for task in tasks]


class BackgroundFoldError(RuntimeError):
    """A background fold process died without a result (killed, out of memory)."""


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    results: Path
    log: Path


class PendingFolds:
    """Folds handed to background processes, or kept for this one (``workers=0`` or a GPU)."""

    def __init__(self, tasks: list[FoldTask], workers: list[_Worker]) -> None:
        self._tasks, self._workers = tasks, workers

    def results(self, device: torch.device, progress: bool = False) -> list[FoldScores]:
        """Every fold's scores: waits for the background ones (re-raising a fold's own error),
        trains the rest here."""
        if not self._workers:
            return [train_fold(task, device, progress)[1] for task in self._tasks]
        out: list[FoldScores] = []
        for worker in self._workers:
            code = worker.process.wait()
            if not worker.results.exists():
                tail = worker.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise BackgroundFoldError(f"background fold process exited with code {code} and no result: {tail[0]}")
            with worker.results.open("rb") as f:
                status, value, trace = pickle.load(f)
            if status == "error":  # the fold's own exception, its traceback in the child as the cause
                raise value from BackgroundFoldError(f"in the background fold process:\n{trace}")
            out.extend(value)
        return out


@contextmanager
def background_folds(tasks: list[FoldTask], workers: int, threads: int, device: torch.device) -> Iterator[PendingFolds]:
    """Start ``tasks`` in up to ``workers`` child processes; yield a handle to collect them. The
    children are killed if the ``with`` body fails, and their files removed either way.

    The folds stay in this process on a GPU (they are short and share the device), on a one-CPU
    machine (nothing to gain, a second torch in memory), and with ``threads=0``: this process then
    already runs torch's default thread pool on every core, and a second pool beside it would
    oversubscribe the CPU (the slowdown ``training.torchutil.intra_op_threads`` warns about)."""
    workers = min(workers, len(tasks))
    if workers <= 0 or device.type != "cpu" or threads == 0 or (os.cpu_count() or 1) < 2:
        yield PendingFolds(tasks, [])
        return
    with tempfile.TemporaryDirectory(prefix="depois-folds-") as tmp:
        started: list[_Worker] = []
        # Run from the directory that holds this package, so ``-m training.folds`` finds this code
        # and not a ``training`` folder in the caller's working directory.
        home = str(Path(__file__).resolve().parents[1])
        try:
            for w in range(workers):
                job, results, log = (Path(tmp) / f"{name}-{w}" for name in ("tasks.pkl", "results.pkl", "log.txt"))
                with job.open("wb") as f:
                    pickle.dump((tasks[w::workers], threads), f)
                with log.open("wb") as f:
                    started.append(_Worker(subprocess.Popen(
                        [sys.executable, "-m", "training.folds", str(job), str(results), str(os.getpid())],
                        stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=home), results, log))
            yield PendingFolds(tasks, started)
        finally:
            for worker in started:
                if worker.process.poll() is None:
                    worker.process.kill()
                    worker.process.wait()


def _watch_parent(parent: int, workdir: str) -> None:
    """Exit (removing the task directory) once the parent is gone: a parent killed by a signal
    runs no ``finally``, and an orphan would go on training and leave the trusted images on disk."""
    while os.getppid() == parent:
        time.sleep(1.0)
    shutil.rmtree(workdir, ignore_errors=True)
    os._exit(1)


def _main(job: str, results: str, parent: str) -> None:
    """The child: read and delete the task file, score the folds, hand back the result or the error."""
    threading.Thread(target=_watch_parent, args=(int(parent), os.path.dirname(job)), daemon=True).start()
    with open(job, "rb") as f:
        tasks, threads = pickle.load(f)
    os.unlink(job)
    try:
        outcome: tuple[str, object, str] = ("ok", score_folds(tasks, threads), "")
    except Exception as error:  # handed to the parent, which raises it as its own
        outcome = ("error", error, traceback.format_exc())
    try:
        data = pickle.dumps(outcome)
    except Exception:  # an exception that does not pickle still reaches the parent, as text
        data = pickle.dumps(("error", BackgroundFoldError(outcome[2].strip().splitlines()[-1]), outcome[2]))
    partial = results + ".part"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, results)


if __name__ == "__main__":
    # Through the module's own name, so that results pickle as training.folds.FoldScores, not
    # __main__.FoldScores (which the parent could not load).
    from training.folds import _main as main

    main(*sys.argv[1:4])
