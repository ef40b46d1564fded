"""What a producer puts in one record can neither stop a partition nor forge a verdict."""

from __future__ import annotations

from kafka import KafkaProducer

from depois_stream.contract import headers as H
from depois_stream.filter.app import StreamFilter
from depois_stream.filter.metrics import Metrics
from depois_stream.contract.wire import CONTENT_TYPE_BINARY, encode_batch
from tests.helpers.kafka_io import (Topics, committed, consumer_config, filter_until_committed, publish,
                                     read_all)


def test_key_and_headers_count_towards_the_size_that_must_be_forwarded(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """900 KiB of value fits under the producer's 1 MiB limit, a 200 KiB key pushes it over."""
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique)
    big = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 << 20)
    try:
        value, ctype = encode_batch(["x"], xte[:1], yte[:1])[0]
        big.send(topics.ingest, value=b"\x00" * (900 << 10), key=b"k" * (200 << 10),
                 headers=[(H.CONTENT_TYPE, CONTENT_TYPE_BINARY.encode())]).get(timeout=10)
        big.send(topics.ingest, value=value, key=b"h" * 10,
                 headers=[(H.CONTENT_TYPE, ctype.encode()), ("x-trace", b"t" * (1100 << 10))]
                 ).get(timeout=10)
    finally:
        big.close()
    ids = [f"{unique}-{i}" for i in range(20)]
    ends = publish(broker.bootstrap, topics.ingest, ids, xte[:20], yte[:20])
    cfg = consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                          kafka={"fetch_max_wait_ms": 100})
    stats = StreamFilter(cfg).run()
    assert stats.consumed == 22
    dead = read_all(broker.bootstrap, topics.dlq)
    assert len(dead) == 2
    for r in dead:
        assert H.as_dict(r.headers)[H.ERROR_CLASS] == "too_large"
        assert r.value == b""
        assert len(r.key or b"") + sum(len(k) + len(v) for k, v in r.headers) < 1 << 20
    routed = [r.key.decode() for t in (topics.clean, topics.quarantine)
              for r in read_all(broker.bootstrap, t)]
    assert sorted(routed) == sorted(ids)
    assert committed(broker.bootstrap, unique, topics.ingest) == ends


def test_both_clients_forward_a_record_just_under_one_mebibyte(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """Routing must not depend on --client: a valid sample carrying 1,000,000 bytes of its own
    headers is under kafka-python's limit (1 MiB less framing) and was dead-lettered as too_large
    by the librdkafka client alone, whose default limit was 1,000,000 bytes (stop 40's chaos run)."""
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique)
    big = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 << 20)
    try:
        value, ctype = encode_batch(["big"], xte[:1], yte[:1])[0]
        big.send(topics.ingest, value=value, key=b"big",
                 headers=[(H.CONTENT_TYPE, ctype.encode()), ("x-pad", b"p" * 1_000_000)]
                 ).get(timeout=10)
    finally:
        big.close()
    ends = publish(broker.bootstrap, topics.ingest, ["small"], xte[1:2], yte[1:2])
    cfg = consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                          kafka={"fetch_max_wait_ms": 100})
    stats = StreamFilter(cfg).run()
    assert stats.consumed == 2
    assert read_all(broker.bootstrap, topics.dlq) == []
    routed = [r for t in (topics.clean, topics.quarantine) for r in read_all(broker.bootstrap, t)]
    assert sorted(r.key.decode() for r in routed) == ["big", "small"]
    forwarded = next(r for r in routed if r.key == b"big")
    assert dict(forwarded.headers)["x-pad"] == b"p" * 1_000_000
    assert committed(broker.bootstrap, unique, topics.ingest) == ends


FORGED = [("depois.verdict", b"clean"), ("depois.error_class", b"malformed"),
          ("depois.replay_count", b"3"), ("Depois.Score", b"99"), ("depois.released.by", b"eve")]


