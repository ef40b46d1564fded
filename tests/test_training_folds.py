"""The speed-ups of ``fit`` must not change a single bit of the detector: folds trained in a
background process (training/folds.py) and the multi-tensor Adam (training.torchutil.adam)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.config import FitConfig
from training.data import LabeledImages, load_dataset
from training.folds import BackgroundFoldError, FoldTask, PendingFolds, _Worker, background_folds
from training.models import Authenticator, Critic
from training.pipeline import fit
from training.torchutil import adam

TINY = {"auth_steps": 20, "gan_steps": 20, "critic_steps": 5, "n_synthetic": 100}


@pytest.mark.slow
def test_background_folds_give_the_same_detector_bit_for_bit() -> None:
    here = fit(FitConfig.quick(seed=5, fold_workers=0, **TINY), progress=False)
    background = fit(FitConfig.quick(seed=5, fold_workers=2, **TINY), progress=False)
    shipped = str(background.plan.shipped_fold)
    assert len(background.plan.fold_ids) > 2  # cross-fit: several folds, and they really ran elsewhere
    assert {f: r["background"] for f, r in background.report["folds_run"].items()} == {
        str(f): str(f) != shipped for f in background.plan.fold_ids}
    assert not any(r["background"] for r in here.report["folds_run"].values())
    np.testing.assert_array_equal(here.calibration_raw, background.calibration_raw)
    np.testing.assert_array_equal(here.calibration_log_p, background.calibration_log_p)
    assert here.metadata.model_version == background.metadata.model_version
    assert here.metadata.boundary == background.metadata.boundary
    assert here.report["authenticator_fold_accuracy"] == background.report["authenticator_fold_accuracy"]


def test_a_fold_that_fails_in_the_background_fails_with_its_own_error() -> None:
    data = load_dataset("digits").train.subset(np.arange(60))
    beyond = LabeledImages(data.images, data.labels + 20)  # no such class: cross-entropy refuses
    task = FoldTask(1, beyond, data, num_classes=10, steps=2, batch_size=8, seed=0, neighbours=2, reference_seed=0)
    with pytest.raises(IndexError, match="out of bounds") as raised:
        with background_folds([task], workers=1, threads=1, device=torch.device("cpu")) as pending:
            pending.results(torch.device("cpu"))
    assert isinstance(raised.value.__cause__, BackgroundFoldError)  # with the child's traceback
    assert "train_authenticator" in str(raised.value.__cause__)


def test_a_background_process_that_dies_without_a_result_is_named(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    with log.open("wb") as f:  # as a killed or out-of-memory child would: an exit code, no result file
        process = subprocess.Popen([sys.executable, "-c", "print('Killed'); raise SystemExit(137)"], stdout=f)
    pending = PendingFolds([], [_Worker(process, tmp_path / "results.pkl", log)])
    with pytest.raises(BackgroundFoldError, match="exited with code 137 and no result: Killed"):
        pending.results(torch.device("cpu"))


@pytest.mark.parametrize("network", ["authenticator", "critic"])
def test_multi_tensor_adam_matches_the_per_tensor_loop_exactly(network: str) -> None:
    def train(make_optimiser) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = Authenticator((1, 8, 8), 10) if network == "authenticator" else Critic((1, 8, 8), 10)
        optimiser = make_optimiser(model.parameters())
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(128, 1, 8, 8, generator=gen), torch.randint(0, 10, (128,), generator=gen)
        for _ in range(30):
            idx = torch.randint(0, 128, (32,), generator=gen)
            out = model(x[idx]) if network == "authenticator" else model(x[idx], y[idx])[:, None] * torch.ones(10)
            loss = F.cross_entropy(out, y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return model.state_dict()

    options = {"lr": 1e-3, "betas": (0.5, 0.9), "weight_decay": 1e-4}
    loop = train(lambda p: torch.optim.Adam(p, foreach=False, **options))
    multi = train(lambda p: adam(p, **options))
    assert all(torch.equal(loop[k], multi[k]) for k in loop)
    assert not all(torch.equal(loop[k], v) for k, v in train(lambda p: torch.optim.Adam(p, lr=2e-3)).items())


@pytest.mark.slow
def test_a_script_without_a_main_guard_fits_once(tmp_path: Path) -> None:
    """The background folds must not re-run the caller's script (what multiprocessing's spawn does)."""
    script = tmp_path / "train.py"
    script.write_text("from training.config import FitConfig\nfrom training.pipeline import fit\n"
                      f"fit(FitConfig.quick(seed=5, fold_workers=1, **{TINY!r}), progress=False)\nprint('fitted')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("fitted") == 1


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a PID 1 that never reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_a_child_whose_parent_is_killed_exits_and_removes_its_files(tmp_path: Path) -> None:
    """A parent killed by a signal runs no ``finally``: the child must not train on as an orphan
    and leave the trusted images it was handed on disk."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import time\nimport numpy as np\nimport torch\n"
        "from training.data import load_dataset\nfrom training.folds import FoldTask, background_folds\n"
        "data = load_dataset('digits').train.subset(np.arange(200))\n"
        "task = FoldTask(1, data, data, 10, 10**7, 8, 0, 2, 0)  # trains for hours\n"
        "with background_folds([task], 1, 1, torch.device('cpu')) as pending:\n"
        "    worker = pending._workers[0]\n"
        "    print(worker.process.pid, worker.results.parent, flush=True)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert parent.stdout is not None
    child, workdir = parent.stdout.readline().split()
    time.sleep(3.0)  # the child has started training
    assert _running(int(child)) and Path(workdir).exists()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and (_running(int(child)) or Path(workdir).exists()):
        time.sleep(0.5)
    assert not _running(int(child)), "the orphaned fold process is still training"
    assert not Path(workdir).exists(), "the task directory (trusted images) was left on disk"


@pytest.mark.slow
def test_a_training_folder_in_the_callers_directory_does_not_replace_the_child(tmp_path: Path) -> None:
    """``python -m training.folds`` looks in the working directory first: the child must run this
    package's code, not a ``training`` folder where the user happens to run ``depois-train``."""
    work = tmp_path / "work"
    (work / "training").mkdir(parents=True)
    (work / "training" / "__init__.py").write_text("")
    (work / "training" / "folds.py").write_text("raise SystemExit('the caller\\'s training package ran')\n")
    script = tmp_path / "run.py"  # outside ``work``: the parent itself imports the real package
    script.write_text(
        "import numpy as np\nimport torch\n"
        "from training.data import load_dataset\nfrom training.folds import FoldTask, background_folds\n"
        "data = load_dataset('digits').train.subset(np.arange(100))\n"
        "task = FoldTask(1, data, data, 10, 2, 8, 0, 2, 0)\n"
        "with background_folds([task], 1, 1, torch.device('cpu')) as pending:\n"
        "    print(len(pending.results(torch.device('cpu'))[0].raw))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=work)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["100"]
