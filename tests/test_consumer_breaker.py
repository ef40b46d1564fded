"""A model that would quarantine the whole stream trips the breaker: nothing is routed or committed
until an operator fixes the model and resumes; then the held-back batch is filtered normally."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
import threading
import time
from pathlib import Path

from depois_stream.contract import headers as H
from depois_stream.filter.app import RESUME_FLAG, StreamFilter
from depois_stream.filter.metrics import Metrics
from tests.helpers.kafka_io import Topics, committed, consumer_config, publish, read_all, wait_for
from tests.test_consumer_reload import _deploy


@contextmanager
def _running(flt: StreamFilter) -> Iterator[threading.Thread]:
    """The filter's loop in a thread for the block; stopped and joined after it."""
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    runner.start()
    try:
        yield runner
    finally:
        stop.set()
        runner.join(timeout=30)


def _tripping_filter(kafka_client, broker, unique, tmp_path: Path, digits_arrays, control: Path,
                     version: str = "broken", headers: list[tuple[str, bytes]] = (),
                     exit_when_idle_s: float | None = None):
    """A filter whose model quarantines every sample, over 200 published records (``headers``
    on each); the breaker trips on 32 samples and never closes by itself."""
    _, _, xte, yte = digits_arrays
    model = tmp_path / "model.onnx"
    _deploy(model, digits_arrays, version, boundary=10.0)  # every sample quarantined
    topics = Topics.create(broker.bootstrap, unique)
    ids = [f"{unique}-{i}" for i in range(200)]
    ends = publish(broker.bootstrap, topics.ingest, ids, xte[:200], yte[:200], headers=headers)
    metrics = Metrics()
    cfg = consumer_config(broker.bootstrap, topics, unique, model, client=kafka_client,
                          exit_when_idle_s=exit_when_idle_s, breaker_window=1000, breaker_min_samples=32,
                          control_dir=control, breaker_cooldown_s=3600)
    return StreamFilter(cfg, metrics), metrics, topics, ids, ends



def test_breaker_pauses_then_operator_resume_routes_the_held_batch(
        kafka_client, broker, unique, tmp_path: Path, digits_arrays, caplog):
    model = tmp_path / "model.onnx"
    control = tmp_path / "control"
    control.mkdir()
    flt, metrics, topics, ids, ends = _tripping_filter(
        kafka_client, broker, unique, tmp_path, digits_arrays, control, "miscalibrated",
        headers=[("depois.verdict", b"clean")])
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    sample = metrics.registry.get_sample_value
    with caplog.at_level(logging.ERROR, logger="depois_stream.filter.app"):
        runner.start()
        wait_for(lambda: sample("depois_circuit_breaker_trips_total") == 1)
    try:
        time.sleep(1.0)  # paused: nothing more may happen
        assert sample("depois_circuit_breaker_open") == 1
        assert sample("depois_circuit_breaker_trips_total") == 1
        assert flt.stats.consumed == 0  # routed and acknowledged: nothing
        # ...but what was read (and handed back) is counted as read
        assert sample("depois_records_consumed_total", {"topic": topics.ingest}) >= 32
        opened = next(r.getMessage() for r in caplog.records if "breaker OPEN" in r.getMessage())
        window = int(opened.split("of the last ")[1].split()[0])
        assert 32 <= window < 1000, opened  # the samples actually judged, not the window size
        assert all(not read_all(broker.bootstrap, t) for t in topics.outputs())
        assert set(committed(broker.bootstrap, unique, topics.ingest).values()) == {None}

        _deploy(model, digits_arrays, "fixed", boundary=-10.0)  # every sample passes
        wait_for(lambda: sample("depois_model_reloads_total", {"outcome": "loaded"}) == 1)
        (control / RESUME_FLAG).touch()
        wait_for(lambda: flt.stats.consumed >= len(ids))
    finally:
        stop.set()
        runner.join(timeout=30)

    assert sample("depois_circuit_breaker_open") == 0
    assert not (control / RESUME_FLAG).exists()  # the flag is consumed
    clean = read_all(broker.bootstrap, topics.clean)
    assert sorted(r.key.decode() for r in clean) == sorted(ids)
    assert {H.as_dict(r.headers)[H.MODEL_VERSION] for r in clean} == {"fixed"}
    assert committed(broker.bootstrap, unique, topics.ingest) == ends
    # Read twice (handed back at the trip, read again after the resume), consumed once: the
    # delivery SLO (routed / consumed) paged for a loss at every trip while both reads counted.
    assert sample("depois_records_consumed_total", {"topic": topics.ingest}) == len(ids)
    assert sample("depois_records_routed_total", {"destination": "clean"}) == len(ids)
    # Scored twice, counted once: the held batch's forged headers were counted again at its
    # re-read (DepoisForgedHeaders then named more forged records than there were).
    assert sample("depois_score_count") == len(ids)
    assert sample("depois_forged_headers_total") == len(ids)


