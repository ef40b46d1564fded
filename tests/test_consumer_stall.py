"""A partition the client library stops fetching is restarted, on the real broker.

kafka-python has lost partitions' fetches around pause and resume (the cases found are pinned in
test_delivery_fuzz.py); the next such bug would leave one partition with a backlog that never
moves while the others flow, which no member-level signal shows. Here the client stops fetching
one partition behind the filter's back (a pause the filter did not ask for, the symptom such
bugs have) and the filter must notice the stall and restart the partition, losing and
repeating nothing.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from depois_stream.contract import headers as H
from depois_stream.filter.app import StreamFilter
from depois_stream.filter.metrics import Metrics
from tests.helpers.kafka_io import Topics, committed, consumer_config, publish, read_all, wait_for

N_PER_PARTITION = 300


class _StopsFetching:
    """The filter's consumer, but after the first poll that returned records of ``partition``
    the library stops fetching it (a pause nobody asked for) and loses its place (back to the
    partition's start): resuming alone would read the records already handed on again."""

    def __init__(self, inner, topic: str, partition: int) -> None:
        self._inner, self._tp = inner, (topic, partition)
        self.injected = False

    def poll(self, timeout_s: float, max_records: int):
        got = self._inner.poll(timeout_s, max_records)
        if not self.injected and (got.partitions == self._tp[1]).any():
            self._inner.pause([self._tp])
            self._inner.seek(self._tp, 0)
            self.injected = True
        return got

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _Client:
    def __init__(self, inner, topic: str) -> None:
        self._inner, self._topic = inner, topic
        self.consumers: list[_StopsFetching] = []

    def consumer(self, settings, on_commit):
        c = _StopsFetching(self._inner.consumer(settings, on_commit), self._topic, 0)
        self.consumers.append(c)
        return c

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


@pytest.mark.timeout(120)
def test_a_partition_the_client_stops_fetching_is_restarted_and_nothing_is_lost(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    ids = [f"{unique}-{i}" for i in range(2 * N_PER_PARTITION)]
    idx = [i % len(yte) for i in range(len(ids))]
    ends = publish(broker.bootstrap, topics.ingest, ids, xte[idx], yte[idx])
    assert set(ends) == {0, 1}

    metrics = Metrics()
    flt = StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model,
                                       client=kafka_client, exit_when_idle_s=None,
                                       lag_interval_s=0.5, stall_restart_s=2.0), metrics)
    flt.client = client = _Client(flt.client, topics.ingest)
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == ends, timeout_s=60)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()
    assert client.consumers and client.consumers[0].injected  # the stall did happen
    outputs = [r for t in topics.outputs() for r in read_all(broker.bootstrap, t)]
    seen = Counter((H.as_dict(r.headers)[H.SOURCE_PARTITION], H.as_dict(r.headers)[H.SOURCE_OFFSET])
                   for r in outputs)
    assert set(seen) == {(str(p), str(o)) for p, end in ends.items() for o in range(end)}
    assert set(seen.values()) == {1}  # each record out exactly once
    restarts = metrics.registry.get_sample_value(
        "depois_partition_restarts_total", {"topic": topics.ingest, "partition": "0"})
    assert restarts is not None and restarts >= 1


@pytest.mark.timeout(60)
def test_lag_is_measured_from_where_a_seek_put_the_partition(kafka_client, broker, unique,
                                                              digits_arrays):
    """librdkafka forgets a partition's position on every seek until the next record is read;
    the lag then fell back to the group's commit, so a partition sought past it (a hand-back
    after a rebalance whose acknowledged batches could not be committed) showed records to give
    that will never come, and the stall watch would restart it every minute for nothing. (The
    end of the partition is taken from fetch responses too: Tansu's ListOffsets answer lags.)"""
    from depois_stream.filter.clients import make_client
    from depois_stream.filter.clients.base import ClientSettings

    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    ids = [f"{unique}-{i}" for i in range(20)]
    assert publish(broker.bootstrap, topics.ingest, ids, xte[:20], yte[:20]) == {0: 20}
    consumer = make_client(kafka_client).consumer(
        ClientSettings(bootstrap_servers=broker.bootstrap, client_id=unique, group_id=unique),
        lambda err: None)
    tp = (topics.ingest, 0)
    consumer.subscribe(topics.ingest, lambda tps: {}, lambda tps: None, lambda tps: None)
    try:
        wait_for(lambda: len(consumer.poll(0.5, 5)) > 0, timeout_s=30)
        consumer.commit({tp: 2}, asynchronous=False)  # the group's commit, well behind
        for offset, lag in ((10, 10), (20, 0), (15, 5)):
            consumer.seek(tp, offset)
            assert consumer.lag([tp], 5.0) == {tp: lag}, f"after a seek to {offset}"
    finally:
        consumer.close()


