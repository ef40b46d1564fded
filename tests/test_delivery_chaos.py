"""Chaos: members join, leave and are SIGKILLed at random while a stream flows; nothing is lost.

The property is the filter's core promise, checked end to end against a real broker: every
ingest record ends up in exactly one destination topic (duplicates within it are allowed by
at-least-once delivery and counted), and the group's committed offsets reach the end of every
partition. The schedule of joins, SIGTERMs and SIGKILLs is drawn from a seeded generator, so a
failure can be replayed.

One membership change at a time: each join, SIGTERM or SIGKILL waits (a random 0.3 to 1.5 s
more) until the previous rebalance finished, i.e. every live member is in the group and the
partitions are all owned. Tansu's group coordinator wedges for good when members join, leave or
die while a rebalance is still in progress (reproduced with plain kafka-python and confluent-kafka
consumers and no depois-stream code; Apache Kafka is not affected; docs/consumer.md, "Local
broker caveats"). What the test attacks is the filter's state, not the broker's: the kills land
at random points of the filter's loop, mid-batch, mid-produce, mid-commit.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, free_port
from tests.helpers.kafka_io import (Topics, committed, publish, read_all, readiness,
                                    run_command, wait_for)

pytestmark = pytest.mark.slow

N_RECORDS = 10_000
PARTITIONS = 4
CHUNK = 200  # published every 0.5 s: the stream flows for about 30 s


class _Member:
    def __init__(self, bootstrap: str, topics: Topics, group: str, model: Path,
                 client: str) -> None:
        self.port = free_port()
        self.proc = _member(bootstrap, topics, group, model, client, "--metrics-port",
                            str(self.port))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> dict:
        return readiness(self.port)


def _settled(members: list[_Member]) -> bool:
    """Every live member is in the group and, together, they own every partition."""
    states = [m.ready() for m in members if m.alive()]
    return (all(s.get("checks", {}).get("group_joined") for s in states)
            and sum(s.get("partitions_assigned", 0) for s in states) == PARTITIONS)


def _member(bootstrap: str, topics: Topics, group: str, model: Path, client: str,
            *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        run_command(bootstrap, topics, group, model, client, "--batch-size", "64",
                    "--linger-ms", "20", "--session-timeout-ms", "3000",
                    "--heartbeat-interval-ms", str(TEST_HEARTBEAT_INTERVAL_MS),
                    "--log-level", "WARNING", *extra),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("seed", [7])
def test_members_join_leave_and_die_while_the_stream_flows(
        kafka_client, broker, unique, centroid_model, digits_arrays, seed):
    _, _, xte, yte = digits_arrays
    rng = random.Random(seed)
    topics = Topics.create(broker.bootstrap, unique, partitions=PARTITIONS)
    ids = [f"c{i}" for i in range(N_RECORDS)]
    idx = np.arange(N_RECORDS) % len(yte)
    labels = yte[idx].copy()
    labels[::7] = (labels[::7] + 1) % 10  # some quarantine traffic too
    ends: dict[int, int] = {}

    def stream() -> None:
        for start in range(0, N_RECORDS, CHUNK):
            sl = slice(start, start + CHUNK)
            got = publish(broker.bootstrap, topics.ingest, ids[sl], xte[idx[sl]], labels[sl])
            for p, end in got.items():
                ends[p] = max(ends.get(p, 0), end)
            time.sleep(0.5)

    publisher = threading.Thread(target=stream)
    members: list[_Member] = []
    events: list[str] = []

    def join() -> None:
        members.append(_Member(broker.bootstrap, topics, unique, centroid_model, kafka_client))

    try:
        join()
        publisher.start()
        while publisher.is_alive():
            wait_for(lambda: _settled(members), timeout_s=60)
            time.sleep(rng.uniform(0.3, 1.5))
            alive = [m for m in members if m.alive()]
            if len(alive) < 2:
                action = "join"
            elif "kill" not in events:
                # the first departure is always a SIGKILL: how many events fit before the stream
                # ends depends on the machine's speed, so a random draw alone could kill nobody
                action = "kill"
            elif len(alive) > PARTITIONS:
                action = rng.choice(["term", "kill"])
            else:
                action = rng.choice(["join", "term", "kill", "kill"])
            if action == "join":
                join()
            else:
                victim = rng.choice(alive)
                victim.proc.send_signal(signal.SIGTERM if action == "term" else signal.SIGKILL)
                if action == "term":
                    victim.proc.wait(timeout=30)
            events.append(action)
        publisher.join()
        try:
            wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == ends,
                     timeout_s=120)
        except AssertionError:
            got = committed(broker.bootstrap, unique, topics.ingest)
            logs = []
            for m in members:
                if m.alive():
                    m.proc.send_signal(signal.SIGTERM)
                    logs.append(m.proc.communicate(timeout=30)[1][-2000:])
            raise AssertionError(f"committed {got} != ends {ends} after {events}; the live "
                                 "members' logs:\n" + "\n---\n".join(logs)) from None
    finally:
        for m in members:
            if m.alive():
                m.proc.send_signal(signal.SIGTERM)
        for m in members:
            try:
                m.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                m.proc.kill()
    assert "kill" in events, f"the schedule {events} killed nobody; the test proved little"
    assert sum(ends.values()) == N_RECORDS
    seen = {t: Counter(r.key.decode() for r in read_all(broker.bootstrap, t, timeout_s=60))
            for t in topics.outputs()}
    everywhere = [k for c in seen.values() for k in c]
    assert set(everywhere) == set(ids), f"{len(set(ids) - set(everywhere))} records lost"
    places = Counter(k for c in seen.values() for k in c.keys())
    assert max(places.values()) == 1, "a record reached two different destinations"
    duplicates = len(everywhere) - len(ids)
    print(f"\nchaos {kafka_client}: events {events}, {duplicates} duplicate outputs "
          f"({100 * duplicates / N_RECORDS:.1f} %)")
