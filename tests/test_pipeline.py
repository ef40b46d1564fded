"""The per-batch data path as pure functions (no broker): records the client could not read."""

from __future__ import annotations

import numpy as np

from depois_stream.contract import headers as H
from depois_stream.contract.wire import encode_batch
from depois_stream.filter.clients.base import RecordBatch, Unreadable
from depois_stream.filter.detector import Detector
from depois_stream.filter.pipeline import route, score
from depois_stream.filter.router import CLEAN, DLQ, QUARANTINE


def test_an_unreadable_record_is_dead_lettered_as_malformed_with_its_bytes_and_the_clients_reason(
        centroid_model, digits_arrays) -> None:
    _, _, xte, yte = digits_arrays
    ids = ["a", "b", "c"]
    encoded = encode_batch(ids, xte[:3], yte[:3], encoding="binary")
    headers = [[(H.CONTENT_TYPE, ct.encode())] for _, ct in encoded]
    headers[1] = Unreadable("its headers cannot be read (UnicodeDecodeError: ...)")
    batch = RecordBatch("in", np.zeros(3, np.int32), np.arange(3, dtype=np.int64), np.zeros(3, np.int64),
                        [i.encode() for i in ids], [v for v, _ in encoded], headers)
    detector = Detector.load(centroid_model, device="cpu")

    scored = score(batch, detector, max_record_bytes=1 << 20)
    assert scored.index.tolist() == [0, 2]  # the other two are scored as usual
    assert scored.failures == [(1, "malformed", "its headers cannot be read (UnicodeDecodeError: ...)")]

    routed = route(batch, scored, "v1", "ab" * 32, partition_counts=[1, 1, 1], max_record_bytes=1 << 20)
    assert routed.destination[1] == DLQ and set(routed.destination[[0, 2]].tolist()) <= {CLEAN, QUARANTINE}
    assert routed.values[1] == encoded[1][0] and routed.keys[1] == b"b"  # payload kept for replay
    assert H.as_dict(routed.headers[1])[H.ERROR_CLASS] == "malformed"
    assert routed.dead_letter_reasons == {"malformed": 1}


def test_a_record_refused_again_is_dead_lettered_bare_and_a_header_name_counts_in_bytes(
        centroid_model, digits_arrays) -> None:
    """A first refusal drops the value; a second means the key or the producer's headers are
    refused too (a dead-letter topic with a lower max.message.bytes): the dead letter keeps
    only the filter's headers, which name the source record."""
    from depois_stream.filter.pipeline import (BARE_AFTER, HEADER_ALLOWANCE, HEADER_OVERHEAD, Refusal,
                                               scan_headers)

    _, _, xte, yte = digits_arrays
    (value, ct), = encode_batch(["a"], xte[:1], yte[:1], encoding="binary")
    batch = RecordBatch("in", np.zeros(1, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64),
                        [b"k" * 5000], [value], [[(H.CONTENT_TYPE, ct.encode()), ("x-trace", b"t")]])
    detector = Detector.load(centroid_model, device="cpu")
    limit = 1 << 20
    for times, bare in [(1, False), (BARE_AFTER, True)]:
        scored = score(batch, detector, limit, {(0, 0): Refusal("too big for the topic", times)})
        routed = route(batch, scored, "v1", "ab" * 32, [1, 1, 1], limit)
        assert routed.destination[0] == DLQ and routed.values[0] == b""
        assert H.as_dict(routed.headers[0])[H.ERROR_CLASS] == "rejected_by_broker"
        assert (routed.keys[0] is None) == bare
        assert (("x-trace", b"t") in routed.headers[0]) == (not bare)

    emoji = [(H.CONTENT_TYPE, ct.encode()), ("\U0001F600" * 1000, b"")]
    sized = RecordBatch("in", np.zeros(1, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64),
                        [None], [value], [emoji])
    own = len(value) + len(H.CONTENT_TYPE) + len(ct) + 4000 + 2 * HEADER_OVERHEAD  # bytes, not characters
    assert scan_headers(sized).sizes.tolist() == [own]
    assert score(sized, detector, own + HEADER_ALLOWANCE - 1).failures[0][1] == "too_large"


