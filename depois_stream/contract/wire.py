"""The ingest wire format: one (image, label) sample per Kafka record, JSON or compact binary.

The decoder is the single place where untrusted bytes become arrays, so it never raises on bad
input: every record either decodes or yields exactly one ``DecodeFailure`` whose ``reason`` is a
bounded code (a metrics label and the DLQ ``error_class``) and whose ``message`` tells the producer
what to fix. The encoder, in contrast, writes what it is given (a NaN float32 image included) as
long as it is representable, so tests and tools can exercise every rejection path.

Binary records have a fixed 32-byte little-endian header, so a batch of them is validated with a
handful of vectorised numpy comparisons and their payloads become one array with one join; the
layout is documented byte by byte in ``docs/wire-format.md``.
"""

from __future__ import annotations

import base64
import functools
import binascii
import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import from_json

CONTENT_TYPE_JSON = "application/vnd.depois.sample.v1+json"
CONTENT_TYPE_BINARY = "application/vnd.depois.sample.v1+binary"

DECODE_REASONS = (
    "malformed", "schema", "unsupported_content_type", "shape_mismatch", "size_mismatch",
    "label_out_of_range", "non_finite", "value_out_of_range", "too_large",
)
# Every dead-letter error class: the decoder's, plus the broker refusing to take a forwarded
# record (a record too large for the output topic's limits, for example).
DLQ_REASONS = DECODE_REASONS + ("rejected_by_broker",)

DEFAULT_MAX_BYTES = 16 << 20

Dtype = Literal["uint8", "float32"]
Encoding = Literal["json", "binary"]

BINARY_MAGIC = b"DPOI"
BINARY_VERSION = 1
HEADER_DTYPE = np.dtype([
    ("magic", "S4"),
    ("version", "u1"),
    ("dtype", "u1"),
    ("id_len", "<u2"),
    ("source_len", "<u2"),
    ("channels", "<u2"),
    ("height", "<u2"),
    ("width", "<u2"),
    ("label", "<i4"),
    ("payload_len", "<u4"),
    ("ts", "<f8"),
])
HEADER_SIZE = HEADER_DTYPE.itemsize  # 32: keeps the payload 8-byte aligned for np.frombuffer
DTYPE_CODES: dict[str, int] = {"uint8": 1, "float32": 2}
_NUMPY_DTYPES: dict[str, np.dtype] = {"uint8": np.dtype("u1"), "float32": np.dtype("<f4")}
_U16_MAX = 0xFFFF
_I32 = np.iinfo(np.int32)


class SampleEnvelope(BaseModel):
    """The JSON form of a sample; ``data`` is base64 of the raw C-order little-endian pixels."""

    model_config = ConfigDict(strict=True, frozen=True)

    id: str = Field(min_length=1)
    label: int
    shape: list[int] = Field(min_length=3, max_length=3)
    dtype: Dtype
    data: str
    source: str | None = None
    ts: float | None = None


