"""Real-broker helpers for consumer tests: publish a labelled stream, read a topic back whole."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from depois_stream import headers as H
from depois_stream.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS, create_topics
from depois_stream.config import ConsumerConfig
from depois_stream.schema import encode_batch


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


def consumer_config(bootstrap: str, topics: Topics, group: str, model_path, **overrides) -> ConsumerConfig:
    """Consumer settings that make a group join take ~3 s and a drained stream end the run."""
    base = dict(
        bootstrap_servers=bootstrap, model_path=model_path, ingest_topic=topics.ingest,
        clean_topic=topics.clean, quarantine_topic=topics.quarantine, dlq_topic=topics.dlq,
        group_id=group, device="cpu", batch_size=64, linger_ms=20, metrics_port=None,
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS, heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS,
        exit_when_idle_s=2.0, reload_interval_s=0.0, lag_interval_s=1.0,
    )
    return ConsumerConfig(**{**base, **overrides})


def publish(bootstrap: str, topic: str, ids: list[str], images: np.ndarray, labels: np.ndarray,
            extra: list[tuple[bytes | None, bytes | None]] = ()) -> int:
    """Send binary-encoded samples (key = id) plus raw ``(value, content_type)`` records."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for sid, (value, ctype) in zip(ids, encode_batch(ids, images, labels, encoding="binary")):
            producer.send(topic, value=value, key=sid.encode(), headers=[(H.CONTENT_TYPE, ctype.encode())])
        for k, (value, ctype) in enumerate(extra):
            hdrs = [(H.CONTENT_TYPE, ctype)] if ctype is not None else []
            producer.send(topic, value=value, key=f"bad-{k}".encode(), headers=hdrs)
        producer.flush()
    finally:
        producer.close()
    return len(ids) + len(extra)


def read_all(bootstrap: str, topic: str) -> list:
    """Every record currently in ``topic`` (all partitions), without a consumer group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out: list = []
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
        return out
    finally:
        consumer.close(autocommit=False)


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


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        return {tp.partition: off for tp, off in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()
