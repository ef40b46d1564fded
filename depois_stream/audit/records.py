"""What a quarantined record says, and how a reviewer selects and lists records (pure).

``QuarantinedRecord`` parses the router's headers once; ``ReplayFilter``, ``select`` and
``summarize`` are the rules behind `replay list/export/release` selections, testable without a
broker.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from pydantic import BaseModel, ConfigDict

from depois_stream.audit.trail import RecordLocation, location_id
from depois_stream.contract import headers as H

# Why a quarantine record is there when the router gave no error class: its score was below the
# boundary. DLQ records carry their own bounded reason code in depois.error_class.
REASON_BELOW_BOUNDARY = "below_boundary"

# How much of an id an error or output line shows. Keys are producers' to pick and can be most
# of a megabyte; a line that long helps nobody. Release ids of legal topic names (at most 249
# characters) always fit RELEASE_ID_CHARS.
ID_CHARS = 80
RELEASE_ID_CHARS = 300


class ReplayError(RuntimeError):
    """Replay cannot proceed; the message says what to fix."""


def shown(text: str, limit: int = ID_CHARS, *, note: bool = True) -> str:
    """``text`` as one harmless, bounded piece of a terminal line.

    Keys (and anything else a producer wrote) reach the operator's terminal in tables, reports
    and errors: a newline there forges a table row, an escape sequence clears the screen. So
    every character that is not printable, and the backslash that would make an escape
    ambiguous, is written as its Python escape (``\\n``, ``\\x1b``). Past ``limit`` characters
    the text is cut, with its full length noted (``note``) or just an ellipsis (table cells).
    """
    head, used = "", 0
    for c in text[:limit]:
        piece = c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        if len(head) + len(piece) > limit:
            break
        head, used = head + piece, used + 1
    if used == len(text):
        return head
    return head + (f"… ({len(text)} characters)" if note else "…")


_RELEASE_ID = re.compile(r"[a-zA-Z0-9._-]{1,249}:(0|[1-9][0-9]*):(0|[1-9][0-9]*)")


def is_release_id(token: str) -> bool:
    """Whether an ``--id`` token names an ingest record (``TOPIC:PARTITION:OFFSET``, a legal
    topic name and integers) rather than a key. A key of that shape is a producer's choice that
    would otherwise join a selection by release id, so such a token matches release ids only."""
    return _RELEASE_ID.fullmatch(token) is not None

@dataclass(frozen=True)
class QuarantinedRecord:
    """One record of the quarantine (or dead-letter) topic with its router headers parsed."""

    location: RecordLocation
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    h: dict[str, str] = field(repr=False)

    @classmethod
    def from_kafka(cls, topic: str, partition: int, offset: int, timestamp_ms: int | None,
                   key: bytes | None, value: bytes | None,
                   headers: Sequence[tuple[str, bytes]] | None) -> QuarantinedRecord:
        raw = tuple(headers or ())
        return cls(RecordLocation(topic=topic, partition=partition, offset=offset,
                                  timestamp_ms=timestamp_ms),
                   key, value, raw, H.as_dict(list(raw)))

    @property
    def repeated_router_headers(self) -> bool:
        """A ``depois.*`` header more than once: not as the filter writes a record."""
        names = [k for k, _ in self.headers if k.startswith(H.PREFIX)]
        return len(names) != len(set(names))

    @property
    def sample_id(self) -> str:
        """What people call the sample: its Kafka key as text (bytes that are not UTF-8 shown
        as replacement characters), or its release id when it has no key. A label only: keys
        may repeat, so nothing is decided by it."""
        if self.key:
            return self.key.decode("utf-8", "replace")
        return self.release_id

    @property
    def release_id(self) -> str:
        """The sample's identity for release and the audit trail: the ingest record it came
        from (``topic:partition:offset``), or this record's own place without provenance."""
        return location_id(self.source or self.location)

    @property
    def verdict(self) -> str | None:
        return self.h.get(H.VERDICT)

    @property
    def label(self) -> int | None:
        return _int(self.h.get(H.LABEL))

    @property
    def score(self) -> float | None:
        return _float(self.h.get(H.SCORE))

    @property
    def boundary(self) -> float | None:
        return _float(self.h.get(H.BOUNDARY))

    @property
    def p_value(self) -> float | None:
        return _float(self.h.get(H.P_VALUE))

    @property
    def model_version(self) -> str | None:
        return self.h.get(H.MODEL_VERSION)

    @property
    def model_sha256(self) -> str | None:
        return self.h.get(H.MODEL_SHA256)

    @property
    def content_type(self) -> str | None:
        return self.h.get(H.CONTENT_TYPE)

    @property
    def replay_count(self) -> int:
        """How often this sample was released before: 0 without the header; -1 for a value the
        filter never forwards (negative, empty, not a number), which only a record written to
        the quarantine topic by hand has."""
        text = self.h.get(H.REPLAY_COUNT)
        if text is None:
            return 0
        count = _int(text)
        return count if count is not None and count >= 0 else -1

    @property
    def source(self) -> RecordLocation | None:
        topic, partition = self.h.get(H.SOURCE_TOPIC), _int(self.h.get(H.SOURCE_PARTITION))
        offset = _int(self.h.get(H.SOURCE_OFFSET))
        if topic is None or partition is None or offset is None:
            return None
        return RecordLocation(topic=topic, partition=partition, offset=offset,
                              timestamp_ms=_int(self.h.get(H.SOURCE_TIMESTAMP)))

    @property
    def reason(self) -> str:
        """Bounded code for why the record is here: the dead-letter error class, the evidence
        member that fired (``depois.reason``), or below_boundary."""
        if self.h.get(H.ERROR_CLASS):
            return self.h[H.ERROR_CLASS]
        if self.h.get(H.REASON):
            return self.h[H.REASON]
        score, boundary = self.score, self.boundary
        if score is not None and boundary is not None and score < boundary:
            return REASON_BELOW_BOUNDARY
        return self.verdict or "unknown"


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


