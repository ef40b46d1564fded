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