class DecodeError(ValueError):
    """One record that cannot become a sample; ``reason`` is one of ``DECODE_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class DecodeFailure:
    index: int
    reason: str
    message: str


@dataclass
class DecodedBatch:
    images: np.ndarray  # float32 [M, C, H, W] in [0, 1]
    labels: np.ndarray  # int64 [M]
    index: np.ndarray  # int64 [M]: position of each decoded record in the input list
    failures: list[DecodeFailure] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Encoding


def _check_dims(shape: tuple[int, ...]) -> None:
    if any(d > _U16_MAX or d < 1 for d in shape):
        raise ValueError(f"each image dimension must be in 1..{_U16_MAX}, got {list(shape)}")


def _to_wire(images: np.ndarray, dtype: Dtype) -> np.ndarray:
    """The C-order pixel array to put on the wire, in the wire dtype.

    Float images are quantised to uint8 only when they are finite and in [0, 1]: quantising
    anything else would silently change the sample instead of letting the consumer reject it.
    """
    if dtype == "float32":
        out = images.astype("<f4") / np.float32(255) if images.dtype == np.uint8 else images.astype("<f4")
    elif images.dtype == np.uint8:
        out = images
    else:
        if images.size and (not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1):
            raise ValueError("a float image sent as uint8 must be finite and in [0, 1]; "
                             "send it as float32 to transmit it unchanged")
        scaled = np.multiply(images, np.float32(255), dtype=np.float32)
        out = np.rint(scaled, out=scaled).astype(np.uint8)
    return np.ascontiguousarray(out)


def _binary_header(n: int, shape: tuple[int, ...], dtype: Dtype, labels: np.ndarray,
                   id_lens: np.ndarray, source_len: int, ts: float | None) -> np.ndarray:
    header = np.zeros(n, dtype=HEADER_DTYPE)
    header["magic"] = BINARY_MAGIC
    header["version"] = BINARY_VERSION
    header["dtype"] = DTYPE_CODES[dtype]
    header["id_len"] = id_lens
    header["source_len"] = source_len
    header["channels"], header["height"], header["width"] = shape
    header["label"] = labels
    header["payload_len"] = int(np.prod(shape)) * _NUMPY_DTYPES[dtype].itemsize
    header["ts"] = math.nan if ts is None else ts
    return header


def _check_text(name: str, encoded: bytes) -> None:
    if not encoded or len(encoded) > _U16_MAX:
        raise ValueError(f"{name} must be 1..{_U16_MAX} UTF-8 bytes, got {len(encoded)}")


def _check_labels(labels: np.ndarray) -> None:
    if labels.size and (labels.min() < _I32.min or labels.max() > _I32.max):
        raise ValueError("labels must fit in a signed 32-bit integer")


def encode_sample(sample_id: str, image: np.ndarray, label: int, *, encoding: Encoding = "json",
                  dtype: Dtype = "uint8", source: str | None = None,
                  ts: float | None = None) -> tuple[bytes, str]:
    """One record value and the content type to send in its ``content-type`` header."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [C, H, W], got shape {image.shape}")
    _check_dims(image.shape)
    pixels = _to_wire(image, dtype)
    if encoding == "json":
        envelope = SampleEnvelope(
            id=sample_id, label=int(label), shape=list(pixels.shape), dtype=dtype,
            data=base64.b64encode(pixels.tobytes()).decode("ascii"), source=source, ts=ts,
        )
        return envelope.model_dump_json(exclude_none=True).encode("utf-8"), CONTENT_TYPE_JSON
    return encode_batch([sample_id], pixels[None], np.array([label]), encoding="binary",
                        dtype=dtype, source=source, ts=ts)[0]


def encode_batch(ids: Sequence[str], images: np.ndarray, labels: Sequence[int] | np.ndarray, *,
                 encoding: Encoding = "binary", dtype: Dtype = "uint8", source: str | None = None,
                 ts: float | None = None) -> list[tuple[bytes, str]]:
    """Encode many same-shape samples; the binary path builds every header in one numpy array."""
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or not len(ids) == len(images) == len(labels):
        raise ValueError(f"need [N, C, H, W] images with one id and one label each; got images "
                         f"{images.shape}, {len(ids)} ids, {len(labels)} labels")
    _check_dims(images.shape[1:])
    pixels = _to_wire(images, dtype)
    if encoding == "json":
        return [encode_sample(i, img, int(lab), encoding="json", dtype=dtype, source=source, ts=ts)
                for i, img, lab in zip(ids, pixels, labels)]
    _check_labels(labels)
    id_bytes = [i.encode("utf-8") for i in ids]
    for b in id_bytes:
        _check_text("sample id", b)
    src = source.encode("utf-8") if source is not None else b""
    if source is not None:
        _check_text("source", src)
    header = _binary_header(len(ids), images.shape[1:], dtype, labels,
                            np.array([len(b) for b in id_bytes]), len(src), ts)
    heads, payloads = memoryview(header.tobytes()), memoryview(pixels.tobytes())
    step = pixels[0].nbytes if len(pixels) else 0
    return [(b"".join((heads[k * HEADER_SIZE:(k + 1) * HEADER_SIZE], payloads[k * step:(k + 1) * step],
                       id_bytes[k], src)), CONTENT_TYPE_BINARY) for k in range(len(ids))]


# ---------------------------------------------------------------------------------------------
# Decoding


@functools.lru_cache(maxsize=64)
def _normalise_content_type(ct: str | bytes | None) -> str | None:
    """Header value -> media type without parameters; absent or empty means the JSON default."""
    if ct is None:
        return CONTENT_TYPE_JSON
    if isinstance(ct, bytes):
        try:
            ct = ct.decode("utf-8")
        except UnicodeDecodeError:
            return None
    media = ct.split(";", 1)[0].strip().lower()
    return media or CONTENT_TYPE_JSON


def _pixels_to_float(raw: np.ndarray) -> np.ndarray:
    """Wire pixels -> float32 in the model's [0, 1] scale (uint8 is divided by 255)."""
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / np.float32(255)
    return raw.astype(np.float32, copy=False)