class ReplayFilter(BaseModel):
    """What a reviewer selects; every field left ``None`` matches everything.

    Score bounds are inclusive. A record without the header a set field needs (a dead-letter
    record has no score) does not match that field: a filter should never widen by accident.
    """

    model_config = ConfigDict(frozen=True)

    ids: frozenset[str] | None = None
    labels: frozenset[int] | None = None
    min_score: float | None = None
    max_score: float | None = None
    model_versions: frozenset[str] | None = None
    source_partitions: frozenset[int] | None = None
    reasons: frozenset[str] | None = None

    @property
    def selects_everything(self) -> bool:
        return all(v is None for v in self.model_dump().values())

    @cached_property
    def release_ids(self) -> frozenset[str]:
        """The ``ids`` of the release-id form: they match release ids, never keys."""
        return frozenset(i for i in self.ids or () if is_release_id(i))

    @cached_property
    def key_ids(self) -> frozenset[str]:
        """The other ``ids``: they match keys."""
        return frozenset(self.ids or ()) - self.release_ids

    def matches(self, r: QuarantinedRecord) -> bool:
        score = r.score
        source = r.source
        return (
            (self.ids is None or r.release_id in self.release_ids or r.sample_id in self.key_ids)
            and (self.labels is None or r.label in self.labels)
            and (self.min_score is None or (score is not None and score >= self.min_score))
            and (self.max_score is None or (score is not None and score <= self.max_score))
            and (self.model_versions is None or r.model_version in self.model_versions)
            and (self.source_partitions is None
                 or (source is not None and source.partition in self.source_partitions))
            and (self.reasons is None or r.reason in self.reasons)
        )


def select(records: Iterable[QuarantinedRecord], flt: ReplayFilter) -> list[QuarantinedRecord]:
    return [r for r in records if flt.matches(r)]


def unmatched_ids(flt: ReplayFilter, chosen: Iterable[QuarantinedRecord]) -> list[str]:
    """The ``--id`` tokens that selected no record (a typo, a sample outside the read window or
    excluded by the other filters), in a stable order: a release of "the other nineteen" is
    not what a reviewer who named twenty asked for."""
    if flt.ids is None:
        return []
    chosen = list(chosen)
    releases, keys = {r.release_id for r in chosen}, {r.sample_id for r in chosen}
    return sorted([i for i in flt.release_ids if i not in releases]
                  + [i for i in flt.key_ids if i not in keys])


def ambiguous_keys(flt: ReplayFilter, chosen: Iterable[QuarantinedRecord]) -> dict[str, list[str]]:
    """Each key of ``flt.ids`` that selected more than one distinct sample, with their release
    ids in selection order. Keys are the producer's choice: an attacker can reuse the key of a
    sample under review, and a release by that key would publish both. (Two quarantine copies
    of one ingest record share their release id: that is one sample, not a choice.)"""
    out: dict[str, list[str]] = {}
    for r in chosen:
        if r.sample_id in flt.key_ids:
            rids = out.setdefault(r.sample_id, [])
            if r.release_id not in rids:
                rids.append(r.release_id)
    return {key: rids for key, rids in out.items() if len(rids) > 1}