def test_an_operator_resume_during_a_campaign_quarantines_it_instead_of_tripping_again(
        kafka_client, broker, unique, tmp_path: Path, digits_arrays):
    """A real campaign above the breaker's limit: the operator resumes without a model change
    ("it is a campaign, keep quarantining it"). Before stop 40 the batch held back at the trip
    came first after the resume and tripped the breaker again at once, every time: the stream
    stayed stopped through every resume and cooldown."""
    _, _, xte, yte = digits_arrays
    model = tmp_path / "model.onnx"
    control = tmp_path / "control"
    control.mkdir()
    flt, metrics, topics, ids, ends = _tripping_filter(
        kafka_client, broker, unique, tmp_path, digits_arrays, control, "campaign")
    sample = metrics.registry.get_sample_value
    with _running(flt):
        wait_for(lambda: sample("depois_circuit_breaker_trips_total") == 1)
        (control / RESUME_FLAG).touch()
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == ends, timeout_s=60)
        assert sample("depois_circuit_breaker_trips_total") == 1
        assert sample("depois_circuit_breaker_open") == 0
        assert sample("depois_circuit_breaker_acknowledged") == 1  # the rate never came back down
        quarantined = read_all(broker.bootstrap, topics.quarantine)
        assert sorted(set(r.key.decode() for r in quarantined)) == sorted(ids)

        # The acknowledgement was about that model: a new one that quarantines everything too
        # is judged again (an operator's "it is a campaign" must not disarm the breaker for good).
        _deploy(model, digits_arrays, "campaign-2", boundary=10.0)
        wait_for(lambda: sample("depois_model_reloads_total", {"outcome": "loaded"}) == 1)
        assert sample("depois_circuit_breaker_acknowledged") == 0
        more = [f"{unique}-more-{i}" for i in range(200)]
        publish(broker.bootstrap, topics.ingest, more, xte[200:400], yte[200:400])
        wait_for(lambda: sample("depois_circuit_breaker_trips_total") == 2)


def test_breaker_resumed_while_a_member_joins_leaves_no_partition_paused(
        kafka_client, broker, unique, tmp_path: Path, digits_arrays):
    """The breaker holds member A; a second member joins; the operator resumes A after the
    rebalance revoked A's partitions and before it assigned them again. A's kept partition
    must flow: the clients keep a kept partition's pause flag through an eager rebalance,
    and A, which resumed an empty assignment, stalled on it for good."""
    _, _, xte, yte = digits_arrays
    model = tmp_path / "model.onnx"
    _deploy(model, digits_arrays, "miscalibrated", boundary=10.0)  # every sample "poisoned"
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    ids = [f"{unique}-{i}" for i in range(400)]
    ends = publish(broker.bootstrap, topics.ingest, ids, xte[:400], yte[:400])

    def member(name: str) -> tuple[StreamFilter, Metrics, Path]:
        control = tmp_path / f"control-{name}"
        control.mkdir()
        metrics = Metrics()
        cfg = consumer_config(broker.bootstrap, topics, unique, model, client=kafka_client,
                              exit_when_idle_s=None, breaker_window=1000, breaker_min_samples=32,
                              control_dir=control, breaker_cooldown_s=3600)
        return StreamFilter(cfg, metrics), metrics, control

    a, a_metrics, a_control = member("a")
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop,))]
    threads[0].start()
    try:
        wait_for(lambda: a_metrics.registry.get_sample_value("depois_circuit_breaker_trips_total") == 1)
        _deploy(model, digits_arrays, "fixed", boundary=-10.0)  # every sample passes
        wait_for(lambda: a_metrics.registry.get_sample_value(
            "depois_model_reloads_total", {"outcome": "loaded"}) == 1)
        b, _, _ = member("b")
        threads.append(threading.Thread(target=b.run, args=(stop,)))
        threads[1].start()
        wait_for(lambda: not a.assignment, timeout_s=30)  # the rebalance revoked A's partitions
        (a_control / RESUME_FLAG).touch()  # the operator resumes A now
        wait_for(lambda: a_metrics.registry.get_sample_value("depois_circuit_breaker_open") == 0)
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == ends, timeout_s=60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert len(a.assignment) == 0  # stopped
    clean = read_all(broker.bootstrap, topics.clean)
    assert sorted(set(r.key.decode() for r in clean)) == sorted(ids)


