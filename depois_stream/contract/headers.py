"""Kafka header names written by the router and read back by replay and audit tooling.

Headers carry the verdict and its provenance while the value and key travel unchanged, so a
downstream trainer that ignores headers sees exactly the bytes the producer sent. Values are
UTF-8 strings (numbers formatted with ``repr`` so they round-trip exactly).
"""

from __future__ import annotations

Header = tuple[str, bytes]  # (name, value): one Kafka record header, as both clients give it

VERDICT = "depois.verdict"  # "clean" | "quarantine" | "dlq" | "released"
SCORE = "depois.score"
BOUNDARY = "depois.boundary"  # the threshold applied to this sample (its class's, if per-class)
P_VALUE = "depois.p_value"
REASON = "depois.reason"  # quarantine only: the evidence column that fired: a member or an agreement (below_boundary if none)
LABEL = "depois.label"
MODEL_VERSION = "depois.model_version"
MODEL_SHA256 = "depois.model_sha256"
SOURCE_TOPIC = "depois.source.topic"
SOURCE_PARTITION = "depois.source.partition"
SOURCE_OFFSET = "depois.source.offset"
SOURCE_TIMESTAMP = "depois.source.timestamp_ms"
ERROR = "depois.error"  # dead-letter only: human-readable reason
ERROR_CLASS = "depois.error_class"  # dead-letter only: bounded reason code (metrics label)
CONTENT_TYPE = "content-type"  # on ingest records: selects the wire encoding

# Every header the filter or replay writes starts with this. Ingest records carrying any header
# with this prefix (in any letter case) lose it before forwarding, so readers can trust them.
PREFIX = "depois."

# Set by `depois-stream replay release`.
REPLAY_COUNT = "depois.replay_count"  # loop guard: a record released once is never re-released
RELEASED_BY = "depois.released.by"
RELEASED_AT = "depois.released.at"
RELEASED_REASON = "depois.released.reason"

VERDICT_CLEAN = "clean"
VERDICT_QUARANTINE = "quarantine"
VERDICT_DLQ = "dlq"
VERDICT_RELEASED = "released"


# Wire bytes of one record header besides its name and value: two varint lengths of at most 5
# bytes each. Uncounted, 400,000 empty headers were 0 bytes to the filter and 800 kB to Kafka.
HEADER_OVERHEAD = 10


def as_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Kafka headers (list of (key, bytes)) -> {key: str}; the first value of a repeated key wins,
    as in the filter, which decodes a record by its first ``content-type`` header: replay must
    read a record the way the filter did."""
    out: dict[str, str] = {}
    for k, v in headers or []:
        if k not in out:
            out[k] = v.decode("utf-8", "replace") if v is not None else ""
    return out