def _value_failures(images: np.ndarray) -> list[tuple[str, str] | None]:
    """Per image: None, or the (reason, message) of the first pixel-value problem."""
    flat = images.reshape(len(images), -1)
    finite = np.isfinite(flat).all(axis=1)
    with np.errstate(invalid="ignore"):
        in_range = ((flat >= 0) & (flat <= 1)).all(axis=1)
    out: list[tuple[str, str] | None] = [None] * len(images)
    for k in np.flatnonzero(~finite).tolist():
        out[k] = ("non_finite", "float32 pixels contain NaN or infinity; send finite values in [0, 1]")
    for k in np.flatnonzero(finite & ~in_range).tolist():
        out[k] = ("value_out_of_range", "float32 pixels must already be scaled to [0, 1] (send "
                                        "uint8 0..255 to have them divided by 255)")
    return out


def _clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: messages quote what a producer sent, which may be
    huge (a 4,000-digit number, a 300 kB header)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shape_message(got: tuple[int, ...], want: tuple[int, int, int]) -> str:
    return f"image shape {_clip(str(list(got)))} does not match the model input shape {list(want)}; resize it"


def _label_message(label: int, num_classes: int | None) -> str:
    top = f"0..{num_classes - 1}" if num_classes is not None else "a non-negative integer"
    return f"label {_clip(str(label))} is out of range; the model expects {top}"


def _label_ok(label: int, num_classes: int | None) -> bool:
    """Labels are class indices; without a model, any that fit the binary format's int32."""
    return 0 <= label <= _I32.max and (num_classes is None or label < num_classes)


