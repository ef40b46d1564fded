"""The CLI consumer as a real process: SIGKILL loses nothing, SIGTERM commits what it produced."""

from __future__ import annotations

import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from depois_stream.contract import headers as H
from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS
from tests.helpers.kafka_io import (Topics, committed, publish, read_all, run_command,
                                    tiled_stream, wait_for)

pytestmark = pytest.mark.serial  # SIGTERM must end the filter within 10 s


def _start(bootstrap: str, topics: Topics, group: str, model: Path, *extra: str,
           session_timeout_ms: int = TEST_SESSION_TIMEOUT_MS,
           client: str = "kafka-python") -> subprocess.Popen:
    return subprocess.Popen(
        run_command(bootstrap, topics, group, model, client, "--batch-size", "8",
                    "--linger-ms", "0", "--metrics-port", "0",
                    "--session-timeout-ms", str(session_timeout_ms),
                    "--heartbeat-interval-ms", str(TEST_HEARTBEAT_INTERVAL_MS), *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class _Progress:
    """Reads the group's committed offsets through one long-lived client (cheap to poll)."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                       enable_auto_commit=False,
                                       session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
                                       heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS)
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]

    def committed(self) -> int:
        return sum(self._consumer.committed(tp) or 0 for tp in self._tps)

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _outputs(bootstrap: str, topics: Topics) -> list:
    return [r for t in topics.outputs() for r in read_all(bootstrap, t)]


def test_sigkill_mid_stream_then_restart_loses_nothing(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    ids, images, labels = tiled_stream(1200, digits_arrays, unique)
    ends = publish(broker.bootstrap, topics.ingest, ids, images, labels)
    progress = _Progress(broker.bootstrap, unique, topics.ingest, 2)
    # The restarted member waits for the killed one's session to expire: keep it short.
    proc = _start(broker.bootstrap, topics, unique, centroid_model, session_timeout_ms=3000,
                  client=kafka_client)
    try:
        wait_for(lambda: progress.committed() >= 100, timeout_s=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        at_kill = progress.committed()
    finally:
        proc.kill()
        progress.close()
    assert at_kill < len(ids), "the consumer finished before it was killed; the test proved nothing"

    restarted = _start(broker.bootstrap, topics, unique, centroid_model, "--exit-when-idle-s", "1",
                       "--batch-size", "128", session_timeout_ms=3000,  # the last --batch-size wins
                       client=kafka_client)
    out, err = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, err

    keys = [r.key.decode() for r in _outputs(broker.bootstrap, topics)]
    assert set(keys) == set(ids)  # nothing lost; duplicates are allowed in at-least-once
    assert committed(broker.bootstrap, unique, topics.ingest) == ends


def test_sigterm_finishes_the_batch_and_commits_exactly_what_it_produced(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    ids, images, labels = tiled_stream(1200, digits_arrays, unique)
    publish(broker.bootstrap, topics.ingest, ids, images, labels)
    progress = _Progress(broker.bootstrap, unique, topics.ingest, 2)
    proc = _start(broker.bootstrap, topics, unique, centroid_model, client=kafka_client)
    try:
        wait_for(lambda: progress.committed() >= 100, timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        progress.close()
    assert proc.returncode == 0, err
    assert "consumed=" in out

    done = {p: offset or 0
            for p, offset in committed(broker.bootstrap, unique, topics.ingest).items()}
    assert sum(done.values()) < len(ids), "stream drained before SIGTERM; the test proved nothing"
    produced: dict[int, list[int]] = defaultdict(list)
    for r in _outputs(broker.bootstrap, topics):
        h = H.as_dict(r.headers)
        produced[int(h[H.SOURCE_PARTITION])].append(int(h[H.SOURCE_OFFSET]))
    for partition, offset in done.items():
        # every record below the committed offset was produced once, nothing beyond it
        assert sorted(produced[partition]) == list(range(offset))