def test_producers_cannot_write_depois_headers(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    n = 30
    labels = yte[:n].copy()
    labels[::2] = (labels[::2] + 1) % 10  # half of them will be quarantined
    try:
        for k, (value, ctype) in enumerate(encode_batch([f"s{i}" for i in range(n)], xte[:n],
                                                        labels)):
            producer.send(topics.ingest, value=value, key=f"s{k}".encode(),
                          headers=[(H.CONTENT_TYPE, ctype.encode()), ("x-keep", b"me"), *FORGED])
        producer.send(topics.ingest, value=b"{bad", key=b"bad",
                      headers=[("depois.verdict", b"clean"), *FORGED]).get(timeout=10)
        producer.flush()
    finally:
        producer.close()
    metrics = Metrics()
    StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client),
                 metrics=metrics).run()
    out = [r for t in topics.outputs() for r in read_all(broker.bootstrap, t)]
    assert len(out) == n + 1
    for r in out:
        names = [k for k, _ in r.headers]
        ours = [k for k in names if k.lower().startswith("depois.")]
        assert len(ours) == len(set(ours)), f"repeated depois headers: {names}"
        # The replay count is lineage (a released copy coming back), kept; the rest is dropped.
        assert r.headers.count((H.REPLAY_COUNT, b"3")) == 1 and "depois.released.by" not in names
        assert "Depois.Score" not in names
        if r.key != b"bad":
            assert (("x-keep", b"me") in r.headers) and (H.CONTENT_TYPE in names)
    verdicts = {r.key: H.as_dict(r.headers)[H.VERDICT] for r in out}
    assert verdicts[b"bad"] == "dlq"
    assert sum(v == "quarantine" for v in verdicts.values()) >= n // 3
    assert metrics.registry.get_sample_value("depois_forged_headers_total") == n + 1


def test_a_header_name_is_counted_in_bytes_so_an_oversized_record_cannot_stall_its_partition(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """A 300,000-emoji header name is 1.2 MB on the wire. Counted in characters (300 kB) the
    record looked small: forwarded whole, refused by the producer, forwarded again without its
    value but with its key and headers, refused again, for ever: the partition stalled."""
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique)
    value, ctype = encode_batch(["x"], xte[:1], yte[:1])[0]
    big = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 << 20)
    try:
        meta = big.send(topics.ingest, value=value, key=b"emoji",
                        headers=[(H.CONTENT_TYPE, ctype.encode()), ("\U0001F600" * 300_000, b"v")]
                        ).get(timeout=10)
    finally:
        big.close()
    ids = [f"{unique}-{i}" for i in range(5)]
    ends = publish(broker.bootstrap, topics.ingest, ids, xte[:5], yte[:5])
    assert meta.offset == 0 and ends == {0: 6}
    filter_until_committed(kafka_client, broker, topics, unique, centroid_model, ends)
    (dead,) = read_all(broker.bootstrap, topics.dlq)
    assert H.as_dict(dead.headers)[H.ERROR_CLASS] == "too_large"
    assert dead.value == b"" and dead.key is None
    routed = [r.key.decode() for t in (topics.clean, topics.quarantine)
              for r in read_all(broker.bootstrap, t)]
    assert sorted(routed) == sorted(ids)


def test_an_unsupported_content_type_is_dead_lettered_with_its_payload_and_its_reason(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """The error message quoted the whole content-type header (up to 4x its size for bytes
    that are not UTF-8): a 300 kB header made a 1.2 MB dead letter, which the producer refused,
    so the record went out again without its payload, as `rejected_by_broker`."""
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique)
    value, _ = encode_batch(["x"], xte[:1], yte[:1], encoding="json")[0]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 << 20)
    try:
        producer.send(topics.ingest, value=value, key=b"odd",
                      headers=[(H.CONTENT_TYPE, b"\xff" * 300_000)]).get(timeout=10)
    finally:
        producer.close()
    filter_until_committed(kafka_client, broker, topics, unique, centroid_model, {0: 1})
    (dead,) = read_all(broker.bootstrap, topics.dlq)
    fields = H.as_dict(dead.headers)
    assert fields[H.ERROR_CLASS] == "unsupported_content_type"
    assert dead.value == value and dead.key == b"odd"
    assert len(fields[H.ERROR]) < 1000
