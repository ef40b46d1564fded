"""Hot reload under the swaps a real deployment makes, each found by a review (stop 39).

Before these fixes a model path that became a folder, a symlink loop or a graph onnxruntime
cannot run took a serving filter down (exit 3); a file replaced between hashing and loading gave
records a sha256 header naming a graph that had not scored them; a model replaced while the
filter was starting, or by a file with the same size and mtime, was never noticed; and after a
burst of deploys the log's last reload line named an older model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from depois_stream.contract import card_path_for, sha256_file
from depois_stream.filter.detector import Detector, ModelLoadError
from depois_stream.filter.logs import RateLimit
from depois_stream.filter.reload import ModelWatcher
from tests.helpers.onnx_models import build_centroid_model


def build(path: Path, digits_arrays, version: str) -> Path:
    xtr, ytr, _, _ = digits_arrays
    path.parent.mkdir(parents=True, exist_ok=True)
    build_centroid_model(path, xtr, ytr, num_classes=10, model_version=version)
    return path


def variant(src: Path, dst: Path, version: str, **initializers: np.ndarray) -> Path:
    """``src`` with some initializers replaced and a card that matches: a model that passes
    every file check and fails, if at all, only when onnxruntime runs it."""
    m = onnx.load(str(src))
    for i, t in enumerate(m.graph.initializer):
        if t.name in initializers:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(initializers[t.name], t.name))
    for p in m.metadata_props:
        if p.key == "depois.model_version":
            p.value = version
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    card = json.loads(card_path_for(src).read_text())
    card["onnx_sha256"] = sha256_file(dst)
    card["metadata"]["model_version"] = version
    card_path_for(dst).write_text(json.dumps(card))
    return dst


def deploy(src: Path, live: Path) -> None:
    """Card first, then the model, each by rename (a new inode), as a deployment copies them."""
    tmp = live.parent / ".incoming"
    tmp.write_bytes(card_path_for(src).read_bytes())
    os.replace(tmp, card_path_for(live))
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, live)


def load(p: Path) -> Detector:
    return Detector.load(p, device="cpu")


def watcher_on(live: Path, outcomes: list[str]) -> ModelWatcher:
    return ModelWatcher(load(live), load, interval_s=0.0, on_outcome=outcomes.append)


@pytest.fixture
def models(tmp_path: Path, digits_arrays) -> dict[str, Path]:
    a = build(tmp_path / "a" / "model.onnx", digits_arrays, "vA")
    b = build(tmp_path / "b" / "model.onnx", digits_arrays, "vB")
    live = tmp_path / "live" / "model.onnx"
    live.parent.mkdir()
    deploy(a, live)
    return {"a": a, "b": b, "live": live}


def _bounded(call, timeout_s: float = 10.0):
    """``call()`` in a daemon thread: a poll that blocks forever fails the test instead of
    hanging it."""
    import threading

    out: list = []
    t = threading.Thread(target=lambda: out.append(call()), daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"{call} blocked for {timeout_s} s: the filter's loop would stall"
    return out[0]


@pytest.mark.parametrize("breakage", ["folder", "symlink loop", "deleted", "fifo", "device"])
def test_a_model_path_that_cannot_be_read_keeps_the_serving_model(
        models: dict[str, Path], breakage: str, caplog: pytest.LogCaptureFixture) -> None:
    """fifo and device (stop 45, a reload adversary): a named pipe in the model's place blocked
    the loop in ``open`` until something wrote to it, and a symlink to /dev/zero read it forever
    at 100 % CPU (SIGTERM could not stop it), with no log line or metric."""
    live = models["live"]
    outcomes: list[str] = []
    watcher = watcher_on(live, outcomes)
    live.unlink()
    if breakage == "folder":
        live.mkdir()
    elif breakage == "symlink loop":
        live.symlink_to(live)
    elif breakage == "fifo":
        os.mkfifo(live)
    elif breakage == "device":
        live.symlink_to("/dev/zero")
    with caplog.at_level(logging.WARNING):
        assert _bounded(watcher.poll) is None  # before: IsADirectoryError / OSError, and exit 3
        assert _bounded(watcher.poll) is None
    assert watcher.current.metadata.model_version == "vA"
    said = [r.getMessage() for r in caplog.records if "missing or unreadable" in r.getMessage()]
    assert len(said) == 1 and "vA" in said[0]  # once, not at every poll
    if live.is_dir():
        live.rmdir()
    else:
        live.unlink(missing_ok=True)
    deploy(models["b"], live)
    assert watcher.poll().metadata.model_version == "vB"  # and back once a model is


@pytest.mark.parametrize("initializers, why", [
    # the class table one row short: Gather fails for the last label, the probe included
    ({"centroids": "short"}, "fails on a probe batch"),
    # a fixed reshape to 10 rows: runs on the old single probe of 10, fails on any other batch
    ({"flat_shape": np.array([10, 64], np.int64)}, "fails on a probe batch"),
])
def test_a_graph_onnxruntime_cannot_run_is_a_rejected_reload_not_a_crash(
        models: dict[str, Path], tmp_path: Path, initializers: dict, why: str) -> None:
    if initializers.get("centroids") == "short":
        m = onnx.load(str(models["a"]))
        table = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "centroids")
        initializers = {"centroids": table[:9]}
    bad = variant(models["a"], tmp_path / "bad" / "model.onnx", "vBad", **initializers)
    with pytest.raises(ModelLoadError, match=why):
        load(bad)
    outcomes: list[str] = []
    watcher = watcher_on(models["live"], outcomes)
    deploy(bad, models["live"])
    assert watcher.poll() is None
    assert outcomes == ["rejected"] and watcher.current.metadata.model_version == "vA"
    batch = watcher.current.run(np.zeros((16, 1, 8, 8), np.float32), np.arange(16) % 10)
    assert len(batch.score) == 16


def test_the_sha256_a_detector_reports_is_that_of_the_graph_it_runs(
        models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is replaced after it was read for hashing and before onnxruntime opens it."""
    import depois_stream.filter.detector as detector_module

    real_open = detector_module._open_session

    def open_after_a_swap(path, source, providers, quiet, **options):
        deploy(models["b"], models["live"])
        return real_open(path, source, providers, quiet, **options)

    monkeypatch.setattr(detector_module, "_open_session", open_after_a_swap)
    det = Detector.load(models["live"], device="cpu")
    expected = {"vA": sha256_file(models["a"]), "vB": sha256_file(models["b"])}
    assert det.sha256 == expected[det.metadata.model_version]  # before: vB's graph, vA's sha


