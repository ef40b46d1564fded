"""The data path of one batch, as pure functions: decode -> score -> route.

No Kafka and no clock here: a ``RecordBatch`` goes in, the records to produce come out, so every
rule (what is dead-lettered and why, which headers a producer may not write, what is too large
to forward, where each output goes) is testable with plain arrays. The filter's loop
(``app.StreamFilter``) calls ``score`` and ``route`` once per batch and hands ``Routed`` to the
delivery side.

Per record, only what cannot be done per batch is done per record: one pass over the ingest
headers (content type, forged ``depois.*`` headers, sizes) and one list of output headers.
Everything else is a numpy operation over the batch or a single onnxruntime run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from depois_stream.contract import headers as H
from depois_stream.contract.wire import DEFAULT_MAX_BYTES, decode_batch
from depois_stream.filter import router
from depois_stream.filter.clients.base import Header, RecordBatch, Unreadable
from depois_stream.filter.detector import Detector, Prediction

# Bytes reserved for the headers the filter adds (verdict, score, model, provenance, ...); they
# are bounded, so a record whose own bytes fit in the limit minus this always fits once routed.
HEADER_ALLOWANCE = 2048
HEADER_OVERHEAD = H.HEADER_OVERHEAD  # per header, besides its name and value
_PREFIX = H.PREFIX
_NO_HEADERS: list[Header] = []
_LINEAGE = H.REPLAY_COUNT  # the one depois.* header a record keeps through the filter



class Refusal(NamedTuple):
    """Why the broker refused a record's output, and how many times it has."""

    why: str
    times: int = 1


# After this many refusals a record is dead-lettered bare: the filter's headers only, no value,
# key or producer headers (its source location still names it). The first refusal drops the
# value; a second means the key or the producer's headers are refused too (a dead-letter topic
# whose max.message.bytes is below the producer's, say).
BARE_AFTER = 2
# (source partition, source offset) -> the broker's refusals of the forwarded record
Rejections = Mapping[tuple[int, int], Refusal]


@dataclass(frozen=True)
class Ingest:
    """One pass over the batch's own headers."""

    content_types: list[bytes | None]
    forwarded: list[list[Header]]  # each record's headers minus ``depois.*`` (but a replay count)
    forged: int  # records that carried a ``depois.*`` header other than a valid replay count
    sizes: np.ndarray  # int64 [n]: key + value + forwarded headers, in bytes
    unreadable: dict[int, str]  # record position -> why the client could not read it


def scan_headers(batch: RecordBatch) -> Ingest:
    """Content type, forwardable headers and size of every record.

    ``depois.*`` headers (any letter case) are the filter's and replay's to write: a producer's
    copy is dropped here, so a downstream reader or ``replay`` never takes a forged verdict,
    score or error class for ours. One is kept: ``depois.replay_count``, when it is a small
    number. It is how ``replay release`` recognises a released copy that came back through
    ingest (a pipeline feeding the clean topic back in), and all a forged one can do is make
    its own record unreleasable. A null header value is forwarded as an empty one, the same with
    either client (kafka-python's producer refuses null values).
    """
    n = len(batch)
    cts: list[bytes | None] = [None] * n
    fwd: list[list[Header]] = [_NO_HEADERS] * n
    sizes = np.empty(n, dtype=np.int64)
    forged = 0
    unreadable: dict[int, str] = {}
    for i, (key, value, hs) in enumerate(zip(batch.keys, batch.values, batch.headers)):
        size = (len(key) if key else 0) + (len(value) if value else 0)
        if isinstance(hs, Unreadable):
            unreadable[i] = hs.error
        elif hs:
            kept = []
            dirty = False
            for name, val in hs:
                if name[:7].lower() == _PREFIX:
                    if name == _LINEAGE and val and len(val) <= 6 and val.isdigit():
                        val = str(int(val)).encode()  # b"0001" -> b"1"
                    else:
                        dirty = True
                        continue
                if val is None:  # a null header value (legal): kafka-python cannot write one
                    val = b""
                if name == H.CONTENT_TYPE and cts[i] is None:
                    cts[i] = val
                kept.append((name, val))
                # bytes on the wire: a name is text, and 300,000 emoji are 1.2 MB, not 300 kB
                size += ((len(name) if name.isascii() else len(name.encode("utf-8", "surrogatepass")))
                         + len(val) + HEADER_OVERHEAD)
            fwd[i] = kept
            forged += dirty
        sizes[i] = size
    return Ingest(cts, fwd, forged, sizes, unreadable)


