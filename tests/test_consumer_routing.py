"""A normal run on the real broker: every input record lands in exactly one output topic."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
from kafka import KafkaProducer

from depois_stream.contract import headers as H
from depois_stream.filter.app import StreamFilter
from depois_stream.filter.metrics import Metrics
from depois_stream.contract.wire import CONTENT_TYPE_BINARY, encode_sample
from tests.helpers.kafka_io import (
    Topics, committed, consumer_config, publish, read_all, wait_for,
)


def _bad_records() -> list[tuple[bytes | None, bytes | None]]:
    small, ct = encode_sample("tiny", np.zeros((1, 4, 4), np.float32), 3, encoding="binary")
    big_label, _ = encode_sample("label", np.zeros((1, 8, 8), np.float32), 12)
    return [
        (b"\x00\x01 not a sample", None),  # JSON by default: malformed
        (None, CONTENT_TYPE_BINARY.encode()),  # tombstone
        (b"{}", b"text/csv"),  # unsupported content type
        (small, ct.encode()),  # wrong shape for an 8x8 model
        (big_label, None),  # label 12 of 10 classes
    ]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_every_record_routed_once_with_its_verdict(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    _, _, xte, yte = digits_arrays
    n = 300
    labels = yte[:n].copy()
    labels[:60] = (labels[:60] + 3) % 10  # 60 flipped labels: the centroid model catches most
    ids = [f"{unique}-{i}" for i in range(n)]
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    bad = _bad_records()
    ends = publish(broker.bootstrap, topics.ingest, ids, xte[:n], labels, extra=bad)
    total = sum(ends.values())

    metrics = Metrics()
    flt = StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                                       metrics_port=0, exit_when_idle_s=None), metrics)
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: flt.http_address is not None)
        base = "http://%s:%d" % flt.http_address
        wait_for(lambda: _get(base + "/readyz")[0] == 200)
        assert json.loads(_get(base + "/readyz")[1])["partitions_assigned"] > 0
        wait_for(lambda: flt.stats.consumed >= total)
        scrape = _get(base + "/metrics")[1].decode()
    finally:
        stop.set()
        runner.join(timeout=30)

    outputs = {t: read_all(broker.bootstrap, t) for t in topics.outputs()}
    provenance = [H.as_dict(r.headers) for records in outputs.values() for r in records]
    sources = Counter((h[H.SOURCE_PARTITION], h[H.SOURCE_OFFSET]) for h in provenance)
    assert sum(len(v) for v in outputs.values()) == total
    assert len(sources) == total and set(sources.values()) == {1}  # each input exactly once

    dlq = {H.as_dict(r.headers)[H.ERROR_CLASS] for r in outputs[topics.dlq]}
    assert dlq == {"malformed", "unsupported_content_type", "shape_mismatch", "label_out_of_range"}
    assert len(outputs[topics.dlq]) == len(bad)

    quarantined = {r.key.decode() for r in outputs[topics.quarantine]}
    flipped = set(ids[:60])
    assert len(quarantined & flipped) >= 45  # recall of the flipped labels
    assert len(quarantined - flipped) <= 0.15 * (n - 60)  # false alarms near the 5 % target

    by_key = {r.key: r for r in outputs[topics.clean] + outputs[topics.quarantine]}
    sent = {r.key: r for r in read_all(broker.bootstrap, topics.ingest)}
    assert all(by_key[k].value == sent[k].value for k in by_key)  # bytes forwarded unchanged
    assert all(H.as_dict(r.headers)[H.CONTENT_TYPE] == CONTENT_TYPE_BINARY
               for r in outputs[topics.clean])

    assert committed(broker.bootstrap, unique, topics.ingest) == ends
    routed_q = f'depois_records_routed_total{{destination="quarantine"}} {float(len(quarantined))}'
    assert routed_q in scrape
    assert 'depois_dead_lettered_total{reason="malformed"} 2.0' in scrape
    assert 'depois_model_info{dataset="test-centroid"' in scrape
    assert metrics.registry.get_sample_value("depois_records_consumed_total",
                                             {"topic": topics.ingest}) == total
    assert metrics.registry.get_sample_value("depois_score_count") == n


def test_record_too_large_to_forward_is_dead_lettered_without_payload(
        kafka_client, broker, unique, centroid_model):
    topics = Topics.create(broker.bootstrap, unique)
    big = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=3 << 20)
    try:
        big.send(topics.ingest, value=b"\x00" * (1100 << 10), key=b"huge",
                 headers=[(H.CONTENT_TYPE, CONTENT_TYPE_BINARY.encode())]).get(timeout=10)
    finally:
        big.close()
    cfg = consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                          kafka={"fetch_max_wait_ms": 100, "max_request_size": 1 << 20})
    stats = StreamFilter(cfg).run()  # each client gets only the pass-through options it knows
    assert stats.dead_lettered == 1  # a poison pill for the producer, yet the stream moves on
    (dead,) = read_all(broker.bootstrap, topics.dlq)
    assert dead.key == b"huge" and dead.value == b""
    assert H.as_dict(dead.headers)[H.ERROR_CLASS] == "too_large"
    assert committed(broker.bootstrap, unique, topics.ingest) == {0: 1}
