"""kafka-python's record parser, made safe for bytes a hostile producer wrote: bounded
decompression, and recovery from a record it cannot parse. Used by the filter's kafka-python
consumer and by replay's reader.

* kafka-python decompresses a whole record batch in memory, however large, and has no option to
  bound it: a zstd batch of a few tens of kB on the wire (1,000 records of 1 MiB of zeros) took
  the filter to 2.1 GiB, past the shipped 1 GiB memory limit (fuzz drill, stop 47). Its parsers
  call module-level decoder names; ``bound_decompression`` points them at the decoders below,
  which stop at ``MAX_BATCH_BYTES`` and raise, so the batch is unreadable (its offsets
  dead-lettered as malformed) as a batch that does not decompress is.
* That bound is per batch, and many batches of one large record each (25 zstd batches of 20 MiB
  of zeros are 18 kB on the wire) added up within one poll of --batch-size records: a poll now
  stops taking records once it holds ``base.MAX_HELD_BYTES`` (``bound_polls``).
* A record it cannot parse (a header name that is not UTF-8, a bad CRC, a batch that does not
  decompress) makes it raise once and then spin on the stuck fetch: ``skip_unreadable`` moves
  the consumer past it, and past the rest of its batch, which kafka-python cannot reach.
"""

from __future__ import annotations

import gzip
import io
import itertools
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import CorruptRecordError

from depois_stream.filter.clients import base

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


def _gzip_decode(payload: bytes | memoryview) -> bytearray:
    out = bytearray()
    with gzip.GzipFile(fileobj=io.BytesIO(payload), mode="rb") as f:  # every member, as kafka-python
        while chunk := f.read(_CHUNK):
            out += chunk
            _check_size(len(out), "gzip")
    return out


def _zstd_decode(payload: bytes) -> bytearray:
    import zstandard

    out = bytearray()
    d = zstandard.ZstdDecompressor()  # refuses frames asking for a window above 128 MiB
    with d.stream_reader(io.BytesIO(payload), read_across_frames=True) as r:
        while chunk := r.read(_CHUNK):
            out += chunk
            _check_size(len(out), "zstd")
    return out


def _lz4_decode(payload: bytes) -> bytearray:
    """Every frame of ``payload`` (kafka-python's ``lz4.frame.decompress`` reads concatenated
    frames too), in chunks: a ``max_length`` of the whole bound allocated it for every batch."""
    import lz4.frame

    out, rest = bytearray(), payload
    while rest:
        d = lz4.frame.LZ4FrameDecompressor()
        out += d.decompress(rest, max_length=_CHUNK)
        while not d.eof:
            _check_size(len(out), "lz4")
            if d.needs_input:
                raise RuntimeError("the lz4 frame of the record batch is truncated")
            out += d.decompress(b"", max_length=_CHUNK)
        _check_size(len(out), "lz4")
        rest = d.unused_data
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
    replaced there (idempotent; the codec libraries are this package's dependencies), and in
    ``kafka.codec``, whose v0 lz4 decoder calls its own. Called before any kafka-python consumer
    of ours reads; a kafka-python whose v2 parser no longer has those names is refused (the
    bound would silently be gone)."""
    from kafka import codec
    from kafka.record import default_records, legacy_records

    missing = [name for name in BOUNDED_DECODERS if not hasattr(default_records, f"{name}_decode")]
    if missing:
        raise RuntimeError(f"this kafka-python's record parser has no {', '.join(missing)} decoder "
                           "to bound; install kafka-python 3.0 (pyproject.toml)")
    for module in (default_records, legacy_records, codec):
        for name, decode in BOUNDED_DECODERS.items():
            if hasattr(module, f"{name}_decode"):
                setattr(module, f"{name}_decode", decode)
    bound_polls()


class _PollFull(Exception):
    """Raised by a bounded ``take`` to end a poll that holds MAX_HELD_BYTES (never escapes)."""


_poll = threading.local()  # per thread: the bytes the poll being made holds so far (``held``)


def bound_polls() -> None:
    """Make one kafka-python poll stop taking records once they hold ``base.MAX_HELD_BYTES``.

    kafka-python decompresses record batches lazily, as its per-partition record iterator is
    taken from, and a poll takes up to ``max_records`` records whatever their size. The
    patched ``PartitionRecords.take`` counts the bytes the poll has taken and stops pulling
    from the iterator at the bound, so the records past it stay undecompressed in the fetch,
    next in line for the next poll. ``Fetcher.fetched_records`` loops until ``max_records`` or
    an exception: a full poll's next ``take`` raises ``_PollFull``, which the patched
    ``fetched_records`` drops once the records drained so far are returned (kafka-python
    would otherwise raise it at the next poll). Idempotent; called with
    ``bound_decompression``."""
    from kafka.consumer.fetcher import Fetcher

    records_class = Fetcher.PartitionRecords
    if getattr(records_class.take, "_depois_bounded", False):
        return
    take, fetched_records = records_class.take, Fetcher.fetched_records

    def bounded_take(self: Any, n: int | None = None) -> list[Any]:
        held = getattr(_poll, "held", None)
        if held is None:  # not inside fetched_records (kafka-python's own use): as it was
            return take(self, n)
        self._maybe_raise_next_inline_exception()
        if held >= base.MAX_HELD_BYTES:  # only after a record: the bound is positive
            raise _PollFull
        records: list[Any] = []
        try:
            for record in itertools.islice(self.record_iterator, 0, n):
                records.append(record)
                held += (max(record.serialized_key_size, 0) + max(record.serialized_value_size, 0)
                         + max(record.serialized_header_size, 0))
                if held >= base.MAX_HELD_BYTES:
                    break
        except Exception as e:  # as kafka-python's take: raised at its next call
            if not records:
                raise
            self._next_inline_exception = e
        _poll.held = held
        return records

    def bounded_fetched_records(self: Any, max_records: int | None = None,
                                update_offsets: bool = True) -> tuple[dict[Any, list[Any]], bool]:
        _poll.held = 0
        try:
            drained, partial = fetched_records(self, max_records, update_offsets)
        finally:
            _poll.held = None
        if isinstance(getattr(self._next_in_line_exception_metadata, "exception", None), _PollFull):
            # the in-hand records go on at the next poll; the traceback is dropped, or its
            # frames (this one's caller included) and the poll's records live in a reference
            # cycle until the next full garbage collection (measured: 80 MiB per poll kept)
            self._next_in_line_exception_metadata.exception.__traceback__ = None
            self._next_in_line_exception_metadata = None
        return drained, partial

    bounded_take._depois_bounded = True  # type: ignore[attr-defined]
    records_class.take = bounded_take
    Fetcher.fetched_records = bounded_fetched_records


def raised_by_parser(exc: BaseException | None) -> bool:
    """Whether kafka-python's record parser raised ``exc``: a record it cannot read (a bad
    CRC, a header name that is not UTF-8) or a batch it cannot decompress (garbage gzip data, a
    codec id no client knows; brokers that do not validate batches store them).

    Such an error leaves the parser spent in kafka-python's in-hand slot, and the next poll
    loops on it forever without returning, so it must be recovered from at once. Told apart
    from network and group errors by the parser's frame in the traceback: the exception types
    alone overlap (a codec error is a KafkaError, a gzip error is not)."""
    return isinstance(exc, CorruptRecordError) or _parser_frame(exc) is not None


def _parser_frame(exc: BaseException | None) -> FrameType | None:
    """kafka-python's record-parsing frame (``PartitionRecords._unpack_records``) in the
    traceback of ``exc``, if it was raised there."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_unpack_records":
            return tb.tb_frame
        tb = tb.tb_next
    return None