@dataclass(frozen=True)
class Scored:
    """A batch after decoding and scoring (and before the routing decision is written down)."""

    n: int
    ingest: Ingest
    index: np.ndarray  # int64 [m]: record position of each scored row
    labels: np.ndarray  # int64 [m]
    prediction: Prediction  # [m] rows
    failures: list[tuple[int, str, str]]  # (record position, DLQ reason, message), sorted
    stripped: np.ndarray  # bool [n]: forward without the payload (too large, or refused)
    bare: np.ndarray | None = None  # bool [n]: also without key and producer headers (refused again)

    @property
    def quarantined(self) -> int:
        return int(self.prediction.poisoned.sum())

    @property
    def scored(self) -> int:
        return len(self.index)


def score(batch: RecordBatch, detector: Detector, max_record_bytes: int,
          rejected: Rejections | None = None) -> Scored:
    """Decode every record (failures become dead letters) and score the rest in one run."""
    meta = detector.metadata
    ingest = scan_headers(batch)
    n = len(batch)
    too_large = ingest.sizes + HEADER_ALLOWANCE > max_record_bytes
    stripped = too_large.copy()
    failures: list[tuple[int, str, str]] = [
        (i, "too_large", f"record is {int(ingest.sizes[i])} bytes with its key and headers; "
                         f"the filter can forward at most {max_record_bytes - HEADER_ALLOWANCE} "
                         "(raise the producer's max_request_size / message.max.bytes with "
                         "--kafka, and the topics' max.message.bytes)")
        for i in np.flatnonzero(too_large).tolist()]
    bare = None
    if rejected:
        for i, (p, o) in enumerate(zip(batch.partitions.tolist(), batch.offsets.tolist())):
            refusal = rejected.get((p, o))
            if refusal is None:
                continue
            if refusal.times >= BARE_AFTER:
                bare = np.zeros(n, dtype=bool) if bare is None else bare
                bare[i] = True
            if not stripped[i]:
                stripped[i] = True
                failures.append((i, "rejected_by_broker", refusal.why))
    for i, why in ingest.unreadable.items():
        if not stripped[i]:
            failures.append((i, "malformed", why))
    skip = stripped.copy()
    skip[list(ingest.unreadable)] = True  # dead letters with their bytes, not decoded
    if skip.any():
        todo = np.flatnonzero(~skip)
        values = [batch.values[i] for i in todo.tolist()]
        cts = [ingest.content_types[i] for i in todo.tolist()]
    else:
        todo, values, cts = None, batch.values, ingest.content_types
    # the decoder's own bound holds even where the producer's limit was raised past it: replay
    # reads with the same bound, and a value it refuses must not have reached the clean topic
    decoded = decode_batch(values, cts, input_shape=meta.input_shape, num_classes=meta.num_classes,
                           max_bytes=min(max_record_bytes, DEFAULT_MAX_BYTES))
    index = decoded.index if todo is None else todo[decoded.index]
    failures += [(f.index if todo is None else int(todo[f.index]), f.reason, f.message)
                 for f in decoded.failures]
    failures.sort()
    prediction = detector.run(decoded.images, decoded.labels)
    return Scored(n, ingest, index.astype(np.int64), decoded.labels, prediction, failures,
                  stripped, bare)


