"""The wire format: round trips, one reachable path per DLQ reason, and decoder fuzzing."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depois_stream.contract.wire import (
    BINARY_MAGIC, CONTENT_TYPE_BINARY, CONTENT_TYPE_JSON, DECODE_REASONS, HEADER_DTYPE, HEADER_SIZE,
    DecodeError, SampleEnvelope, decode_batch, decode_image, encode_batch, encode_sample,
)

SHAPE = (1, 4, 4)
CLASSES = 5


def _image(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _decode(records: list[tuple[bytes | None, str | None]], **kw):
    return decode_batch([v for v, _ in records], [c for _, c in records],
                        input_shape=kw.pop("input_shape", SHAPE),
                        num_classes=kw.pop("num_classes", CLASSES), **kw)


def _assert_accounted(batch, n: int) -> None:
    """Every input position is either decoded or failed, exactly once."""
    failed = [f.index for f in batch.failures]
    assert len(set(failed)) == len(failed)
    assert set(failed).isdisjoint(batch.index.tolist())
    assert sorted(failed + batch.index.tolist()) == list(range(n))
    assert all(f.reason in DECODE_REASONS and f.message for f in batch.failures)
    assert batch.images.shape == (len(batch.index), *SHAPE) and batch.images.dtype == np.float32
    assert len(batch.labels) == len(batch.ids) == len(batch.index)


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_float32_round_trip_is_exact(encoding: str) -> None:
    image = _image(1)
    value, ct = encode_sample("s-1", image, 3, encoding=encoding, dtype="float32")
    assert ct == (CONTENT_TYPE_JSON if encoding == "json" else CONTENT_TYPE_BINARY)
    sample_id, label, decoded = decode_image(value, ct, input_shape=SHAPE, num_classes=CLASSES)
    assert (sample_id, label) == ("s-1", 3)
    np.testing.assert_array_equal(decoded, image)


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_uint8_round_trip_is_pixels_over_255(encoding: str) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, SHAPE, dtype=np.uint8)
    pixels.flat[:2] = (0, 255)
    value, ct = encode_sample("ünï-id", pixels, 0, encoding=encoding, dtype="uint8")
    sample_id, _, decoded = decode_image(value, ct)
    assert sample_id == "ünï-id"
    np.testing.assert_array_equal(decoded, pixels.astype(np.float32) / np.float32(255))
    assert decoded.flat[0] == 0.0 and decoded.flat[1] == 1.0


def test_float_images_quantise_to_nearest_uint8() -> None:
    image = _image(3)
    value, ct = encode_sample("q", image, 1, encoding="binary", dtype="uint8")
    _, _, decoded = decode_image(value, ct)
    assert np.abs(decoded - image).max() <= 0.5 / 255 + 1e-7


def test_encoder_refuses_lossy_quantisation() -> None:
    with pytest.raises(ValueError, match="float32"):
        encode_sample("bad", _image() * 2, 1, dtype="uint8")


def test_json_envelope_fields_are_documented_names() -> None:
    value, _ = encode_sample("e", _image(), 2, source="digits", ts=12.5)
    envelope = json.loads(value)
    assert set(envelope) == {"id", "label", "shape", "dtype", "data", "source", "ts"}
    assert envelope["shape"] == list(SHAPE) and envelope["dtype"] == "uint8"
    assert len(base64.b64decode(envelope["data"])) == 16


def test_binary_header_layout() -> None:
    value, _ = encode_sample("ab", _image(), 4, encoding="binary", dtype="float32", source="src",
                             ts=7.0)
    header = np.frombuffer(value[:HEADER_SIZE], dtype=HEADER_DTYPE)[0]
    assert HEADER_SIZE == 32 and value[:4] == BINARY_MAGIC
    assert (header["channels"], header["height"], header["width"]) == SHAPE
    assert (header["label"], header["id_len"], header["source_len"]) == (4, 2, 3)
    assert header["payload_len"] == 64 and header["ts"] == 7.0
    assert len(value) == 32 + 64 + 2 + 3 and value.endswith(b"absrc")


def test_mixed_batch_keeps_input_order() -> None:
    images = np.stack([_image(k) for k in range(6)])
    records = [
        encode_sample("j0", images[0], 0, encoding="json", dtype="float32"),
        (b"not a sample", "text/plain"),
        *encode_batch(["b2", "b3"], images[2:4], [2, 3], dtype="float32"),
        (None, CONTENT_TYPE_BINARY),
        encode_sample("j5", images[5], 4, encoding="json", dtype="float32"),
    ]
    batch = _decode(records)
    _assert_accounted(batch, len(records))
    assert batch.index.tolist() == [0, 2, 3, 5]
    assert batch.ids == ["j0", "b2", "b3", "j5"]
    assert batch.labels.tolist() == [0, 2, 3, 4]
    np.testing.assert_array_equal(batch.images, images[[0, 2, 3, 5]])
    assert [f.index for f in batch.failures] == [1, 4]


def _bad_binary(mutate) -> tuple[bytes, str]:
    value, ct = encode_sample("x", _image(), 1, encoding="binary", dtype="float32")
    header = np.frombuffer(value[:HEADER_SIZE], dtype=HEADER_DTYPE).copy()
    mutate(header)
    return header.tobytes() + value[HEADER_SIZE:], ct


def _field(name: str, v):
    def mutate(h):
        h[name] = v
    return mutate


def _with_nan() -> np.ndarray:
    image = _image()
    image[0, 1, 1] = np.nan
    return image


def _envelope(**overrides) -> bytes:
    env = json.loads(encode_sample("e", _image(), 1)[0])
    env.update(overrides)
    return json.dumps({k: v for k, v in env.items() if v is not None}).encode()


BAD_RECORDS = {
    "malformed": [
        (b"{not json", CONTENT_TYPE_JSON),
        (b"\xff\xfe", None),
        (_envelope(data="!!not base64!!"), CONTENT_TYPE_JSON),
        (None, None),
        (b"DPOI", CONTENT_TYPE_BINARY),
        (_bad_binary(_field("magic", b"XXXX"))),
    ],
    "schema": [
        (_envelope(label=None), CONTENT_TYPE_JSON),
        (_envelope(dtype="float64"), CONTENT_TYPE_JSON),
        (_envelope(label="3"), CONTENT_TYPE_JSON),
        (_envelope(shape=[4, 4]), CONTENT_TYPE_JSON),
        (b"[1, 2, 3]", CONTENT_TYPE_JSON),
        _bad_binary(_field("version", 9)),
        _bad_binary(_field("dtype", 7)),
    ],
    "unsupported_content_type": [(b"{}", "text/csv"), (b"{}", b"\xff")],
    "shape_mismatch": [
        encode_sample("s", np.zeros((1, 4, 5)), 1, encoding="json"),
        encode_sample("s", np.zeros((3, 4, 4)), 1, encoding="binary"),
    ],
    "size_mismatch": [
        (_envelope(data=base64.b64encode(b"\x00" * 15).decode()), CONTENT_TYPE_JSON),
        (encode_sample("t", _image(), 1, encoding="binary")[0][:-1], CONTENT_TYPE_BINARY),
        _bad_binary(_field("payload_len", 16)),
    ],
    "label_out_of_range": [
        encode_sample("l", _image(), CLASSES, encoding="json"),
        encode_sample("l", _image(), -1, encoding="binary"),
    ],
    "non_finite": [
        encode_sample("n", _with_nan(), 1, encoding="json", dtype="float32"),
        encode_sample("n", np.full(SHAPE, np.inf), 1, encoding="binary", dtype="float32"),
    ],
    "value_out_of_range": [
        encode_sample("v", _image() + 1.5, 1, encoding="json", dtype="float32"),
        encode_sample("v", -_image() - 0.1, 1, encoding="binary", dtype="float32"),
    ],
    "too_large": [encode_sample("big", _image(), 1, encoding="binary", dtype="float32")],
}


def test_every_dlq_reason_is_reachable() -> None:
    assert set(BAD_RECORDS) == set(DECODE_REASONS)


@pytest.mark.parametrize("reason", DECODE_REASONS)
def test_each_bad_record_fails_with_its_reason_and_a_message(reason: str) -> None:
    records = BAD_RECORDS[reason]
    max_bytes = 64 if reason == "too_large" else 1 << 20
    batch = _decode(records, max_bytes=max_bytes)
    assert len(batch.index) == 0
    assert [f.reason for f in batch.failures] == [reason] * len(records)
    assert all(len(f.message) > 20 for f in batch.failures)


def test_decode_image_raises_the_failure_reason() -> None:
    value, ct = encode_sample("l", _image(), 9, encoding="binary")
    with pytest.raises(DecodeError) as err:
        decode_image(value, ct, num_classes=CLASSES)
    assert err.value.reason == "label_out_of_range" and "0..4" in err.value.message


def test_content_type_parameters_and_absence_select_the_encoding() -> None:
    value, _ = encode_sample("p", _image(), 1, encoding="json")
    batch = _decode([(value, None), (value, f"{CONTENT_TYPE_JSON}; charset=utf-8"),
                     (value, CONTENT_TYPE_BINARY)])
    assert batch.index.tolist() == [0, 1]
    assert batch.failures[0].reason == "malformed"


def test_envelope_model_rejects_a_bool_label() -> None:
    with pytest.raises(ValueError):
        SampleEnvelope.model_validate_json(_envelope(label=True))


# --- fuzzing ---------------------------------------------------------------------------------

content_types = st.sampled_from([None, CONTENT_TYPE_JSON, CONTENT_TYPE_BINARY])


@st.composite
def valid_records(draw):
    encoding = draw(st.sampled_from(["json", "binary"]))
    dtype = draw(st.sampled_from(["uint8", "float32"]))
    pixels = np.frombuffer(draw(st.binary(min_size=16, max_size=16)), dtype=np.uint8).reshape(SHAPE)
    image = pixels if dtype == "uint8" else pixels.astype(np.float32) / np.float32(255)
    sample_id = draw(st.text(min_size=1, max_size=12))
    label = draw(st.integers(0, CLASSES - 1))
    value, ct = encode_sample(sample_id, image, label, encoding=encoding, dtype=dtype,
                              source=draw(st.none() | st.text(min_size=1, max_size=8)))
    return value, ct, (sample_id, label, pixels.astype(np.float32) / np.float32(255))


@st.composite
def records(draw):
    """(value, content type, expected (id, label, image) or None when the record is bad)."""
    kind = draw(st.sampled_from(["valid", "random", "truncated", "header_noise"]))
    if kind == "random":
        return draw(st.binary(max_size=200)), draw(content_types), None
    value, ct, expected = draw(valid_records())
    if kind == "truncated":
        return value[:draw(st.integers(0, len(value) - 1))], ct, None
    if kind == "header_noise" and ct == CONTENT_TYPE_BINARY:
        at = draw(st.integers(4, HEADER_SIZE - 1))
        noise = draw(st.binary(min_size=1, max_size=HEADER_SIZE - at))
        return value[:at] + noise + value[at + len(noise):], ct, "unknown"
    return value, ct, expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), max_size=12))
def test_fuzzed_batches_never_raise_and_account_for_every_record(batch_records) -> None:
    batch = _decode([(v, c) for v, c, _ in batch_records])
    _assert_accounted(batch, len(batch_records))
    decoded = {int(i): k for k, i in enumerate(batch.index.tolist())}
    for pos, (_, _, expected) in enumerate(batch_records):
        if expected is None:
            assert pos not in decoded, "a random or truncated record decoded"
        elif expected != "unknown":
            k = decoded[pos]
            assert (batch.ids[k], int(batch.labels[k])) == expected[:2]
            np.testing.assert_array_equal(batch.images[k], expected[2])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "label", "shape", "dtype", "data", "source", "ts"]),
                       json_values, max_size=7))
def test_fuzzed_json_envelopes_fail_cleanly(fields) -> None:
    value = json.dumps(fields).encode()
    batch = _decode([(value, CONTENT_TYPE_JSON)])
    _assert_accounted(batch, 1)
