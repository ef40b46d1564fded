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
