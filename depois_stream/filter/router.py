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

CLEAN, QUARANTINE, DLQ = 0, 1, 2
DESTINATION_NAMES = ("clean", "quarantine", "dlq")  # index = destination code
VERDICTS = (H.VERDICT_CLEAN.encode(), H.VERDICT_QUARANTINE.encode(), H.VERDICT_DLQ.encode())

Header = tuple[str, bytes]


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
    """Destinations plus the verdict and provenance headers of every record of one batch."""
    n = verdicts.n
    dest = destinations(n, verdicts.index, verdicts.poisoned)
    model = [(H.MODEL_VERSION, model_version.encode()), (H.MODEL_SHA256, model_sha256.encode())]
    topic_bytes = {t: t.encode() for t in set(provenance.topics)}
    source = [
        [(H.SOURCE_TOPIC, topic_bytes[t]), (H.SOURCE_PARTITION, p), (H.SOURCE_OFFSET, o),
         (H.SOURCE_TIMESTAMP, ts)]
        for t, p, o, ts in zip(provenance.topics, _ascii(provenance.partitions),
                               _ascii(provenance.offsets), _ascii(provenance.timestamps_ms))
    ]
    out: list[list[Header]] = [[] for _ in range(n)]

    index = verdicts.index.tolist()
    verdict = [VERDICTS[d] for d in dest[verdicts.index].tolist()]
    p_values = _ascii(verdicts.p_value) if verdicts.p_value is not None else None
    reasons = verdicts.reasons
    encoded = {r: r.encode() for r in set(reasons)} if reasons is not None else {}
    for row, (i, v, score, bound, label) in enumerate(zip(
            index, verdict, _ascii(verdicts.score), _ascii(verdicts.threshold),
            _ascii(verdicts.labels))):
        hdrs = [(H.VERDICT, v), (H.SCORE, score), (H.BOUNDARY, bound), (H.LABEL, label)]
        if p_values is not None:
            hdrs.append((H.P_VALUE, p_values[row]))
        if reasons is not None and reasons[row]:
            hdrs.append((H.REASON, encoded[reasons[row]]))
        out[i] = hdrs + model + source[i]

    for i, reason, message in verdicts.failures:
        out[i] = [(H.VERDICT, VERDICTS[DLQ]), (H.ERROR, message.encode("utf-8", "replace")),
                  (H.ERROR_CLASS, reason.encode())] + model + source[i]
    return RoutePlan(destination=dest, headers=out)
