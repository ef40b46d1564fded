"""Replay names a quarantined sample by where it came from, and reads any dead letter safely."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from depois_stream.contract import headers as H
from depois_stream.audit.records import QuarantinedRecord
from depois_stream.audit.release import plan_release
from depois_stream.audit.export import export
from depois_stream.contract.wire import (
    CONTENT_TYPE_BINARY, CONTENT_TYPE_JSON, DecodeError, decode_image, encode_sample,
)


def _quarantined(key: bytes | None, source_offset: int, offset: int) -> QuarantinedRecord:
    hdrs = [(H.VERDICT, b"quarantine"), (H.SCORE, b"-0.5"), (H.BOUNDARY, b"-0.1"),
            (H.LABEL, b"3"), (H.SOURCE_TOPIC, b"in"), (H.SOURCE_PARTITION, b"0"),
            (H.SOURCE_OFFSET, str(source_offset).encode())]
    return QuarantinedRecord.from_kafka("q", 0, offset, 1000, key, b"v", hdrs)


def test_distinct_samples_sharing_a_key_are_released_independently() -> None:
    a, b = _quarantined(b"same", 10, 0), _quarantined(b"same", 11, 1)
    plan = plan_release([a, b], already_released=set())
    assert [r.location.offset for r in plan.release] == [0, 1]


def test_a_resent_sample_can_be_released_after_its_first_copy() -> None:
    first, again = _quarantined(b"k", 10, 0), _quarantined(b"k", 99, 5)
    plan = plan_release([again], already_released={first.release_id})
    assert [r.location.offset for r in plan.release] == [5]
    plan = plan_release([first, again], already_released={first.release_id})
    assert [r.location.offset for r in plan.release] == [5]
    assert [why for _, why in plan.skipped] == ["already_released"]


def test_the_same_source_record_quarantined_twice_is_released_once() -> None:
    # at-least-once delivery can write one ingest record to quarantine twice
    plan = plan_release([_quarantined(b"k", 10, 0), _quarantined(b"k", 10, 3)], set())
    assert len(plan.release) == 1 and [why for _, why in plan.skipped] == ["duplicate"]


@pytest.mark.parametrize("value", [
    json.dumps({"id": "x", "label": 1, "shape": [-1, -1, 1], "dtype": "uint8",
                "data": ""}).encode(),
    json.dumps({"id": "x", "label": 2 ** 70, "shape": [1, 2, 2], "dtype": "uint8",
                "data": "AAAAAA=="}).encode(),
    json.dumps({"id": "x", "label": -(2 ** 70), "shape": [1, 1, 1], "dtype": "uint8",
                "data": "AA=="}).encode(),
    json.dumps({"id": "x", "label": 1, "shape": [70000, 70000, 70000], "dtype": "uint8",
                "data": "AA=="}).encode(),
    json.dumps({"id": "x", "label": 1, "shape": [0, 3, 3], "dtype": "uint8",
                "data": ""}).encode(),
])
def test_crafted_envelopes_are_decode_errors_without_a_model_shape(value: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_image(value, CONTENT_TYPE_JSON)


@pytest.mark.parametrize("shape", [[-1, -8, 8], [0, 3, 3], [70000, 1, 1]])
def test_a_shape_error_without_a_model_names_no_model_shape(shape) -> None:
    """Without a model, the fallback shape leaked into the message: "image shape [-1, -8, 8]
    does not match the model input shape [1, 1, 1]" (fuzz drill; replay export of a DLQ)."""
    value = json.dumps({"id": "x", "label": 1, "shape": shape, "dtype": "uint8", "data": ""}).encode()
    with pytest.raises(DecodeError) as err:
        decode_image(value, CONTENT_TYPE_JSON)
    assert err.value.reason == "shape_mismatch"
    assert "model" not in str(err.value) and "1 to 65535" in str(err.value), str(err.value)


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=200),
       ct=st.sampled_from([None, CONTENT_TYPE_JSON, CONTENT_TYPE_BINARY, b"\xff", "text/csv"]))
def test_decode_image_without_a_model_shape_raises_only_decode_errors(value, ct) -> None:
    try:
        decode_image(value, ct)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(-2 ** 40, 2 ** 40), min_size=0, max_size=4),
       label=st.integers(-2 ** 80, 2 ** 80), data=st.binary(max_size=64))
def test_json_envelopes_with_any_numbers_decode_or_raise_decode_error(shape, label, data) -> None:
    import base64

    value = json.dumps({"id": "x", "label": label, "shape": shape, "dtype": "uint8",
                        "data": base64.b64encode(data).decode()}).encode()
    try:
        decode_image(value, CONTENT_TYPE_JSON)
    except DecodeError:
        pass


def test_export_of_crafted_dead_letters_lists_them_instead_of_crashing(tmp_path) -> None:
    good, ct = encode_sample("g", np.zeros((1, 2, 2), np.float32), 1)
    crafted = [
        json.dumps({"id": "x", "label": 1, "shape": [-1, -1, 1], "dtype": "uint8",
                    "data": ""}).encode(),
        json.dumps({"id": "x", "label": 2 ** 70, "shape": [1, 2, 2], "dtype": "uint8",
                    "data": "AAAAAA=="}).encode(),
    ]
    records = [QuarantinedRecord.from_kafka("dlq", 0, i, 1000, b"k", v, [(H.VERDICT, b"dlq")])
               for i, v in enumerate(crafted)]
    records.append(QuarantinedRecord.from_kafka("dlq", 0, 9, 1000, None, good,
                                                [(H.CONTENT_TYPE, ct.encode())]))
    summary = export(records, tmp_path)
    assert (summary.decoded, summary.decode_failed) == (1, 2)