def test_a_model_replaced_before_the_watcher_starts_is_noticed(models: dict[str, Path]) -> None:
    """The filter loads its model, then waits for the broker; the watcher starts after."""
    serving = load(models["live"])
    deploy(models["b"], models["live"])
    outcomes: list[str] = []
    watcher = ModelWatcher(serving, load, interval_s=0.0, on_outcome=outcomes.append)
    new = watcher.poll()
    assert new is not None and new.metadata.model_version == "vB" and outcomes == ["loaded"]


def test_a_swap_that_keeps_size_and_mtime_is_noticed(models: dict[str, Path],
                                                     digits_arrays) -> None:
    """Store-style deploys (Nix, reproducible builds, cp -a) can keep both; the inode moves."""
    a, b, live = models["a"], models["b"], models["live"]
    assert a.stat().st_size == b.stat().st_size  # the versions have names of one length
    for f in (a, b, card_path_for(a), card_path_for(b)):
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    os.unlink(live)
    os.unlink(card_path_for(live))
    os.symlink(a, live)
    os.symlink(card_path_for(a), card_path_for(live))
    outcomes: list[str] = []
    watcher = watcher_on(live, outcomes)
    assert watcher.poll() is None  # first look: the same model
    for link, target in ((card_path_for(live), card_path_for(b)), (live, b)):
        tmp = live.parent / ".link"
        os.symlink(target, tmp)
        os.replace(tmp, link)
    new = watcher.poll()
    assert new is not None and new.metadata.model_version == "vB"


def test_reload_lines_are_never_rate_limited_away() -> None:
    limit = RateLimit(burst=2, window_s=60.0, clock=lambda: 0.0)

    def record(always: bool) -> logging.LogRecord:
        r = logging.LogRecord("depois_stream.filter.reload", logging.INFO, __file__, 1,
                              "model reloaded: %s -> %s", ("a", "b"), None)
        if always:
            r.always = True
        return r

    assert [limit.filter(record(True)) for _ in range(6)] == [True] * 6
    assert [limit.filter(record(False)) for _ in range(3)] == [True, True, False]


