"""Hostile records on the real broker: bytes a well-behaved client would never write still each
land in exactly one output topic, and the filter neither crashes nor stalls on them."""

from __future__ import annotations

import threading
from collections import Counter

from kafka import KafkaProducer

from depois_stream.contract import headers as H
from depois_stream.contract.wire import encode_batch
from depois_stream.filter.app import StreamFilter
from depois_stream.filter.metrics import Metrics
from tests.helpers.kafka_io import Topics, committed, consumer_config, read_all, wait_for


class _RawKey(str):
    """A header name that reaches the wire as arbitrary bytes (Kafka brokers do not check that
    header names are UTF-8; kafka-python's encoder calls ``.encode("utf-8")`` on it)."""

    def __new__(cls, raw: bytes) -> "_RawKey":
        self = super().__new__(cls, raw.decode("latin-1"))
        self.raw = raw
        return self

    def encode(self, *args, **kwargs) -> bytes:  # noqa: D102 - what the producer writes
        return self.raw


def _run_hostile(kafka_client, broker, unique, centroid_model, digits_arrays, own_batches: bool):
    """Publish 40 samples, two of them with a header name that is not UTF-8 (each in a record
    batch of its own, as a separate producer's would be, or inside one batch with the rest),
    filter them and return (ids, hostile offsets, the output topics' records)."""
    _, _, xte, yte = digits_arrays
    n = 40
    ids = [f"{unique}-{i}" for i in range(n)]
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=1000)
    futures, hostile = [], {3, 17}
    try:
        for i, (sid, (value, ctype)) in enumerate(zip(ids, encode_batch(ids, xte[:n], yte[:n], encoding="binary"))):
            hdrs = [(H.CONTENT_TYPE, ctype.encode())]
            if i in hostile:
                if own_batches:
                    producer.flush()
                hdrs.append((_RawKey(b"trace-\xff\xfe\xc3"), b"x"))
            futures.append(producer.send(topics.ingest, value=value, key=sid.encode(), headers=hdrs))
            if i in hostile and own_batches:
                producer.flush()
        producer.flush()
    finally:
        producer.close()
    end = max(f.get(timeout=10).offset for f in futures) + 1

    flt = StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                                       exit_when_idle_s=None), Metrics())
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: (committed(broker.bootstrap, unique, topics.ingest).get(0) or 0) >= end, timeout_s=60)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()

    outputs = {t: read_all(broker.bootstrap, t) for t in topics.outputs()}
    sources = Counter(H.as_dict(r.headers)[H.SOURCE_OFFSET] for rs in outputs.values() for r in rs)
    assert len(sources) == n and set(sources.values()) == {1}  # each input exactly once
    assert committed(broker.bootstrap, unique, topics.ingest) == {0: end}
    dead = {int(H.as_dict(r.headers)[H.SOURCE_OFFSET]): r for r in outputs[topics.dlq]}
    for r in dead.values():
        assert H.as_dict(r.headers)[H.ERROR_CLASS] == "malformed"
        assert not any(k.startswith("trace-") for k, _ in r.headers)  # the unreadable header is not forwarded
    return ids, hostile, dead


def test_header_names_that_are_not_utf8_do_not_stall_the_partition(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    ids, hostile, dead = _run_hostile(kafka_client, broker, unique, centroid_model, digits_arrays,
                                      own_batches=True)
    assert set(dead) == hostile  # only they: the records around them are scored as usual
    if kafka_client == "confluent-kafka":  # reads the record's key and value, not just its offset
        assert all(dead[o].key == ids[o].encode() for o in hostile)


def test_a_record_kafka_python_cannot_parse_inside_a_batch_costs_only_that_batch(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """kafka-python parses a record batch from its start, so it cannot reach the records after
    an unparseable one: those are dead-lettered too (their bytes stay in the topic), and the
    partition goes on. confluent-kafka reads record by record and loses none of them."""
    ids, hostile, dead = _run_hostile(kafka_client, broker, unique, centroid_model, digits_arrays,
                                      own_batches=False)
    if kafka_client == "confluent-kafka":
        assert set(dead) == hostile
    else:
        assert hostile <= set(dead) and min(dead) == min(hostile)