def _decode_json(value: bytes, input_shape: tuple[int, int, int],
                 num_classes: int | None) -> tuple[str, int, np.ndarray]:
    """One JSON record -> (id, label, wire pixels [C, H, W]); raises DecodeError."""
    try:
        env = SampleEnvelope.model_validate_json(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise DecodeError("malformed", f"record is not valid UTF-8 JSON ({errors[0]['msg']}); "
                                           f"send a {CONTENT_TYPE_JSON} envelope or set the "
                                           "content-type header to the encoding you used") from None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}"
                             for e in errors[:3])
        raise DecodeError("schema", f"envelope fields are invalid ({problems}); required: id, "
                                    "label, shape [C, H, W], dtype uint8|float32, data") from None
    try:
        raw = base64.b64decode(env.data, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("malformed", "field 'data' is not valid base64; encode the raw C-order "
                                       "pixel bytes with standard base64") from None
    shape = tuple(env.shape)
    if shape != input_shape:
        raise DecodeError("shape_mismatch", _shape_message(shape, input_shape))
    dt = _NUMPY_DTYPES[env.dtype]
    expected = math.prod(shape) * dt.itemsize
    if len(raw) != expected:
        raise DecodeError("size_mismatch", f"'data' holds {len(raw)} bytes but shape {list(shape)} "
                                           f"of {env.dtype} needs {expected}")
    if not _label_ok(env.label, num_classes):
        raise DecodeError("label_out_of_range", _label_message(env.label, num_classes))
    return env.id, env.label, np.frombuffer(raw, dtype=dt).reshape(shape)


@dataclass
class _Partial:
    """Decoded records of one encoding, before the batch is put back in input order."""

    index: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # float32 [k, C, H, W] blocks


def _binary_header_failure(h: np.void, size: int, input_shape: tuple[int, int, int],
                           num_classes: int | None) -> DecodeError | None:
    """The first header-level problem of one binary record (None if the header is sound)."""
    if h["magic"] != BINARY_MAGIC:
        return DecodeError("malformed", f"binary record does not start with {BINARY_MAGIC!r}; "
                                        "use encode_sample(..., encoding='binary')")
    if h["version"] != BINARY_VERSION:
        return DecodeError("schema", f"binary format version {int(h['version'])} is not supported "
                                     f"(this runtime reads version {BINARY_VERSION})")
    names = {v: k for k, v in DTYPE_CODES.items()}
    if int(h["dtype"]) not in names:
        return DecodeError("schema", f"unknown dtype code {int(h['dtype'])}; use 1 (uint8) or "
                                     "2 (float32)")
    shape = (int(h["channels"]), int(h["height"]), int(h["width"]))
    if shape != input_shape:
        return DecodeError("shape_mismatch", _shape_message(shape, input_shape))
    dtype = names[int(h["dtype"])]
    expected = math.prod(shape) * _NUMPY_DTYPES[dtype].itemsize
    total = HEADER_SIZE + int(h["payload_len"]) + int(h["id_len"]) + int(h["source_len"])
    if int(h["payload_len"]) != expected or size != total:
        return DecodeError("size_mismatch", f"record is {size} bytes and declares a "
                                            f"{int(h['payload_len'])}-byte payload; shape "
                                            f"{list(shape)} of {dtype} needs a {expected}-byte "
                                            f"payload and {HEADER_SIZE + expected + int(h['id_len'])}"
                                            f"+{int(h['source_len'])} bytes in all (truncated?)")
    if int(h["id_len"]) == 0:
        return DecodeError("schema", "binary record has an empty sample id; set a non-empty id")
    if not _label_ok(int(h["label"]), num_classes):
        return DecodeError("label_out_of_range", _label_message(int(h["label"]), num_classes))
    return None


def _decode_binary_group(values: list[bytes], positions: list[int],
                         input_shape: tuple[int, int, int], num_classes: int | None,
                         out: _Partial, failures: list[DecodeFailure]) -> None:
    """Validate every header at once; only failing records pay for per-record Python."""
    short = [len(v) < HEADER_SIZE for v in values]
    for pos, v, is_short in zip(positions, values, short):
        if is_short:
            failures.append(DecodeFailure(pos, "malformed", f"binary record is {len(v)} bytes, "
                                          f"shorter than its {HEADER_SIZE}-byte header"))
    keep = [k for k, s in enumerate(short) if not s]
    if not keep:
        return
    values = [values[k] for k in keep]
    positions = [positions[k] for k in keep]
    headers = np.frombuffer(b"".join(v[:HEADER_SIZE] for v in values), dtype=HEADER_DTYPE)
    sizes = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    c, h, w = input_shape
    label_ok = headers["label"] >= 0
    if num_classes is not None:
        label_ok &= headers["label"] < num_classes
    per_dtype = {code: math.prod(input_shape) * _NUMPY_DTYPES[name].itemsize
                 for name, code in DTYPE_CODES.items()}
    payload_ok = np.zeros(len(values), dtype=bool)
    for code, nbytes in per_dtype.items():
        payload_ok |= (headers["dtype"] == code) & (headers["payload_len"] == nbytes)
    sound = (
        (headers["magic"] == BINARY_MAGIC) & (headers["version"] == BINARY_VERSION) & payload_ok
        & (headers["channels"] == c) & (headers["height"] == h) & (headers["width"] == w)
        & (headers["id_len"] > 0) & label_ok
        & (sizes == HEADER_SIZE + headers["payload_len"].astype(np.int64)
           + headers["id_len"].astype(np.int64) + headers["source_len"].astype(np.int64))
    )
    for k in np.flatnonzero(~sound).tolist():
        err = _binary_header_failure(headers[k], int(sizes[k]), input_shape, num_classes)
        assert err is not None, "vectorised and per-record header checks disagree"
        failures.append(DecodeFailure(positions[k], err.reason, err.message))
    for name, code in DTYPE_CODES.items():
        sel = np.flatnonzero(sound & (headers["dtype"] == code)).tolist()
        if not sel:
            continue
        nbytes = per_dtype[code]
        raw = np.frombuffer(b"".join(values[k][HEADER_SIZE:HEADER_SIZE + nbytes] for k in sel),
                            dtype=_NUMPY_DTYPES[name]).reshape(len(sel), *input_shape)
        images = _pixels_to_float(raw)
        problems = _value_failures(images) if name == "float32" else [None] * len(sel)
        start = HEADER_SIZE + nbytes
        id_lens, labels = headers["id_len"].tolist(), headers["label"].tolist()
        good: list[int] = []
        for j, (k, problem) in enumerate(zip(sel, problems)):
            try:
                sample_id = values[k][start:start + id_lens[k]].decode("utf-8")
            except UnicodeDecodeError:
                problem = ("malformed", "sample id is not valid UTF-8")
            if problem is not None:
                failures.append(DecodeFailure(positions[k], *problem))
                continue
            good.append(j)
            out.index.append(positions[k])
            out.labels.append(labels[k])
            out.ids.append(sample_id)
        out.images.append(images[good])


def _decode_json_group(values: list[bytes], positions: list[int],
                       input_shape: tuple[int, int, int], num_classes: int | None,
                       out: _Partial, failures: list[DecodeFailure]) -> None:
    decoded: list[np.ndarray] = []
    for pos, value in zip(positions, values):
        try:
            sample_id, label, raw = _decode_json(value, input_shape, num_classes)
        except DecodeError as err:
            failures.append(DecodeFailure(pos, err.reason, err.message))
            continue
        image = _pixels_to_float(raw)
        problem = _value_failures(image[None])[0] if raw.dtype != np.uint8 else None
        if problem is not None:
            failures.append(DecodeFailure(pos, *problem))
            continue
        out.index.append(pos)
        out.labels.append(label)
        out.ids.append(sample_id)
        decoded.append(image)
    if decoded:
        out.images.append(np.stack(decoded))


def decode_batch(values: Sequence[bytes | None], content_types: Sequence[str | bytes | None], *,
                 input_shape: tuple[int, int, int], num_classes: int | None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> DecodedBatch:
    """Decode a poll's worth of record values; never raises on bad input.

    Records of any mix of content types are accepted; decoded samples come back in input order
    and ``index`` maps each one to its position in ``values``. ``num_classes=None`` only
    requires labels to be non-negative.
    """
    if len(values) != len(content_types):
        raise ValueError(f"{len(values)} values but {len(content_types)} content types")
    input_shape = tuple(int(d) for d in input_shape)  # type: ignore[assignment]
    failures: list[DecodeFailure] = []
    groups: dict[str, tuple[list[bytes], list[int]]] = {
        CONTENT_TYPE_JSON: ([], []), CONTENT_TYPE_BINARY: ([], []),
    }
    for pos, (value, ct) in enumerate(zip(values, content_types)):
        if value is None:
            failures.append(DecodeFailure(pos, "malformed", "record has no value (a tombstone); "
                                                            "send an encoded sample"))
        elif len(value) > max_bytes:
            failures.append(DecodeFailure(pos, "too_large", f"record is {len(value)} bytes, above "
                                                            f"the {max_bytes}-byte limit"))
        elif (media := _normalise_content_type(ct)) in groups:
            groups[media][0].append(value)
            groups[media][1].append(pos)
        else:
            failures.append(DecodeFailure(pos, "unsupported_content_type", (
                f"content-type {_clip(repr(ct))} is not supported; use {CONTENT_TYPE_JSON} (the default when "
                f"the header is absent) or {CONTENT_TYPE_BINARY}")))
    out = _Partial()
    _decode_json_group(*groups[CONTENT_TYPE_JSON], input_shape, num_classes, out, failures)
    _decode_binary_group(*groups[CONTENT_TYPE_BINARY], input_shape, num_classes, out, failures)
    order = np.argsort(np.asarray(out.index, dtype=np.int64), kind="stable")
    images = (np.concatenate(out.images) if out.images
              else np.empty((0, *input_shape), dtype=np.float32))
    failures.sort(key=lambda f: f.index)
    return DecodedBatch(
        images=images[order],
        labels=np.asarray(out.labels, dtype=np.int64)[order],
        index=np.asarray(out.index, dtype=np.int64)[order],
        failures=failures,
        ids=[out.ids[k] for k in order.tolist()],
    )


def _declared_shape(value: bytes, media: str | None) -> tuple[int, int, int] | None:
    """The shape a record says it has, so a lone record can be decoded without a model."""
    if media == CONTENT_TYPE_BINARY and len(value) >= HEADER_SIZE:
        h = np.frombuffer(value[:HEADER_SIZE], dtype=HEADER_DTYPE)[0]
        dims = int(h["channels"]), int(h["height"]), int(h["width"])
        return dims if all(d >= 1 for d in dims) else None
    if media == CONTENT_TYPE_JSON:
        try:
            shape = from_json(value).get("shape")
        except (ValueError, AttributeError):
            return None
        if (isinstance(shape, list) and len(shape) == 3
                and all(type(d) is int and 1 <= d <= _U16_MAX for d in shape)):
            return shape[0], shape[1], shape[2]
    return None


def decode_image(value: bytes, content_type: str | bytes | None, *,
                 input_shape: tuple[int, int, int] | None = None, num_classes: int | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[str, int, np.ndarray]:
    """One record -> (id, label, float32 [C, H, W]); raises DecodeError with a DLQ reason,
    and nothing else, whatever the bytes.

    Without ``input_shape`` the record's own declared shape is accepted (for replay tools that
    read records without a model at hand) when each dimension is 1..65535, as in the binary
    format; any other declared shape is a ``shape_mismatch``.
    """
    shape = input_shape or _declared_shape(value, _normalise_content_type(content_type))
    batch = decode_batch([value], [content_type], input_shape=shape or (1, 1, 1),
                         num_classes=num_classes, max_bytes=max_bytes)
    if batch.failures:
        f = batch.failures[0]
        if f.reason == "shape_mismatch" and input_shape is None:  # no model: no shape to name
            raise DecodeError(f.reason, "the record declares no usable image shape (three "
                                        "dimensions of 1 to 65535 each)")
        raise DecodeError(f.reason, f.message)
    return batch.ids[0], int(batch.labels[0]), batch.images[0]