@dataclass(frozen=True)
class Routed:
    """What to produce for one batch, one entry per input record, and what to count once the
    broker acknowledged it (counted then, a record is counted once however often a breaker
    trip or a retried delivery made the filter score it)."""

    destination: np.ndarray  # int8 [n]: router.CLEAN | QUARANTINE | DLQ
    partitions: np.ndarray  # int [n]: output partition (source partition modulo the topic's)
    keys: list[bytes | None]
    values: list[bytes | None]
    headers: list[list[Header]]
    timestamps_ms: np.ndarray  # int64 [n]: source record timestamps (for end-to-end latency)
    counts: dict[str, int]  # destination name -> records
    dead_letter_reasons: Counter[str]
    quarantine_reasons: Counter[str]
    quarantine_labels: np.ndarray  # int64: claimed labels of the quarantined records
    scores: np.ndarray  # float32 [m]: detector score of each scored record
    forged: int  # records that carried forged depois.* headers

    def __len__(self) -> int:
        return len(self.destination)


def route(batch: RecordBatch, scored: Scored, model_version: str, model_sha256: str,
          partition_counts: Sequence[int], max_record_bytes: int) -> Routed:
    """Destination, output partition, key, value and headers of every record of the batch.

    An output keeps its source partition (modulo the output topic's partition count), which
    preserves per-key order from a key-partitioned ingest topic and skips per-record hashing.
    A stripped record (too large, or refused by the broker) is dead-lettered without its value,
    and without its key and own headers too when those alone do not fit or the broker refused
    it again (``Scored.bare``).
    """
    pred = scored.prediction
    reasons = pred.reasons
    plan = router.plan(
        router.Verdicts(n=scored.n, index=scored.index, labels=scored.labels, score=pred.score,
                        poisoned=pred.poisoned, threshold=pred.threshold, p_value=pred.p_value,
                        failures=scored.failures, reasons=reasons),
        router.Provenance(topics=[batch.topic] * scored.n, partitions=batch.partitions,
                          offsets=batch.offsets, timestamps_ms=batch.timestamps_ms),
        model_version, model_sha256)
    dest = plan.destination
    out_parts = batch.partitions.astype(np.int64) % np.asarray(partition_counts,
                                                                dtype=np.int64)[dest]
    keys, values = list(batch.keys), list(batch.values)
    headers = [f + h if f else h for f, h in zip(scored.ingest.forwarded, plan.headers)]
    for i in np.flatnonzero(scored.stripped).tolist():
        values[i] = b""
        own = scored.ingest.sizes[i] - (len(batch.values[i]) if batch.values[i] else 0)
        bare = scored.bare is not None and bool(scored.bare[i])
        if bare or own + HEADER_ALLOWANCE > max_record_bytes:  # key and own headers refused
            keys[i] = None
            headers[i] = plan.headers[i]
    for i, _, _ in scored.failures:
        if values[i] is None and keys[i] is None:
            values[i] = b""  # a keyless tombstone (always a dead letter) cannot be produced
    quarantined = pred.poisoned
    return Routed(
        destination=dest, partitions=out_parts, keys=keys, values=values, headers=headers,
        timestamps_ms=batch.timestamps_ms, counts=plan.counts(),
        dead_letter_reasons=Counter(reason for _, reason, _ in scored.failures),
        quarantine_reasons=Counter(r for r in reasons if r),
        quarantine_labels=scored.labels[quarantined], scores=pred.score,
        forged=scored.ingest.forged)


def latency_seconds(now_s: float, timestamps_ms: np.ndarray) -> np.ndarray:
    """Record timestamp to now, per record, for ``depois_end_to_end_latency_seconds``: never
    negative (a producer's clock ahead of ours, or a made-up CreateTime: one record stamped 2**62
    ms made the histogram's sum -1.4e16 and every average from it negative, stop 43), and NaN
    (not observed) for a record without a timestamp (-1)."""
    ts = np.asarray(timestamps_ms, dtype=np.float64)
    latency = np.maximum(now_s - ts / 1000.0, 0.0)
    latency[ts < 0] = np.nan
    return latency

