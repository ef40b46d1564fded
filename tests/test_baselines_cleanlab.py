"""cleanlab's baseline never forks: a fork of the multi-threaded evaluating process (torch's and the
Kafka clients' threads) can deadlock in the child on a lock another thread held, which hung a full
test run in stop 37 (two single-threaded forked children waiting on a futex forever)."""

from __future__ import annotations

import multiprocessing.pool
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("cleanlab")

from training.baselines import confident_learning  # noqa: E402
from training.downstream import ClassifierConfig  # noqa: E402


def test_the_cleanlab_baseline_flags_without_starting_a_process_pool(monkeypatch) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    plan = SimpleNamespace(pool=SimpleNamespace(images=images[:300], labels=labels[:300]))
    baseline = confident_learning(plan, 10, 0, ClassifierConfig(steps=20))

    def no_pool(*args, **kwargs):
        raise AssertionError("cleanlab started a multiprocessing pool (a fork of this process)")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", no_pool)
    test_images, test_labels = images[300:600], labels[300:600].copy()
    test_labels[:30] = (test_labels[:30] + 1) % 10
    flags = baseline.flag(test_images, test_labels, baseline.score(test_images, test_labels))
    assert flags.dtype == bool and flags.shape == test_labels.shape and flags[:30].mean() > flags[30:].mean()