def test_a_resume_flag_older_than_the_trip_does_not_resume_it(
        kafka_client, broker, unique, tmp_path: Path, digits_arrays, caplog):
    """A flag left in the control folder (touched after a cooldown had closed the breaker, or
    "just in case") acknowledged the next trip by itself: a broken model then quarantined the
    whole stream with the breaker closed (stop 40's chaos run). Only a resume made after the
    trip counts."""
    control = tmp_path / "control"
    control.mkdir()
    (control / RESUME_FLAG).touch()  # stale: before anything tripped
    flt, metrics, topics, ids, ends = _tripping_filter(kafka_client, broker, unique, tmp_path,
                                                       digits_arrays, control)
    sample = metrics.registry.get_sample_value
    with caplog.at_level(logging.WARNING, logger="depois_stream.filter.app"), _running(flt):
        wait_for(lambda: sample("depois_circuit_breaker_trips_total") == 1)
        time.sleep(1.0)
        assert sample("depois_circuit_breaker_open") == 1  # held, not resumed by the old flag
        assert not read_all(broker.bootstrap, topics.quarantine)
        assert not (control / RESUME_FLAG).exists()
        (control / RESUME_FLAG).touch()  # the operator's decision, after the trip
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == ends)
    assert any("made before this trip" in r.getMessage() for r in caplog.records)
    assert sample("depois_circuit_breaker_acknowledged") == 1


def test_a_resume_flag_that_cannot_be_removed_is_ignored_not_fatal(
        kafka_client, broker, unique, tmp_path: Path, digits_arrays, caplog):
    """`mkdir resume` (or a read-only mount) made unlink raise, and the filter exited 3 on every
    restart with the partition stalled. Now it is ignored with one error line, and a plain file
    made after it is removed resumes as usual."""
    control = tmp_path / "control"
    control.mkdir()
    flt, metrics, topics, ids, ends = _tripping_filter(kafka_client, broker, unique, tmp_path,
                                                       digits_arrays, control)
    sample = metrics.registry.get_sample_value
    with caplog.at_level(logging.ERROR, logger="depois_stream.filter.app"), _running(flt) as runner:
        wait_for(lambda: sample("depois_circuit_breaker_trips_total") == 1)
        (control / RESUME_FLAG).mkdir()
        wait_for(lambda: any("cannot remove the resume flag" in r.getMessage()
                             for r in caplog.records))
        time.sleep(0.5)
        assert runner.is_alive() and sample("depois_circuit_breaker_open") == 1
        (control / RESUME_FLAG).rmdir()
        time.sleep(0.5)  # the flag's absence is seen: a later unremovable one is news again
        (control / RESUME_FLAG).mkdir()
        wait_for(lambda: sum("cannot remove the resume flag" in r.getMessage()
                             for r in caplog.records) == 2)
        (control / RESUME_FLAG).rmdir()
        (control / RESUME_FLAG).touch()
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == ends)
    errors = [r for r in caplog.records if "cannot remove the resume flag" in r.getMessage()]
    assert len(errors) == 2  # once per unremovable flag, not once per loop


def test_exit_when_idle_waits_while_the_breaker_holds_a_batch(
        kafka_client, broker, unique, tmp_path: Path, digits_arrays):
    """An open breaker pauses consumption, so nothing arrives: the idle clock ran and the
    filter exited 0 with the held batch never filtered (it stays in the topic, uncommitted, but
    the run said it was done). It waits for the breaker to close, then finishes the stream."""
    model = tmp_path / "model.onnx"
    control = tmp_path / "control"
    control.mkdir()
    flt, metrics, topics, ids, ends = _tripping_filter(
        kafka_client, broker, unique, tmp_path, digits_arrays, control, "idle",
        exit_when_idle_s=1.0)
    sample = metrics.registry.get_sample_value
    runner = threading.Thread(target=flt.run)
    runner.start()
    try:
        wait_for(lambda: sample("depois_circuit_breaker_trips_total") == 1)
        runner.join(timeout=4.0)  # four idle limits with the breaker open
        assert runner.is_alive(), "exited with the breaker holding a batch"
        _deploy(model, digits_arrays, "fixed", boundary=-10.0)
        wait_for(lambda: sample("depois_model_reloads_total", {"outcome": "loaded"}) == 1)
        (control / RESUME_FLAG).touch()
    finally:
        runner.join(timeout=60)
    assert not runner.is_alive()
    assert sorted(r.key.decode() for r in read_all(broker.bootstrap, topics.clean)) == sorted(ids)
    assert committed(broker.bootstrap, unique, topics.ingest) == ends