@pytest.mark.timeout(60)
def test_lag_counts_a_partition_the_member_has_not_read_from_yet(kafka_client, broker, unique,
                                                                  digits_arrays):
    """A partition this member owns but has handed no record from, with no commit of the group:
    librdkafka has no position for it, and the lag left it out, so a member whose other
    partitions were drained counted as caught up and ``--exit-when-idle-s`` could end the run
    with that partition's records unread. Its lag is measured from where the member will start
    (the log's start under auto_offset_reset=earliest)."""
    from depois_stream.filter.clients import make_client
    from depois_stream.filter.clients.base import ClientSettings

    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    consumer = make_client(kafka_client).consumer(
        ClientSettings(bootstrap_servers=broker.bootstrap, client_id=unique, group_id=unique),
        lambda err: None)
    owned: list = []
    consumer.subscribe(topics.ingest, lambda tps: owned.extend(tps) or {}, lambda tps: None,
                       lambda tps: None)
    try:
        wait_for(lambda: len(consumer.poll(0.2, 5)) == 0 and len(owned) == 2, timeout_s=30)
        ids = [f"{unique}-{i}" for i in range(20)]
        ends = publish(broker.bootstrap, topics.ingest, ids, xte[:20], yte[:20])
        want = {(topics.ingest, p): ends.get(p, 0) for p in (0, 1)}
        assert sum(want.values()) == 20
        # Measured, and more than 0 where there are records: before any fetch has carried the
        # end, Tansu's ListOffsets answer can fall short of it (1 for 11 records here; Kafka's is
        # exact), so the count itself may be low; what idle exit needs is that it is not 0.
        seen: list = []
        try:  # not polled again: nothing is handed to this member meanwhile
            wait_for(lambda: seen.append(consumer.lag(sorted(want), 5.0)) or (
                set(seen[-1]) == set(want)
                and all(0 < seen[-1][tp] <= n if n else seen[-1][tp] == 0
                        for tp, n in want.items())), timeout_s=15)
        except AssertionError:
            raise AssertionError(f"lag {seen[-1]}, records to give {want}") from None
    finally:
        consumer.close()


def test_lag_is_exported_soon_after_an_assignment_not_one_interval_later(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """After an assignment the member's partitions had no ``depois_consumer_lag`` series until
    the next lag read, up to ``--lag-interval-s`` later (an outside drill, stop 51: 4 partitions
    with a backlog and no series 12 s after a takeover; a ``sum`` of the lag, and a lag-driven
    autoscaler, read 0 meanwhile). The lag is now read about a second after every assignment."""
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    ids = [f"{unique}-{i}" for i in range(40)]
    publish(broker.bootstrap, topics.ingest, ids, xte[:40], yte[:40])
    metrics = Metrics()
    flt = StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model,
                                       client=kafka_client, exit_when_idle_s=None,
                                       lag_interval_s=120.0), metrics)
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    runner.start()

    def sample(name: str, partition: int) -> float | None:
        return metrics.registry.get_sample_value(name, {"topic": topics.ingest, "partition": str(partition)})

    try:
        wait_for(lambda: metrics.registry.get_sample_value("depois_partitions_assigned") == 2,
                 timeout_s=30)
        wait_for(lambda: all(sample("depois_consumer_lag", p) is not None for p in (0, 1)),
                 timeout_s=10)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()
