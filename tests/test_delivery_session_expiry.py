"""A member whose session expired gets its partition back after another member moved on.

Found by a chaos run (stop 42): a kafka-python member frozen past its session timeout (SIGSTOP
15 s: a long GC pause, a frozen VM) got its partition back after the other member had filtered
and committed thousands of records past where it stopped, resumed at its own hand-back offset
and filtered all of them again (7,178 to 7,336 duplicate outputs per freeze, in exactly-once
mode too). The group's commit is what it must resume from when that is further.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS
from tests.helpers.kafka_io import (Topics, committed, publish, read_all, run_command, tiled_stream,
                                    wait_for)

pytestmark = pytest.mark.slow

# What the frozen member may still filter after it wakes and before its client tells it the
# session expired (kafka-python: about half a second): batches in flight for a partition that
# moved, which docs/consumer.md allows; librdkafka notices first and writes none. Before the
# fix it filtered every one of the 2,000 records the other member had committed.
ZOMBIE_BATCHES = 8
BATCH = 64


def _member(broker, topics: Topics, group: str, model: Path, client: str, log: Path,
            *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        run_command(broker.bootstrap, topics, group, model, client, "--batch-size", str(BATCH),
                    "--linger-ms", "20", "--session-timeout-ms", str(TEST_SESSION_TIMEOUT_MS),
                    "--heartbeat-interval-ms", str(TEST_HEARTBEAT_INTERVAL_MS),
                    "--log-level", "INFO", "--metrics-port", "0", *extra),
        stdout=subprocess.DEVNULL, stderr=log.open("w"))


def _came_back(log: Path) -> bool:
    """The log shows the partition taken away and assigned again after that."""
    text = log.read_text(errors="replace")
    gone = text.find("partitions revoked")
    return gone >= 0 and text.rfind("partitions assigned") > gone


def test_a_member_back_from_an_expired_session_does_not_filter_again_what_another_committed(
        broker, kafka_client: str, unique: str, centroid_model: Path, digits_arrays,
        tmp_path: Path) -> None:
    topics = Topics.create(broker.bootstrap, unique)
    first, x1, y1 = tiled_stream(300, digits_arrays, "first")
    publish(broker.bootstrap, topics.ingest, first, x1, y1)
    log_a = tmp_path / "a.log"
    a = _member(broker, topics, unique, centroid_model, kafka_client, log_a)
    try:
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == {0: 300}, timeout_s=90)
        os.kill(a.pid, signal.SIGSTOP)  # frozen: its session expires, its hand-back stays at 300
        second, x2, y2 = tiled_stream(2000, digits_arrays, "second")
        publish(broker.bootstrap, topics.ingest, second, x2, y2)
        b = _member(broker, topics, unique, centroid_model, kafka_client, tmp_path / "b.log",
                    "--exit-when-idle-s", "3")
        rc = b.wait(timeout=120)
        assert rc == 0, (rc, (tmp_path / "b.log").read_text()[-3000:])
        assert committed(broker.bootstrap, unique, topics.ingest) == {0: 2300}
        os.kill(a.pid, signal.SIGCONT)  # alone in the group now: it gets partition 0 back
        wait_for(lambda: _came_back(log_a), timeout_s=90)
        time.sleep(5)  # time to filter the 2,000 again, if it resumed at its hand-back
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.terminate()
        a.wait(timeout=60)
    keys = Counter(r.key.decode() for t in topics.outputs() for r in read_all(broker.bootstrap, t))
    assert set(keys) == set(first + second), "records lost or unexpected"
    twice = sum(n - 1 for n in keys.values())
    assert not [k for k in first if keys[k] > 1], "records committed before the freeze filtered again"
    assert twice <= ZOMBIE_BATCHES * BATCH, f"{twice} records filtered twice (of 2,000 the other member committed)"


def _owns_a_partition(log: Path) -> bool:
    text = log.read_text(errors="replace")
    at = text.rfind("partitions assigned: [")
    return at >= 0 and not text.startswith("partitions assigned: []", at)


@pytest.mark.parametrize("mode", ["--exactly-once"])  # where it was worst; at-least-once shares the path
def test_a_member_woken_while_another_took_over_does_not_filter_again_what_that_one_committed(
        broker, kafka_client: str, unique: str, centroid_model: Path, digits_arrays,
        tmp_path: Path, mode: str) -> None:
    """The woken member is still a zombie, not back alone: the other member took its partition
    over while it was frozen, filtered the backlog and committed, and is still there.

    Before: until its client told it the session had expired, the woken kafka-python member
    filtered its old partition on from where it had stopped, the whole backlog the other member
    had already committed (an outside drill, stop 51: 5,126 duplicates of 12,000 records in
    1.5 s, exactly-once). Now a member that did not run for longer than its session timeout
    reads the group's commits before it hands anything more on, and moves on to them."""
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    first, x1, y1 = tiled_stream(300, digits_arrays, "first")
    ends = publish(broker.bootstrap, topics.ingest, first, x1, y1)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    members = [_member(broker, topics, unique, centroid_model, kafka_client, log, mode) for log in logs]
    a = members[0]
    try:
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == ends
                 and all(_owns_a_partition(log) for log in logs), timeout_s=90)
        os.kill(a.pid, signal.SIGSTOP)
        second, x2, y2 = tiled_stream(3000, digits_arrays, "second")
        total = {**ends, **publish(broker.bootstrap, topics.ingest, second, x2, y2)}
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == total, timeout_s=120)
        os.kill(a.pid, signal.SIGCONT)  # the other member is still there and owns everything
        time.sleep(6)  # the woken member's time to filter its old partition's backlog again
    finally:
        for m in members:
            os.kill(m.pid, signal.SIGCONT)
            m.terminate()
        for m in members:
            m.wait(timeout=60)
    keys = Counter(r.key.decode() for t in topics.outputs() for r in read_all(broker.bootstrap, t))
    assert set(keys) == set(first + second), "records lost or unexpected"
    twice = sum(n - 1 for n in keys.values())
    assert twice <= ZOMBIE_BATCHES * BATCH, (
        f"{twice} records filtered twice (of 3,000 the other member committed)\n"
        + logs[0].read_text(errors="replace")[-3000:])
