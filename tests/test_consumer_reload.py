"""Hot reload: a replaced model is verified and swapped between batches; a bad one is refused."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from depois_stream.contract import headers as H
from depois_stream.filter.app import StreamFilter
from depois_stream.contract import card_path_for
from depois_stream.filter.metrics import Metrics
from depois_stream.filter.reload import ModelWatcher
from depois_stream.filter.detector import Detector
from tests.helpers.kafka_io import Topics, consumer_config, publish, read_all, wait_for
from tests.helpers.onnx_models import build_centroid_model


def _deploy(path: Path, digits_arrays, version: str, boundary: float | None = None,
            card: bool = True) -> None:
    """Build a model elsewhere and move it (then its card) into place, as a deployment would."""
    xtr, ytr, _, _ = digits_arrays
    staging = path.parent / "staging"
    staging.mkdir(exist_ok=True)
    build_centroid_model(staging / path.name, xtr, ytr, num_classes=10, boundary=boundary,
                         model_version=version)
    os.replace(staging / path.name, path)
    if card:
        os.replace(card_path_for(staging / path.name), card_path_for(path))


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _watcher(path: Path, outcomes: list[str], clock: _Clock) -> ModelWatcher:
    load = lambda p: Detector.load(p, device="cpu")  # noqa: E731
    return ModelWatcher(load(path), load, interval_s=1.0, on_outcome=outcomes.append, clock=clock)


def test_new_model_is_swapped_in(tmp_path: Path, digits_arrays) -> None:
    path = tmp_path / "model.onnx"
    _deploy(path, digits_arrays, "v1")
    outcomes: list[str] = []
    clock = _Clock()
    watcher = _watcher(path, outcomes, clock)
    _deploy(path, digits_arrays, "v2", boundary=-0.01)
    assert watcher.poll() is None  # not due yet: the file system is looked at once a second
    clock.t = 1.0
    swapped = watcher.poll()
    assert swapped is not None and swapped.metadata.model_version == "v2"
    assert swapped.metadata.boundary.global_ == -0.01
    assert outcomes == ["loaded"]
    clock.t = 2.0
    path.touch()  # same bytes: not a new model
    assert watcher.poll() is None and outcomes == ["loaded"]


def test_bad_model_keeps_the_old_one_until_its_card_arrives(tmp_path: Path, digits_arrays) -> None:
    path = tmp_path / "model.onnx"
    _deploy(path, digits_arrays, "v1")
    outcomes: list[str] = []
    clock = _Clock()
    watcher = _watcher(path, outcomes, clock)
    _deploy(path, digits_arrays, "v2", boundary=-0.02, card=False)  # model first, card later
    clock.t = 1.0
    assert watcher.poll() is None
    assert outcomes == ["rejected"] and watcher.current.metadata.model_version == "v1"
    os.replace(card_path_for(tmp_path / "staging" / path.name), card_path_for(path))
    clock.t = 2.0
    assert watcher.poll().metadata.model_version == "v2"
    assert outcomes == ["rejected", "loaded"]


def test_stream_verdicts_change_when_the_model_file_is_replaced(
        kafka_client, broker, unique: str, tmp_path: Path, digits_arrays) -> None:
    _, _, xte, yte = digits_arrays
    path = tmp_path / "model.onnx"
    _deploy(path, digits_arrays, "lenient", boundary=-10.0)  # everything passes
    topics = Topics.create(broker.bootstrap, unique)
    metrics = Metrics()
    cfg = consumer_config(broker.bootstrap, topics, unique, path, client=kafka_client, exit_when_idle_s=None,
                          breaker_max_rate=1.0)  # the strict model quarantines all: keep going
    flt = StreamFilter(cfg, metrics)
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    runner.start()
    try:
        half = 100
        ids = [f"{unique}-{i}" for i in range(2 * half)]
        publish(broker.bootstrap, topics.ingest, ids[:half], xte[:half], yte[:half])
        wait_for(lambda: flt.stats.consumed >= half)
        _deploy(path, digits_arrays, "strict", boundary=10.0)  # nothing passes
        wait_for(lambda: metrics.registry.get_sample_value(
            "depois_model_reloads_total", {"outcome": "loaded"}) == 1)
        publish(broker.bootstrap, topics.ingest, ids[half:], xte[half:2 * half], yte[half:2 * half])
        wait_for(lambda: flt.stats.consumed >= 2 * half)
    finally:
        stop.set()
        runner.join(timeout=30)
    clean = {r.key.decode(): H.as_dict(r.headers) for r in read_all(broker.bootstrap, topics.clean)}
    quarantined = {r.key.decode(): H.as_dict(r.headers)
                   for r in read_all(broker.bootstrap, topics.quarantine)}
    assert set(clean) == set(ids[:half]) and set(quarantined) == set(ids[half:])
    assert {h[H.MODEL_VERSION] for h in clean.values()} == {"lenient"}
    assert {h[H.MODEL_VERSION] for h in quarantined.values()} == {"strict"}
    assert {np.float32(h[H.BOUNDARY]) for h in quarantined.values()} == {np.float32(10.0)}