def test_sighup_checks_the_model_now_and_does_not_end_the_filter(
        broker, unique: str, models: dict[str, Path], tmp_path: Path) -> None:
    """Before: SIGHUP's default action ended the filter with no graceful stop."""
    from tests.helpers.kafka_io import Topics

    topics = Topics.create(broker.bootstrap, unique)
    log_path = tmp_path / "filter.log"
    env = {**os.environ, "DEPOIS_BOOTSTRAP_SERVERS": broker.bootstrap}
    cmd = [sys.executable, "-m", "depois_stream", "run", "--model-path", str(models["live"]),
           "--ingest-topic", topics.ingest, "--clean-topic", topics.clean,
           "--quarantine-topic", topics.quarantine, "--dlq-topic", topics.dlq,
           "--group-id", unique, "--device", "cpu", "--metrics-port", "0",
           "--reload-interval-s", "3600"]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "filtering" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        deploy(models["b"], models["live"])
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "model reloaded" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        assert "vA" in log_path.read_text().split("model reloaded")[1].splitlines()[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_model_with_another_input_contract_is_not_hot_reloaded(
        models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: accepted, and every record after it was dead-lettered as shape_mismatch (the
    breaker counts scored records only, so it stayed closed). The log says it in one line: it
    also said "loaded model v6x6" at INFO just before the rejection, which read as a swap."""
    rng = np.random.default_rng(0)
    images, labels = rng.random((50, 1, 6, 6), dtype=np.float32), np.arange(50) % 5
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    build_centroid_model(other, images, labels, num_classes=5, model_version="v6x6")
    outcomes: list[str] = []
    watcher = watcher_on(models["live"], outcomes)
    deploy(other, models["live"])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert watcher.poll() is None
    assert outcomes == ["rejected"] and watcher.current.metadata.model_version == "vA"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in said if "loaded" in m], said
    assert said[-1].startswith("model reload rejected"), said
    assert load(models["live"]).metadata.input_shape == (1, 6, 6)  # a restart would take it


def test_every_rejected_reload_is_counted_by_reason(models: dict[str, Path], tmp_path: Path,
                                                   digits_arrays) -> None:
    """The dashboard's "Model files refused" reads depois_model_rejections_total{reason}; a
    contract change was counted as a rejected reload but under no reason."""
    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.config import ConsumerConfig

    flt = StreamFilter(ConsumerConfig(model_path=models["live"], device="cpu", metrics_port=None,
                                      reload_interval_s=0.0))
    watcher = flt._model_watcher()
    rng = np.random.default_rng(0)
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    build_centroid_model(other, rng.random((50, 1, 6, 6), dtype=np.float32), np.arange(50) % 5,
                         num_classes=5, model_version="v6x6")
    deploy(other, models["live"])
    assert watcher.poll() is None
    value = flt.metrics.registry.get_sample_value
    assert value("depois_model_reloads_total", {"outcome": "rejected"}) == 1
    assert value("depois_model_rejections_total", {"reason": "contract"}) == 1


def test_a_refused_model_file_is_a_state_that_lasts_until_the_file_is_fixed(
        models: dict[str, Path], tmp_path: Path) -> None:
    """SRE walkthrough (stop 43): DepoisModelRejected read a 30-minute count of rejections, so it
    cleared while the refused file stayed (the next restart would then exit 2 on every replica)
    and kept firing after the good file was back. depois_model_file_refused is 1 exactly while the
    file on disk is a refused or missing model."""
    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.config import ConsumerConfig

    live = models["live"]
    flt = StreamFilter(ConsumerConfig(model_path=live, device="cpu", metrics_port=None, reload_interval_s=0.0))
    watcher = flt._model_watcher()
    refused = lambda: flt.metrics.registry.get_sample_value("depois_model_file_refused")  # noqa: E731
    assert watcher.poll() is None and refused() == 0
    good = tmp_path / "good"
    good.mkdir()
    for path in (live, card_path_for(live)):
        (good / path.name).write_bytes(path.read_bytes())
    live.write_bytes(live.read_bytes()[:100])  # a truncated copy: refused (card mismatch)
    for _ in range(3):  # polled again and again: no new rejection is counted, the state stays
        assert watcher.poll() is None and refused() == 1
    assert flt.metrics.registry.get_sample_value("depois_model_rejections_total", {"reason": "card"}) == 1
    live.write_bytes((good / live.name).read_bytes())  # the serving model put back
    assert watcher.poll() is None and refused() == 0
    live.unlink()  # gone: a restart would fail too
    assert watcher.poll() is None and refused() == 1
    deploy(models["b"], live)  # a good new model loads
    assert watcher.poll() is not None and refused() == 0
