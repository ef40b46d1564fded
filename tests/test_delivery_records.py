"""What a producer puts in one record can neither stop a partition nor forge a verdict."""

from __future__ import annotations

from kafka import KafkaProducer

from depois_stream.contract import headers as H
from depois_stream.filter.app import StreamFilter
from depois_stream.filter.metrics import Metrics
from depois_stream.contract.wire import CONTENT_TYPE_BINARY, encode_batch
from tests.helpers.kafka_io import Topics, committed, consumer_config, publish, read_all


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
        assert H.REPLAY_COUNT not in names and "depois.released.by" not in names
        assert "Depois.Score" not in names
        if r.key != b"bad":
            assert (("x-keep", b"me") in r.headers) and (H.CONTENT_TYPE in names)
    verdicts = {r.key: H.as_dict(r.headers)[H.VERDICT] for r in out}
    assert verdicts[b"bad"] == "dlq"
    assert sum(v == "quarantine" for v in verdicts.values()) >= n // 3
    assert metrics.registry.get_sample_value("depois_forged_headers_total") == n + 1