def test_the_error_header_is_bounded_whatever_the_producer_sent(centroid_model, digits_arrays) -> None:
    """The message quoted a 300 kB content type back (1.2 MB for bytes that are not UTF-8):
    the dead letter outgrew the producer's limit and lost its payload on the retry."""
    from depois_stream.filter.router import MAX_ERROR_BYTES

    _, _, xte, yte = digits_arrays
    (value, _), = encode_batch(["a"], xte[:1], yte[:1], encoding="json")
    n = "9" * 4000
    shape = ('{"id":"b","label":1,"shape":[%s,%s,%s],"dtype":"uint8","data":""}' % (n, n, n)).encode()
    label = ('{"id":"c","label":%s,"shape":[1,8,8],"dtype":"uint8","data":""}' % n).encode()
    batch = RecordBatch("in", np.zeros(3, np.int32), np.arange(3, dtype=np.int64), np.zeros(3, np.int64),
                        [b"a", b"b", b"c"], [value, shape, label],
                        [[(H.CONTENT_TYPE, b"\xff" * 300_000)], [], []])
    detector = Detector.load(centroid_model, device="cpu")
    routed = route(batch, score(batch, detector, 1 << 20), "v1", "ab" * 32, [1, 1, 1], 1 << 20)
    for i in range(3):
        fields = dict(routed.headers[i])
        assert routed.destination[i] == DLQ and routed.values[i] == batch.values[i]
        assert len(fields[H.ERROR]) <= MAX_ERROR_BYTES
    assert dict(routed.headers[0])[H.ERROR_CLASS] == b"unsupported_content_type"


def test_end_to_end_latency_is_never_negative_and_skips_records_without_a_timestamp() -> None:
    """Fuzz run (stop 43): one record with a CreateTime of 2**62 ms made
    depois_end_to_end_latency_seconds_sum -1.38e16, and every average read from it negative."""
    from depois_stream.filter.metrics import Metrics
    from depois_stream.filter.pipeline import latency_seconds

    now = 1_000_000.0
    stamps = np.array([now * 1000 - 2500, 2**62, -1, now * 1000], np.int64)
    latency = latency_seconds(now, stamps)
    np.testing.assert_allclose(latency[[0, 1, 3]], [2.5, 0.0, 0.0])
    assert np.isnan(latency[2])
    metrics = Metrics()
    metrics.end_to_end_latency.observe_many(latency)
    reg = metrics.registry
    assert reg.get_sample_value("depois_end_to_end_latency_seconds_sum") == 2.5
    assert reg.get_sample_value("depois_end_to_end_latency_seconds_count") == 3


def test_a_value_above_the_decoders_16_mib_is_too_large_whatever_the_forwarding_limit(
        centroid_model, digits_arrays) -> None:
    """docs/wire-format.md and replay bound a value at 16 MiB; with the producer's limit raised
    past it (``--kafka max_request_size=...``) the filter decoded a 17 MB sample and sent it to
    the clean topic, which replay then called too large."""
    from depois_stream.contract.wire import DEFAULT_MAX_BYTES

    _, _, xte, yte = digits_arrays
    (value, ct), = encode_batch(["a"], xte[:1], yte[:1], encoding="json")
    big = value + b" " * DEFAULT_MAX_BYTES  # still a valid JSON sample
    batch = RecordBatch("in", np.zeros(2, np.int32), np.arange(2, dtype=np.int64), np.zeros(2, np.int64),
                        [b"a", b"b"], [value, big], [[(H.CONTENT_TYPE, ct.encode())]] * 2)
    detector = Detector.load(centroid_model, device="cpu")
    scored = score(batch, detector, max_record_bytes=40 << 20)
    assert scored.index.tolist() == [0]
    assert [(i, why) for i, why, _ in scored.failures] == [(1, "too_large")]
    assert f"the {DEFAULT_MAX_BYTES}-byte limit" in scored.failures[0][2]
