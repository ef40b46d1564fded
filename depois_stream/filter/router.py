"""Turn one batch of verdicts into destinations and Kafka headers, without per-record decisions.

Kept pure (arrays in, arrays and header lists out) so the routing rule can be tested without a
broker and so the hot path stays vectorised: numbers are formatted for the whole batch at once
and the constant headers (model version, sha256) are encoded once per batch, not per record.

Routing rule: a record that did not decode goes to the dead-letter topic; a decoded record whose
model verdict is ``poisoned`` (score below its boundary) goes to quarantine; the rest is clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from depois_stream.contract import headers as H
from depois_stream.contract.headers import Header

CLEAN, QUARANTINE, DLQ = 0, 1, 2
DESTINATION_NAMES = ("clean", "quarantine", "dlq")  # index = destination code
VERDICTS = (H.VERDICT_CLEAN.encode(), H.VERDICT_QUARANTINE.encode(), H.VERDICT_DLQ.encode())

# The longest ``depois.error`` value written (UTF-8 bytes). Error messages may quote what the
# producer sent (a content type, a number, the broker's refusal); unbounded, a 300 kB header
# quoted back made a dead letter too large to produce. The filter's headers must fit in
# pipeline.HEADER_ALLOWANCE together.
MAX_ERROR_BYTES = 512
_TRUNCATED = " ... (truncated)".encode()


def error_header(message: str) -> bytes:
    """``message`` as UTF-8, cut to at most ``MAX_ERROR_BYTES`` (on a character boundary)."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= MAX_ERROR_BYTES:
        return raw
    head = raw[:MAX_ERROR_BYTES - len(_TRUNCATED)].decode("utf-8", "ignore").encode()
    return head + _TRUNCATED


@dataclass(frozen=True)
class Provenance:
    """Where each input record came from, one entry per record of the batch."""

    topics: Sequence[str]
    partitions: np.ndarray  # int [n]
    offsets: np.ndarray  # int [n]
    timestamps_ms: np.ndarray  # int [n]


@dataclass(frozen=True)
class Verdicts:
    """What decoding and scoring said about a batch of ``n`` records.

    ``index`` maps each scored row back to its record; records absent from it failed to decode
    and have an entry in ``failures`` as ``(record index, reason code, message)``.
    """

    n: int
    index: np.ndarray  # int64 [m]
    labels: np.ndarray  # int64 [m]
    score: np.ndarray  # float32 [m]
    poisoned: np.ndarray  # bool [m]
    threshold: np.ndarray  # float32 [m]
    p_value: np.ndarray | None  # float32 [m]
    failures: Sequence[tuple[int, str, str]]
    reasons: Sequence[str] | None = None  # [m]: why a quarantined row is suspect ("" if clean)


@dataclass(frozen=True)
class RoutePlan:
    destination: np.ndarray  # int8 [n]: CLEAN | QUARANTINE | DLQ per record
    headers: list[list[Header]]  # depois headers per record (to append to the record's own)

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.destination, minlength=len(DESTINATION_NAMES))
        return {name: int(c[i]) for i, name in enumerate(DESTINATION_NAMES)}


def destinations(n: int, index: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
    """Destination code per record: DLQ unless decoded, then by the poisoned verdict."""
    dest = np.full(n, DLQ, dtype=np.int8)
    dest[index] = np.where(poisoned, QUARANTINE, CLEAN).astype(np.int8)
    return dest


def _ascii(values: np.ndarray) -> list[bytes]:
    """Format a numeric array in one pass; str() of a float32 is its shortest exact repr."""
    return "\n".join(np.asarray(values).astype(str).tolist()).encode("ascii").split(b"\n")


def plan(verdicts: Verdicts, provenance: Provenance, model_version: str,
         model_sha256: str) -> RoutePlan:
    """Destinations plus the verdict and provenance headers of every record of one batch.

    Header order of a scored record: verdict, score, boundary, label, [p_value], model version,
    model sha256, source topic, partition, offset, timestamp, [reason (quarantine only)]. Each
    list is built by one tuple display per record: the numbers were formatted for the whole
    batch and the constant headers encoded once.
    """
    n = verdicts.n
    dest = destinations(n, verdicts.index, verdicts.poisoned)
    version = (H.MODEL_VERSION, model_version.encode())
    sha = (H.MODEL_SHA256, model_sha256.encode())
    topic_header = {t: (H.SOURCE_TOPIC, t.encode()) for t in set(provenance.topics)}
    topics = [topic_header[t] for t in provenance.topics]
    parts, offsets, stamps = (_ascii(provenance.partitions), _ascii(provenance.offsets),
                              _ascii(provenance.timestamps_ms))
    out: list[list[Header]] = [[]] * n

    index = verdicts.index.tolist()
    verdict = [VERDICTS[d] for d in dest[verdicts.index].tolist()]
    scores, bounds, labels = (_ascii(verdicts.score), _ascii(verdicts.threshold),
                              _ascii(verdicts.labels))
    if verdicts.p_value is not None:
        for i, v, sc, b, lab, pv in zip(index, verdict, scores, bounds, labels,
                                        _ascii(verdicts.p_value)):
            out[i] = [(H.VERDICT, v), (H.SCORE, sc), (H.BOUNDARY, b), (H.LABEL, lab),
                      (H.P_VALUE, pv), version, sha, topics[i], (H.SOURCE_PARTITION, parts[i]),
                      (H.SOURCE_OFFSET, offsets[i]), (H.SOURCE_TIMESTAMP, stamps[i])]
    else:
        for i, v, sc, b, lab in zip(index, verdict, scores, bounds, labels):
            out[i] = [(H.VERDICT, v), (H.SCORE, sc), (H.BOUNDARY, b), (H.LABEL, lab),
                      version, sha, topics[i], (H.SOURCE_PARTITION, parts[i]),
                      (H.SOURCE_OFFSET, offsets[i]), (H.SOURCE_TIMESTAMP, stamps[i])]
    if verdicts.reasons is not None:
        encoded = {r: (H.REASON, r.encode()) for r in set(verdicts.reasons) if r}
        for i, r in zip(index, verdicts.reasons):
            if r:
                out[i].append(encoded[r])

    for i, reason, message in verdicts.failures:
        out[i] = [(H.VERDICT, VERDICTS[DLQ]), (H.ERROR, error_header(message)),
                  (H.ERROR_CLASS, reason.encode()), version, sha, topics[i],
                  (H.SOURCE_PARTITION, parts[i]), (H.SOURCE_OFFSET, offsets[i]),
                  (H.SOURCE_TIMESTAMP, stamps[i])]
    return RoutePlan(destination=dest, headers=out)