def _stuck_at(stopped: int, position: int, exc: BaseException) -> tuple[int, str]:
    """The offset kafka-python cannot hand over, and why, from where its parser stopped (the
    offset after the last record it parsed) and the partition's fetch position.

    The larger of the two: below the position, the parser re-read a record batch from its start
    and failed before reaching the position (so the position is the first record it cannot
    reach); above it, it skipped transaction markers or aborted batches first."""
    offset = max(stopped, position)
    if offset == stopped:
        return offset, f"kafka-python cannot read this record ({type(exc).__name__}: {exc})"
    return offset, (f"kafka-python cannot read past offset {stopped} of the same record batch "
                    f"({type(exc).__name__}: {exc})")


# The most offsets of one unreadable record batch handed over at once: a batch header is the
# producer's to write (brokers that do not validate batches keep it), so its last offset is not
# trusted further than this per poll.
MAX_SKIP = 1000


def _batch_end(exc: BaseException) -> int | None:
    """The offset after the record batch the parser failed in, or None when unknown.

    Read from the parser's frame in the traceback. Only a v2 batch whose CRC holds is believed
    (the CRC covers the last offset delta: after a CRC failure it is garbage, and a delta of 500
    over 3 records dead-lettered the readable batch after it), and never past its base offset
    plus its record count (a delta larger than the records it carries is the producer's
    word; a compacted batch's remaining gaps then go one per poll)."""
    frame = _parser_frame(exc)
    if frame is None:
        return None
    batch, part = frame.f_locals.get("batch"), frame.f_locals.get("self")
    if getattr(batch, "magic", None) != 2:
        return None
    if getattr(batch, "_decompressed", True):  # iterated: its CRC was checked first, if at all
        believed = bool(getattr(part, "check_crcs", False))
    else:  # failed at (or before) its CRC check
        believed = batch.validate_crc()
    if not believed:
        return None
    return min(int(batch.next_offset), int(batch.base_offset) + int(batch.records_count))


def skip_unreadable(consumer: KafkaConsumer, exc: BaseException) -> tuple[TopicPartition, list[int], str]:
    """Move ``consumer`` past the record batch its parser could not read (``exc``, for which
    ``raised_by_parser`` holds): the partition, the offsets skipped and why.

    kafka-python's fetcher knows where it stopped (the partition, and the offset after the last
    record it parsed), and the failed batch's header where its last record is: kafka-python
    parses a batch from its start, so no record after the bad one in the same batch can be
    read, and all of them are skipped at once (at most MAX_SKIP per call; one per poll made a
    1,000-record compression bomb cost minutes). The seek past them makes the fetcher drop the
    stuck fetch and fetch again, and the spent parser is drained so that a pause cannot park
    it (``_drop_parked``). Shared by the filter and replay's readers; anything unexpected here
    raises (kafka-python other than the 3.0 line tested keeps other state)."""
    part = consumer._fetcher._next_partition_records
    tp = part.topic_partition
    offset, why = _stuck_at(int(part.next_fetch_offset),
                            int(consumer._subscription.assignment[tp].position.offset), exc)
    end = min(max(_batch_end(exc) or 0, offset + 1), offset + MAX_SKIP)
    # nor past the log's end as last fetched: a seek there is out of range, and the reset policy
    # (earliest) would read the whole partition again
    high = consumer.highwater(tp)
    if high is not None and high > offset:
        end = min(end, high)
    consumer.seek(tp, end)
    part.drain()
    consumer._fetcher._next_partition_records = None
    return tp, list(range(offset, end)), why