def require_unambiguous_keys(flt: ReplayFilter, chosen: Iterable[QuarantinedRecord]) -> None:
    """Refuse a release whose ``--id`` keys stand for more than one sample (see
    ``ambiguous_keys``): only the operator can say which one was reviewed."""
    shared = ambiguous_keys(flt, chosen)
    if not shared:
        return

    def one(key: str, rids: list[str]) -> str:
        more = f" and {len(rids) - 3} more" if len(rids) > 3 else ""
        return (f"--id '{shown(key)}' matches {len(rids)} different samples (release ids "
                f"{', '.join(shown(r, RELEASE_ID_CHARS) for r in rids[:3])}{more})")

    items = list(shared.items())
    more = f"; and {len(items) - 3} more keys" if len(items) > 3 else ""
    raise ReplayError("; ".join(one(k, v) for k, v in items[:3]) + more + ": keys are chosen "
                      "by producers and can repeat, so release will not pick one; select the "
                      "sample to release by its release id (--id TOPIC:PARTITION:OFFSET, shown "
                      "by `replay list`)")


class ReadWindow(BaseModel):
    """Which part of a topic to read: all of it, a time range, or explicit offsets.

    ``offsets`` maps partition -> (first, last) with ``last`` inclusive or ``None`` for "to the
    end"; partitions not named are not read. Times are record timestamps in epoch ms, ``since``
    inclusive and ``until`` exclusive; they seek with ``offsets_for_times`` and are also checked
    per record, because a broker's timestamp index is only a hint (Tansu ignores it).
    """

    model_config = ConfigDict(frozen=True)

    since_ms: int | None = None
    until_ms: int | None = None
    offsets: dict[int, tuple[int, int | None]] | None = None

    def contains(self, partition: int, offset: int, timestamp_ms: int | None) -> bool:
        if self.offsets is not None:
            if partition not in self.offsets:
                return False
            first, last = self.offsets[partition]
            if offset < first or (last is not None and offset > last):
                return False
        if self.since_ms is not None and (timestamp_ms is None or timestamp_ms < self.since_ms):
            return False
        if self.until_ms is not None and (timestamp_ms is None or timestamp_ms >= self.until_ms):
            return False
        return True


def parse_offsets(specs: Sequence[str]) -> dict[int, tuple[int, int | None]]:
    """``["0:10-20", "1:5"]`` -> {0: (10, 20), 1: (5, None)}; ValueError names a bad spec."""
    out: dict[int, tuple[int, int | None]] = {}
    for spec in specs:
        try:
            part, _, rng = spec.partition(":")
            first, dash, last = rng.partition("-")
            p, lo = int(part), int(first)
            hi = int(last) if dash and last else None
        except ValueError:
            raise ValueError(f"offset range {spec!r} is not PARTITION:FIRST[-LAST], "
                             "e.g. 0:120-180 or 2:40") from None
        if p < 0 or lo < 0 or (hi is not None and hi < lo):
            raise ValueError(f"offset range {spec!r} is empty or negative")
        if p in out:  # keeping only one of them would read less than was asked, silently
            raise ValueError(f"partition {p} is given twice (--offsets takes one range per "
                             "partition)")
        out[p] = (lo, hi)
    return out


class ListedRecord(BaseModel):
    """What ``replay list`` shows of one record."""

    id: str
    release_id: str  # what tells apart two samples with the same key
    label: int | None
    score: float | None
    boundary: float | None
    reason: str
    model_version: str | None
    source: RecordLocation | None
    quarantine: RecordLocation


class Listing(BaseModel):
    """The selected records plus totals; the totals are what a reviewer reads first."""

    records: list[ListedRecord]
    read: int
    selected: int
    by_label: dict[str, int]
    by_reason: dict[str, int]
    by_model_version: dict[str, int]


# What a listing shows for a header a record lacks (a dead letter has no label, score or model):
# the same dash in the table, its totals and their JSON keys, never Python's "None".
MISSING = "-"


def as_text(value: object) -> str:
    """``value`` as a listing shows it: ``MISSING`` for a header the record lacks."""
    return MISSING if value is None else str(value)


def summarize(read: int, chosen: Sequence[QuarantinedRecord]) -> Listing:
    def count(values: Iterable[object]) -> dict[str, int]:
        return dict(sorted(Counter(as_text(v) for v in values).items()))

    return Listing(
        records=[ListedRecord(id=r.sample_id, release_id=r.release_id, label=r.label,
                              score=r.score, boundary=r.boundary, reason=r.reason,
                              model_version=r.model_version, source=r.source,
                              quarantine=r.location) for r in chosen],
        read=read, selected=len(chosen), by_label=count(r.label for r in chosen),
        by_reason=count(r.reason for r in chosen),
        by_model_version=count(r.model_version for r in chosen),
    )
