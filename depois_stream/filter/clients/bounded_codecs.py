"""Bounded decompression for kafka-python's record parsers: a compression bomb costs one batch.

kafka-python decompresses a whole record batch in memory, however large, and has no option to
bound it: a zstd batch of a few tens of kB on the wire (1,000 records of 1 MiB of zeros) took
the filter to 2.1 GiB, past the shipped 1 GiB memory limit (fuzz drill, stop 47). Its parsers
call module-level decoder names; ``bound_decompression`` points them at the decoders below,
which stop at ``MAX_BATCH_BYTES`` and raise, so the batch is unreadable (its offsets
dead-lettered as malformed, in one poll) as a batch that does not decompress is.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from typing import Any

# The most bytes one record batch may decompress to when kafka-python reads it (the filter and
# replay). A legitimate batch is far smaller: producers batch 16 kB (Java) to 1 MB (librdkafka)
# before compressing, and a record above the decoder's 16 MiB is a dead letter anyway.
# librdkafka's own bound is receive.message.max.bytes (zstd only).
MAX_BATCH_BYTES = 64 << 20
_CHUNK = 1 << 20

class BatchTooLarge(ValueError):
    """A record batch decompresses past MAX_BATCH_BYTES (a compression bomb, most likely)."""

    def __init__(self, codec: str) -> None:
        super().__init__(f"the {codec} record batch decompresses past {MAX_BATCH_BYTES} bytes, "
                         "the bound kafka-python readers keep (a compression bomb?)")


def _check_size(n: int, codec: str) -> None:
    if n > MAX_BATCH_BYTES:
        raise BatchTooLarge(codec)


def _capped(out: bytes | bytearray, codec: str) -> bytes | bytearray:
    _check_size(len(out), codec)
    return out


def _gzip_decode(payload: bytes | memoryview) -> bytes:
    with gzip.GzipFile(fileobj=io.BytesIO(payload), mode="rb") as f:  # every member, as kafka-python
        return _capped(f.read(MAX_BATCH_BYTES + 1), "gzip")


def _zstd_decode(payload: bytes) -> bytearray:
    import zstandard

    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload), read_across_frames=True) as r:
        while chunk := r.read(_CHUNK):
            out += chunk
            _check_size(len(out), "zstd")
    return out


def _lz4_decode(payload: bytes) -> bytes:
    import lz4.frame

    d = lz4.frame.LZ4FrameDecompressor()
    out = _capped(d.decompress(payload, max_length=MAX_BATCH_BYTES + 1), "lz4")
    if not d.eof:
        raise RuntimeError("the lz4 frame of the record batch is truncated")
    return out


def _snappy_length(block: bytes) -> int:
    """The uncompressed length a raw snappy block declares (its varint prefix)."""
    length = shift = 0
    for byte in block[:5]:
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length
        shift += 7
    raise ValueError("the snappy block has no valid length prefix")


def _snappy_decode(payload: bytes) -> bytes:
    """kafka-python's snappy decoding (xerial framing, or one raw block), each block's declared
    length checked against the bound before it is decompressed."""
    import snappy
    from kafka.codec import _detect_xerial_stream

    if not _detect_xerial_stream(payload):
        _check_size(_snappy_length(payload), "snappy")
        return snappy.decompress(payload)
    out, view, cursor, total = io.BytesIO(), payload[16:], 0, 0
    while cursor < len(view):
        size = int.from_bytes(view[cursor:cursor + 4], "big", signed=True)
        if size <= 0:  # kafka-python's own loop went backwards (for ever) on a negative size
            raise ValueError(f"xerial snappy block of {size} bytes")
        block = view[cursor + 4:cursor + 4 + size]
        total += _snappy_length(block)
        _check_size(total, "snappy")
        out.write(snappy.decompress(block))
        cursor += 4 + size
    return out.getvalue()


BOUNDED_DECODERS: dict[str, Callable[[Any], bytes | bytearray]] = {
    "gzip": _gzip_decode, "snappy": _snappy_decode, "lz4": _lz4_decode, "zstd": _zstd_decode,
}


def bound_decompression() -> None:
    """Make kafka-python's record parsers decompress through the bounded decoders above.

    kafka-python has no option for it, and its parsers call module-level names: they are
    replaced there (idempotent; the codec libraries are this package's dependencies). Called
    before any kafka-python consumer of ours reads."""
    from kafka.record import default_records, legacy_records

    for module in (default_records, legacy_records):
        for codec, decode in BOUNDED_DECODERS.items():
            if hasattr(module, f"{codec}_decode"):
                setattr(module, f"{codec}_decode", decode)
