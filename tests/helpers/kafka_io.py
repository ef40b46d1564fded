"""Real-broker helpers for consumer tests: publish a labelled stream, read a topic back whole."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from depois_stream.contract import headers as H
from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS, create_topics
from depois_stream.filter.config import ConsumerConfig
from depois_stream.contract.wire import encode_batch


@dataclass(frozen=True)
class Topics:
    ingest: str
    clean: str
    quarantine: str
    dlq: str

    @classmethod
    def create(cls, bootstrap: str, prefix: str, partitions: int = 1) -> "Topics":
        t = cls(f"{prefix}-in", f"{prefix}-clean", f"{prefix}-q", f"{prefix}-dlq")
        create_topics(bootstrap, [t.ingest], partitions=partitions)
        create_topics(bootstrap, [t.clean, t.quarantine, t.dlq], partitions=1)
        return t

    def outputs(self) -> tuple[str, str, str]:
        return self.clean, self.quarantine, self.dlq


def consumer_config(bootstrap: str, topics: Topics, group: str, model_path,
                    **overrides) -> ConsumerConfig:
    """Consumer settings that make a group join take ~3 s and a drained stream end the run."""
    base = dict(
        bootstrap_servers=bootstrap, model_path=model_path, ingest_topic=topics.ingest,
        clean_topic=topics.clean, quarantine_topic=topics.quarantine, dlq_topic=topics.dlq,
        group_id=group, device="cpu", batch_size=64, linger_ms=20, metrics_port=None,
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS,
        exit_when_idle_s=2.0, reload_interval_s=0.0, lag_interval_s=1.0,
    )
    return ConsumerConfig(**{**base, **overrides})


def publish(bootstrap: str, topic: str, ids: list[str], images: np.ndarray, labels: np.ndarray,
            extra: list[tuple[bytes | None, bytes | None]] = (),
            headers: list[tuple[str, bytes]] = ()) -> dict[int, int]:
    """Send binary-encoded samples (key = id, ``headers`` added to each) plus raw
    ``(value, content_type)`` records.

    Returns the end offset per partition from the broker's acks (Tansu's ListOffsets answer
    lags behind, so tests must not compare against ``end_offsets``)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    futures = []
    try:
        for sid, (value, ctype) in zip(ids, encode_batch(ids, images, labels, encoding="binary")):
            futures.append(producer.send(topic, value=value, key=sid.encode(),
                                         headers=[(H.CONTENT_TYPE, ctype.encode()), *headers]))
        for k, (value, ctype) in enumerate(extra):
            hdrs = [(H.CONTENT_TYPE, ctype)] if ctype is not None else []
            futures.append(producer.send(topic, value=value, key=f"bad-{k}".encode(), headers=hdrs))
        producer.flush()
    finally:
        producer.close()
    ends: dict[int, int] = {}
    for f in futures:
        meta = f.get(timeout=10)
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    return ends


def read_all(bootstrap: str, topic: str, timeout_s: float = 20.0) -> list:
    """Every record currently in ``topic`` (all partitions), without a consumer group.

    Starts at offset 0, not at ListOffsets' earliest: after concurrent appends to one partition
    Tansu's earliest can name a record past records it acknowledged (docs/consumer.md, "Local
    broker caveats"), and a read from there misses them. That is the likely cause of the one
    failure of the two-member test (two filters appending to each output topic; 387 of 400
    read, every one acknowledged). Tansu keeps every record, so 0 is its log start. Stops when
    each partition's position reaches the high watermark reported by its fetch responses
    (correct on Tansu, unlike its ListOffsets)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p)
                 for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, 0)
        out: list = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
            hw = {tp: consumer.highwater(tp) for tp in parts}
            if all(hw[tp] is not None and consumer.position(tp) >= hw[tp] for tp in parts):
                return out
        raise AssertionError(f"could not read {topic} to its end in {timeout_s} s")
    finally:
        consumer.close(autocommit=False)


def assert_each_key_once(bootstrap: str, topics: list[str] | tuple[str, ...],
                         ids: list[str]) -> None:
    """Every id appears exactly once as a record key across ``topics``.

    On a mismatch the topics are read a second time, 2 s later, and the message says what each
    read found: complete on the second read means the first stopped short (a read-side
    problem); still missing means the records were not there (lost after their ack, or never
    written). A one-off failure of this kind was seen once in about twenty full runs and not
    reproduced since; the second read is what tells the next one apart."""
    def keys() -> list[str]:
        return [r.key.decode() for t in topics for r in read_all(bootstrap, t)]

    first = keys()
    if sorted(first) == sorted(ids):
        return
    time.sleep(2.0)
    second = keys()

    def describe(found: list[str]) -> str:
        seen, want = Counter(found), set(ids)
        missing = sorted(want - set(seen))
        twice = sorted(k for k, c in seen.items() if c > 1)
        extra = sorted(set(seen) - want)
        return (f"{len(found)} records, {len(missing)} ids missing {missing[:5]}, "
                f"{len(twice)} read twice {twice[:5]}, {len(extra)} unexpected {extra[:5]}")

    raise AssertionError(f"outputs of {len(ids)} ids: first read {describe(first)}; "
                         f"second read 2 s later {describe(second)}")


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset per partition of ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
                             heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS)
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or [])
        return {p: consumer.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        consumer.close(autocommit=False)


def filter_until_committed(kafka_client: str, broker, topics: Topics, group: str, model,
                           ends: dict[int, int], timeout_s: float = 60,
                           **overrides) -> dict[str, list]:
    """Run an in-process filter until the group has committed ``ends`` (partition -> end
    offset), stop it (it must stop), and return every record of the three output topics.
    ``overrides``: settings other than ``consumer_config``'s.

    Stopped from outside rather than on idleness: a record refused over and over would keep
    it busy for ever, and the commit is what shows that nothing stalled."""
    import threading

    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.metrics import Metrics

    flt = StreamFilter(consumer_config(broker.bootstrap, topics, group, model, client=kafka_client,
                                       exit_when_idle_s=None, **overrides), Metrics())
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: committed(broker.bootstrap, group, topics.ingest) == ends, timeout_s=timeout_s)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()
    return {t: read_all(broker.bootstrap, t) for t in topics.outputs()}


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def readiness(port: int) -> dict:
    """The filter's /readyz body on ``port`` (whatever its status), or {} while nothing answers."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
    except OSError:
        return {}


def run_command(bootstrap: str, topics: Topics, group: str, model, client: str,
                *extra: str) -> list[str]:
    """The `depois-stream run` command line of one filter process on ``topics`` (CPU scoring)."""
    import sys

    return [sys.executable, "-m", "depois_stream", "run", "--model-path", str(model),
            "--bootstrap-servers", bootstrap, "--ingest-topic", topics.ingest,
            "--clean-topic", topics.clean, "--quarantine-topic", topics.quarantine,
            "--dlq-topic", topics.dlq, "--group-id", group, "--device", "cpu",
            "--client", client, *extra]


def tiled_stream(n: int, digits_arrays, prefix: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``n`` records of the digits test split tiled: keys ``prefix-i``, images, labels."""
    _, _, xte, yte = digits_arrays
    idx = np.arange(n) % len(yte)
    return [f"{prefix}-{i}" for i in range(n)], xte[idx], yte[idx]
