"""Rebalances never lose a record: a member that gets a partition back re-reads what it dropped.

kafka-python 3 keeps the fetch position of a partition that is revoked and assigned back to the
same member (eager protocol: every rebalance revokes everything first). The filter drops the
records it had buffered for revoked partitions, so unless it seeks back, the next commit of the
re-assigned partition jumps past them.

Two timings, because kafka-python revokes and assigns in different ``poll()`` calls when the
join outlasts the poll's timeout: with a long linger the whole join happens inside one poll;
with a linger that runs out during a slow join (session timeout 10 s: a Tansu join takes about
half of it) the revocation and the assignment are several polls apart. The second timing lost
~50 records per rebalance in the chaos test before the fix.
"""

from __future__ import annotations

import threading
import time

import pytest

from depois_stream.filter.app import StreamFilter
from tests.helpers.kafka_io import Topics, committed, consumer_config, publish, read_all, wait_for


def _ids_out(bootstrap: str, topics: Topics) -> list[str]:
    return [r.key.decode() for t in topics.outputs() for r in read_all(bootstrap, t)]


@pytest.mark.parametrize("timing", ["join-in-one-poll", "join-across-polls"])
def test_rebalance_during_linger_loses_nothing(
        kafka_client, broker, unique, centroid_model, digits_arrays, timing):
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    # A holds both partitions and lingers on a half-full batch while B joins the group.
    if timing == "join-in-one-poll":
        slow = dict(batch_size=5000, linger_ms=8000, exit_when_idle_s=None)
    else:  # revoked ~1 s into a 3 s linger, re-assigned ~5 s later
        slow = dict(batch_size=5000, linger_ms=3000, exit_when_idle_s=None,
                    session_timeout_ms=10_000)
    a = StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client, **slow))
    stop = threading.Event()
    ta = threading.Thread(target=a.run, args=(stop,))
    ta.start()
    b = None
    tb = None
    try:
        wait_for(lambda: len(a.assignment) == 2, timeout_s=30)
        first = [f"{unique}-a{i}" for i in range(200)]
        ends = publish(broker.bootstrap, topics.ingest, first, xte[:200], yte[:200])
        time.sleep(1.0 if timing == "join-in-one-poll" else 0.3)  # A polled them, lingers
        b = StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                                         **slow))
        tb = threading.Thread(target=b.run, args=(stop,))
        tb.start()
        wait_for(lambda: len(a.assignment) == 1 and len(b.assignment) == 1, timeout_s=30)
        second = [f"{unique}-b{i}" for i in range(100)]
        more = publish(broker.bootstrap, topics.ingest, second, xte[200:300], yte[200:300])
        ends = {p: max(ends.get(p, 0), more.get(p, 0)) for p in set(ends) | set(more)}
        everything = sorted(first + second)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sorted(set(_ids_out(broker.bootstrap, topics))) != everything:
            time.sleep(1.0)
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == ends, timeout_s=30)
    finally:
        stop.set()
        ta.join(timeout=30)
        if tb is not None:
            tb.join(timeout=30)
    assert sorted(set(_ids_out(broker.bootstrap, topics))) == everything


@pytest.mark.timeout(180)
def test_a_pause_lifted_while_a_rebalance_is_under_way_leaves_no_partition_paused(
        kafka_client, broker, unique, digits_arrays):
    """The breaker or a producer backoff pauses every partition; a member joins; the pause is
    lifted after the revocation and before the new assignment. The partitions this member
    keeps must flow again.

    kafka-python's eager rebalance keeps the state of a partition that stays with the member,
    paused flag included, while the source, which resumed an empty assignment, believes
    nothing is paused: the kept partitions stalled for good, without an error."""
    from kafka import KafkaConsumer

    from depois_stream.filter.clients import make_client
    from depois_stream.filter.clients.base import ClientSettings
    from depois_stream.filter.metrics import Metrics
    from depois_stream.filter.source import Source

    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    consumer = make_client(kafka_client).consumer(
        ClientSettings(bootstrap_servers=broker.bootstrap, client_id=f"{unique}-a", group_id=unique),
        lambda err: None)
    # The breaker closes right when the rebalance revokes everything, whatever the broker's
    # timing: before the new assignment, which comes in this poll or a later one.
    source = Source(consumer, topics.ingest, batch_size=64, linger_ms=0, metrics=Metrics(),
                    on_revoked=lambda gone: source.resume("breaker") if gone else None)
    source.subscribe()
    stop = threading.Event()
    other_owns: set[int] = set()

    def other_member() -> None:  # a plain consumer of the same group: joining makes the rebalance
        b = KafkaConsumer(topics.ingest, bootstrap_servers=broker.bootstrap, group_id=unique,
                          enable_auto_commit=False, session_timeout_ms=10_000,
                          heartbeat_interval_ms=1000, auto_offset_reset="latest")
        try:
            while not stop.is_set():
                b.poll(timeout_ms=200)
                other_owns.clear()
                other_owns.update(tp.partition for tp in b.assignment())
        finally:
            b.close()

    tb = threading.Thread(target=other_member)
    try:
        deadline = time.monotonic() + 60
        while len(source.assigned) < 2:
            assert time.monotonic() < deadline, "the member never got both partitions"
            source.idle(0.2)
        source.pause("breaker")
        tb.start()
        while source.paused or not source.assigned or len(other_owns) != 1:
            assert time.monotonic() < deadline, "the rebalance did not finish"
            source.idle(0.2)
        (kept,) = {p for _, p in source.assigned}
        ids = [f"{unique}-{i}" for i in range(40)]
        ends = publish(broker.bootstrap, topics.ingest, ids, xte[:40], yte[:40])
        assert ends.get(kept, 0) > 0
        got: set[int] = set()
        while len(got) < ends[kept]:
            assert time.monotonic() < deadline + 30, (
                f"partition {kept} stalled: {len(got)} of {ends[kept]} records after the pause was lifted")
            batch = source.next_batch()
            assert set(batch.partitions.tolist()) <= {kept}
            got.update(batch.offsets.tolist())
    finally:
        stop.set()
        if tb.is_alive():
            tb.join(timeout=30)
        consumer.close()
    assert got == set(range(ends[kept]))
