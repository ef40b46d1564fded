"""Read quarantined records back, select the ones a reviewer asks for, and release them.

The selection and release planning are pure functions over ``QuarantinedRecord`` so the rules
(what a filter means, what the loop guard refuses, what a released record carries) can be read
and tested without a broker. The Kafka side is thin and deliberately conservative: it reads with
manual ``assign()`` and no group id, so it can never commit, and therefore never move, the live
consumer's offsets, whatever topic or group the operator points it at.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, KafkaTimeoutError
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

from depois_stream.contract import headers as H
from depois_stream.contract.headers import Header
from depois_stream.audit.trail import (
    DEFAULT_AUDIT_TOPIC,
    AuditRecord,
    RecordLocation,
    location_id,
    parse_audit_values,
    released_ids,
)
from depois_stream.contract import utc_now_iso
from depois_stream.filter.clients.kafka_python import check_passthrough, options_for
from depois_stream.filter.config import (
    MAX_SECONDS, TOPIC_NAME, describe_errors, host_port_list, misspells, unknown_env_matches,
)
from depois_stream.audit.metrics import ReplayMetrics

CLIENT_ID = "depois-replay"
# Why a quarantine record is there when the router gave no error class: its score was below the
# boundary. DLQ records carry their own bounded reason code in depois.error_class.
REASON_BELOW_BOUNDARY = "below_boundary"

# Replay decides these itself; in particular a group id would let it commit offsets.
_OWNED_KAFKA_KEYS = frozenset({
    "bootstrap_servers", "group_id", "enable_auto_commit", "auto_offset_reset", "client_id",
    "acks", "key_deserializer", "value_deserializer", "key_serializer", "value_serializer",
})

Message = tuple[bytes | None, bytes | None, list[Header]]  # key, value, headers

SkipReason = Literal["already_released", "loop_guard", "not_quarantined", "no_value",
                     "duplicate"]

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


class ReplaySettings(BaseSettings):
    """Where replay reads and writes; the same ``DEPOIS_*`` variables the consumer uses."""

    model_config = SettingsConfigDict(env_prefix="DEPOIS_", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    quarantine_topic: str = Field("depois.quarantine", pattern=TOPIC_NAME)
    clean_topic: str = Field("depois.clean", pattern=TOPIC_NAME)
    audit_topic: str = Field(DEFAULT_AUDIT_TOPIC, pattern=TOPIC_NAME)
    kafka: dict[str, Any] = {}  # security passthrough (sasl_*, ssl_*, security_protocol)
    read_timeout_s: float = Field(60.0, gt=0.0, le=MAX_SECONDS, allow_inf_nan=False)

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, v: str) -> str:
        return host_port_list(v)  # the rule `run` applies too

    @field_validator("kafka")
    @classmethod
    def _passthrough_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_passthrough(v, _OWNED_KAFKA_KEYS, "are chosen by replay itself: it reads without a "
                          "consumer group so that it can never commit the live consumer's offsets")
        return v

    @model_validator(mode="after")
    def _distinct_topics(self) -> "ReplaySettings":
        """The rule `run` applies to its topics: release reads quarantine, writes clean and
        audit; any two the same and audit JSON lands in the training topic, or released copies
        in quarantine again."""
        topics = [self.quarantine_topic, self.clean_topic, self.audit_topic]
        if len(set(topics)) != len(topics):
            raise ValueError(f"quarantine, clean and audit topics must differ, got {topics}")
        return self

    def client_options(self, client: type[KafkaConsumer] | type[KafkaProducer]) -> dict[str, Any]:
        """The ``kafka`` options ``client`` understands (kafka-python rejects the others)."""
        return options_for(client, self.kafka)


def unknown_replay_env(environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """``DEPOIS_*`` variables in ``environ`` that set nothing (``unknown_env_matches``, the check
    `depois-stream run` makes at start-up), split in two: those that most likely meant one of
    replay's own settings, to refuse (a misspelt DEPOIS_CLEAN_TOPIC would send released copies to
    the default topic), and the rest, to warn about as `run` does (replay runs in the stream
    filter's environment, where a platform may add variables of its own, such as Kubernetes'
    service variables for a Service named depois-something).
    """
    # and the filter's key variable, which `rescore` reads when --verify-signature is not given
    own = {f"DEPOIS_{name.upper()}" for name in ReplaySettings.model_fields} | {"DEPOIS_VERIFY_SIGNATURE"}
    refused: list[str] = []
    warned: list[str] = []
    for name, close in unknown_env_matches(environ):
        if name.upper() in own:
            continue
        entry = f"{name} (did you mean {close}?)" if close else name
        (refused if misspells(name, close, own, environ[name]) else warned).append(entry)
    return refused, warned


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
        return _int(self.h.get(H.REPLAY_COUNT)) or 0

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


# ---------------------------------------------------------------- release planning (pure)

@dataclass
class ReleasePlan:
    release: list[QuarantinedRecord]
    skipped: list[tuple[QuarantinedRecord, SkipReason]]


def plan_release(records: Iterable[QuarantinedRecord], already_released: set[str]) -> ReleasePlan:
    """Decide per selected record whether it may go to the clean topic.

    Records are identified by ``release_id`` (the ingest record they came from), never by key.
    Refused: records with a release on the audit topic (idempotence), records that were already
    released once (replay_count >= 1: a loop guard should a released copy ever be routed back),
    records that are not quarantine verdicts (dead letters cannot be decoded downstream),
    records without a value (a tombstone written by hand: released, it would delete the key's
    sample from a compacted clean topic) and a second copy of the same ingest record in the
    selection (at-least-once delivery can write one ingest record to quarantine twice).
    """
    plan = ReleasePlan(release=[], skipped=[])
    seen: set[str] = set()
    for r in records:
        sid = r.release_id
        why: SkipReason | None = None
        if sid in already_released:
            why = "already_released"
        elif r.replay_count >= 1:
            why = "loop_guard"
        elif r.verdict != H.VERDICT_QUARANTINE:
            why = "not_quarantined"
        elif r.value is None:
            why = "no_value"
        elif sid in seen:
            why = "duplicate"
        if why is None:
            seen.add(sid)
            plan.release.append(r)
        else:
            plan.skipped.append((r, why))
    return plan


_OVERWRITTEN = {H.VERDICT, H.REPLAY_COUNT, H.RELEASED_BY, H.RELEASED_AT, H.RELEASED_REASON}


def release_headers(r: QuarantinedRecord, operator: str, reason: str,
                    released_at: str) -> list[Header]:
    """The quarantine headers (score, model, provenance, content type) plus who, when and why.

    Everything the router wrote is kept so the clean copy still explains where it came from;
    only the verdict changes, to ``released``, which a trainer can choose to treat differently.
    """
    # A null header value is legal in Kafka, but kafka-python cannot write one: empty, as the
    # filter forwards it.
    kept = [(k, b"" if v is None else v) for k, v in r.headers if k not in _OVERWRITTEN]
    return kept + [
        (H.VERDICT, H.VERDICT_RELEASED.encode()),
        (H.REPLAY_COUNT, str(r.replay_count + 1).encode()),
        (H.RELEASED_BY, operator.encode("utf-8")),
        (H.RELEASED_AT, released_at.encode()),
        (H.RELEASED_REASON, reason.encode("utf-8")),
    ]


def audit_record_for(r: QuarantinedRecord, operator: str, reason: str, released_at: str,
                     destination_topic: str) -> AuditRecord:
    return AuditRecord(
        sample_id=r.sample_id, action="release", operator=operator, reason=reason,
        timestamp=released_at, label=r.label, model_version=r.model_version, score=r.score,
        boundary=r.boundary, source=r.source, quarantine=r.location,
        destination_topic=destination_topic, replay_count=r.replay_count + 1,
    )


class ReleaseReport(BaseModel):
    """What a release did; each list of sample ids (keys, which may repeat) has its release ids
    (which do not) in a list of the same order beside it."""

    dry_run: bool
    released: list[str]
    release_ids: list[str]
    skipped: dict[str, list[str]]  # skip reason -> sample ids
    skipped_release_ids: dict[str, list[str]]  # skip reason -> release ids
    unreadable_audit_records: int


def require_operator_and_reason(operator: str | None, reason: str | None) -> tuple[str, str]:
    who, why = (operator or "").strip(), (reason or "").strip()
    missing = [flag for flag, v in (("--operator", who), ("--reason", why)) if not v]
    for flag, v in (("--operator", who), ("--reason", why)):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ReplayError(f"{flag} is not valid UTF-8 text (it goes into headers and the "
                              "audit topic as UTF-8); check the terminal's encoding") from None
    if missing:
        raise ReplayError(
            f"release needs {' and '.join(missing)}: every release is written to the audit topic "
            "with who approved it and why, e.g. --operator alice --reason 'ticket 1234: "
            "mislabelled by the detector, checked by hand'")
    return who, why


# ---------------------------------------------------------------- Kafka I/O (thin)

@contextmanager
def _kafka_errors(bootstrap: str) -> Iterator[None]:
    """Client errors become one ReplayError line instead of a kafka-python traceback."""
    try:
        yield
    except KafkaError as exc:
        raise ReplayError(f"Kafka at {bootstrap} failed: {exc}; check --bootstrap-servers / "
                          "DEPOIS_BOOTSTRAP_SERVERS and the DEPOIS_KAFKA security options") from exc


def _consumer(bootstrap: str, kafka: dict[str, Any]) -> KafkaConsumer:
    # group_id=None: no group membership, no offset commits, ever. read_committed: a record of
    # an aborted transaction (an exactly-once filter's batch that was retried) was never written
    # as far as its readers are concerned; releasing it would put the sample on the clean topic
    # twice. DEPOIS_KAFKA may still say otherwise.
    options = {"isolation_level": "read_committed", **kafka}
    return KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest", client_id=CLIENT_ID, **options)


def read_raw(bootstrap: str, topic: str, window: ReadWindow | None = None, *,
             kafka: dict[str, Any] | None = None, timeout_s: float = 60.0,
             missing_hint: str = "check --topic and DEPOIS_BOOTSTRAP_SERVERS",
             grace_s: float = 0.5) -> list[ConsumerRecord]:
    """Read ``window`` of ``topic`` (all of it by default) and return kafka ConsumerRecords.

    Reading stops once every partition reached the end offset snapshotted at start and one
    poll came back empty (at most ``grace_s`` later). The extra poll is for brokers whose end
    offset is a batch base rather than the last offset (Tansu); on Kafka it costs one poll.
    """
    window = window or ReadWindow()
    kafka = dict(kafka or {})
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:
        # kafka-python waits this long for a first broker (30 s) before any read can time out.
        default_ms = KafkaConsumer.DEFAULT_CONFIG["bootstrap_timeout_ms"]
        kafka.setdefault("bootstrap_timeout_ms", int(min(timeout_s * 1000, default_ms)))
    with _kafka_errors(bootstrap):
        consumer = _consumer(bootstrap, kafka)
        try:
            parts = _partitions(consumer, bootstrap, topic, missing_hint)
            if window.offsets is not None:
                unknown = sorted(set(window.offsets) - parts)
                if unknown:
                    raise ReplayError(f"{topic!r} has partitions {sorted(parts)}, not {unknown}")
                parts = set(window.offsets)
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            starts, stops = _bounds(consumer, tps, window)
            for tp in tps:
                consumer.seek(tp, starts[tp])
            return _drain(consumer, tps, stops, window, timeout_s, grace_s)
        finally:
            consumer.close(autocommit=False)


def _partitions(consumer: KafkaConsumer, bootstrap: str, topic: str, missing_hint: str) -> set[int]:
    """The partitions of ``topic``; ReplayError when it does not exist.

    kafka-python asks for the metadata of all topics here, not of this one, so the check cannot
    make a broker that creates topics on a metadata request (or first write) create it.
    """
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise ReplayError(f"topic {topic!r} does not exist on {bootstrap}; {missing_hint}")
    return set(parts)


def require_topic(settings: ReplaySettings, topic: str, missing_hint: str) -> None:
    """Refuse to go on when ``topic`` does not exist (see ``_partitions``)."""
    with _kafka_errors(settings.bootstrap_servers):
        consumer = _consumer(settings.bootstrap_servers, settings.client_options(KafkaConsumer))
        try:
            _partitions(consumer, settings.bootstrap_servers, topic, missing_hint)
        finally:
            consumer.close(autocommit=False)


def _drain(consumer: KafkaConsumer, tps: list[TopicPartition], stops: dict[TopicPartition, int],
           window: ReadWindow, timeout_s: float, grace_s: float) -> list[ConsumerRecord]:
    out: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    caught_up_at: float | None = None
    while True:
        batch = consumer.poll(timeout_ms=200)
        for recs in batch.values():
            out.extend(r for r in recs if window.contains(r.partition, r.offset, r.timestamp))
        now = time.monotonic()
        if caught_up_at is None and all(consumer.position(tp) >= stops[tp] for tp in tps):
            caught_up_at = now
        if caught_up_at is not None and (not batch or now - caught_up_at > grace_s):
            return out
        if now > deadline:
            raise ReplayError(f"reading {tps[0].topic!r} did not reach its end within "
                              f"{timeout_s} s; narrow the window (--since/--offsets) or raise "
                              "DEPOIS_READ_TIMEOUT_S")


def _bounds(consumer: KafkaConsumer, tps: list[TopicPartition],
            window: ReadWindow) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Start and stop offset per partition: stop is exclusive and never before start."""
    begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
    starts, stops = dict(begin), dict(end)
    if window.since_ms is not None:
        found = consumer.offsets_for_times({tp: window.since_ms for tp in tps})
        for tp in tps:
            starts[tp] = found[tp].offset if found.get(tp) is not None else end[tp]
    if window.offsets is not None:
        for tp in tps:
            first, last = window.offsets[tp.partition]
            # Past the end would make the client reset to the beginning; clamp instead.
            starts[tp] = min(max(first, starts[tp]), end[tp])
            if last is not None:
                stops[tp] = min(last + 1, end[tp])
    for tp in tps:
        stops[tp] = max(stops[tp], starts[tp])
    return starts, stops


def read_quarantine(settings: ReplaySettings, window: ReadWindow | None = None,
                    topic: str | None = None) -> list[QuarantinedRecord]:
    """Records of the quarantine topic (or ``topic``) in time order, as a reviewer reads them."""
    recs = read_raw(settings.bootstrap_servers, topic or settings.quarantine_topic, window,
                    kafka=settings.client_options(KafkaConsumer),
                    timeout_s=settings.read_timeout_s)
    return [QuarantinedRecord.from_kafka(r.topic, r.partition, r.offset, r.timestamp, r.key,
                                         r.value, r.headers)
            for r in sorted(recs, key=lambda r: (r.timestamp, r.partition, r.offset))]


def read_audit(settings: ReplaySettings) -> tuple[list[AuditRecord], int]:
    """All audit records (and how many values were unreadable).

    The audit topic must exist. It is release's memory: read as empty, a mistyped
    ``DEPOIS_AUDIT_TOPIC`` would make every earlier release releasable again (and a broker that
    creates topics on first write would keep the typo's own, separate memory from then on).
    """
    recs = read_raw(settings.bootstrap_servers, settings.audit_topic,
                    kafka=settings.client_options(KafkaConsumer),
                    timeout_s=settings.read_timeout_s, missing_hint=(
                        "release reads it to refuse samples released before: check "
                        "DEPOIS_AUDIT_TOPIC, or create it once with unlimited retention (e.g. "
                        f"kafka-topics.sh --create --topic {settings.audit_topic} --config "
                        "retention.ms=-1; docs/replay.md)"))
    return parse_audit_values(r.value for r in recs)


def release(settings: ReplaySettings, selected: Sequence[QuarantinedRecord], operator: str | None,
            reason: str | None, *, dry_run: bool = False,
            metrics: ReplayMetrics | None = None) -> ReleaseReport:
    """Publish ``selected`` to the clean topic and audit each one; see ``plan_release``.

    Every sample ends in one of two states that a rerun reads correctly: released with its audit
    record (a rerun skips it) or not released at all (a rerun releases it). When a step fails
    part-way, the ``ReplayError`` names the samples of each state and any sample whose fate the
    broker never answered; see ``_publish``. ``selected`` is released as given: a caller that
    selected by key should ``require_unambiguous_keys`` first (the command line does), since a
    key can stand for more than one sample.
    """
    operator, reason = require_operator_and_reason(operator, reason)
    audit, unreadable = read_audit(settings)
    # A missing clean topic would be created by a broker that creates topics on first write: the
    # audit trail would say released, and the rerun with the right name would skip the sample.
    require_topic(settings, settings.clean_topic, "release publishes there: check "
                  "DEPOIS_CLEAN_TOPIC (the stream filter's clean topic)")
    plan = plan_release(selected, released_ids(audit))
    failure: ReplayError | None = None
    released = plan.release
    # built (and size-checked) for a dry run too: it must refuse what the real run would refuse
    messages = _messages(settings, plan.release, operator, reason) if plan.release else None
    if not dry_run and messages is not None:
        try:
            _publish(settings, plan.release, messages)
        except ReleaseIncomplete as exc:
            failure, released = exc, exc.released
    skipped = _group_skips(plan.skipped)
    report = ReleaseReport(
        dry_run=dry_run, released=[r.sample_id for r in released],
        release_ids=[r.release_id for r in released],
        skipped={why: [r.sample_id for r in recs] for why, recs in skipped.items()},
        skipped_release_ids={why: [r.release_id for r in recs] for why, recs in skipped.items()},
        unreadable_audit_records=unreadable,
    )
    if metrics is not None:
        outcome = "dry_run" if dry_run else "released"
        metrics.replay_outcomes.labels(action="release", outcome=outcome).inc(len(released))
        for why, ids in report.skipped.items():
            metrics.replay_outcomes.labels(action="release", outcome=f"skipped_{why}").inc(len(ids))
        if failure is not None:
            metrics.replay_outcomes.labels(action="release", outcome="failed").inc(
                len(plan.release) - len(released))
    if failure is not None:
        raise failure
    return report


class ReleaseIncomplete(ReplayError):
    """A release that stopped part-way; ``released`` went out with their audit records."""

    def __init__(self, message: str, released: list[QuarantinedRecord]) -> None:
        super().__init__(message)
        self.released = released


def _group_skips(skipped: list[tuple[QuarantinedRecord, SkipReason]]
                 ) -> dict[str, list[QuarantinedRecord]]:
    out: dict[str, list[QuarantinedRecord]] = {}
    for r, why in skipped:
        out.setdefault(why, []).append(r)
    return out


# An estimate of a record's size on the wire beyond key, value and headers (record batch
# framing), generous so that a record refused before anything is sent is one kafka-python would
# refuse too.
_RECORD_OVERHEAD = 128


@dataclass(frozen=True)
class _Messages:
    """What a release sends: per sample its clean copy and its audit record, and the producer's
    options they were sized for."""

    copies: list[Message]
    audits: list[Message]
    copy_sizes: list[int]  # message_size of each copy: the size check and the chunks read it
    producer_options: dict[str, Any]


def _messages(settings: ReplaySettings, records: Sequence[QuarantinedRecord], operator: str,
              reason: str) -> _Messages:
    """Every clean copy and audit record of ``records``, built and size-checked before anything
    is sent (and on a dry run, which must refuse what the real run would): a sample whose audit
    record cannot be written (a header value the audit schema refuses) or would be too large
    stops the release here, not after its copy went out."""
    released_at = utc_now_iso()
    copies: list[Message] = [(r.key, r.value, release_headers(r, operator, reason, released_at))
                             for r in records]
    audits: list[Message] = []
    for r in records:
        try:
            audits.append((r.sample_id.encode("utf-8"), audit_record_for(
                r, operator, reason, released_at, settings.clean_topic).to_bytes(), []))
        except ValidationError as exc:
            raise ReplayError(f"{_named(r)} cannot be audited ({describe_errors(exc)}); "
                              "nothing was released: leave it out of the selection") from None
    producer_options = {"delivery_timeout_ms": 60_000, **settings.client_options(KafkaProducer)}
    copy_sizes = [message_size(c) for c in copies]
    _refuse_oversized(records, copy_sizes, [message_size(a) for a in audits], settings,
                      int(producer_options.get("max_request_size", 1_048_576)))
    return _Messages(copies, audits, copy_sizes, producer_options)


def _publish(settings: ReplaySettings, records: Sequence[QuarantinedRecord],
             messages: _Messages) -> None:
    """Chunk by chunk (see ``release_chunks``): the chunk's clean copies, then an audit record
    for each copy the broker acknowledged, then the next chunk.

    A record handed to a Kafka producer cannot be taken back (closing it delivers what is
    queued), so a failure part-way does not stop at an exception: every copy is followed to its
    answer and exactly the acknowledged ones are audited, so a rerun skips them and releases the
    rest. A chunk that did not go out whole ends the release: later chunks are not sent. Copies
    the client would refuse for their size are refused before anything is sent. What stays
    unknown (no answer within the delivery timeout) or released without its audit record (the
    audit write failed) is named in the error, because a rerun would release it again. Sending
    all copies before any audit record would widen that last state, for a process killed between
    the two phases, to every copy sent; chunks bound it to one chunk.
    """
    copies, audits, producer_options = messages.copies, messages.audits, messages.producer_options
    wait_s = producer_options["delivery_timeout_ms"] / 1000 + 10
    clean, audited = Sent.nothing(), Sent.nothing()
    with _kafka_errors(settings.bootstrap_servers):
        producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                                 client_id=CLIENT_ID, **producer_options)
        try:
            for part in release_chunks(messages.copy_sizes):
                out = _send_all(producer, settings.clean_topic, copies[part.start:part.stop],
                                wait_s)
                logged = _send_all(producer, settings.audit_topic,
                                   [audits[part.start + i] for i in out.acknowledged], wait_s)
                audited = audited.then(logged, len(clean.acknowledged))
                clean = clean.then(out, part.start)
                if not (out.complete and logged.complete):
                    rest = range(part.stop, len(records))
                    clean = clean.then(Sent([], {}, list(rest), {}), 0)
                    break
        finally:
            _close(producer, gave_up=bool(clean.unknown or audited.unknown))
    if not (clean.complete and audited.complete):
        raise ReleaseIncomplete(_incomplete(records, clean, audited, settings.clean_topic),
                                [records[clean.acknowledged[i]] for i in audited.acknowledged])


# How many samples a release sends before it writes their audit records: a process killed in
# between leaves at most one chunk of copies without audit records (a rerun releases those
# again). The byte bound caps what one chunk holds in the client's memory, and what a kill can
# leave unaudited, when the records are large.
RELEASE_CHUNK = 100
RELEASE_CHUNK_BYTES = 16 * 1024 * 1024


def release_chunks(sizes: Sequence[int], max_count: int = RELEASE_CHUNK,
                   max_bytes: int = RELEASE_CHUNK_BYTES) -> list[range]:
    """Consecutive ranges of message positions, in order, covering all of ``sizes``: each holds
    at most ``max_count`` messages and ``max_bytes`` (a single larger message is a chunk of
    its own)."""
    out: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_count or total + size > max_bytes):
            out.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


# How long a release that gave up on some of the broker's answers waits for its producer to
# close (the delivery timeout has already been waited out by then).
_CLOSE_S = 5.0


def _close(producer: KafkaProducer, gave_up: bool) -> None:
    """Close the producer; ``gave_up``: some records have no answer, and none is awaited now.

    kafka-python's close(timeout) flushes first and raises from that flush when answers are
    missing, before it force-closes its I/O thread and marks itself closed: the producer stays
    open, and its __del__ closes it again at exit and prints a traceback under replay's
    one-line error. So, having given up, the I/O thread is told to drop what it still holds
    (``force_close``: those records are reported as without a definite answer) before the
    close, and the producer is marked closed should the close still fail.
    """
    try:
        sender = getattr(producer, "_sender", None)
        if gave_up and sender is not None:
            sender.force_close()
        producer.close(timeout=_CLOSE_S if gave_up else None)
    except KafkaError:
        producer._closed = True  # kafka-python's own flag: its __del__ and close() do nothing


def _incomplete(records: Sequence[QuarantinedRecord], clean: Sent, audited: Sent,
                clean_topic: str) -> str:
    """The error of a release that stopped part-way: each selected sample in the state a rerun
    must know (``audited`` indexes the acknowledged clean copies, in order)."""
    out = [records[i] for i in clean.acknowledged]

    def names(idx: Iterable[int], recs: Sequence[QuarantinedRecord]) -> str:
        return ", ".join(_named(recs[i]) for i in idx)

    parts = []
    if audited.acknowledged:
        parts.append(f"released {len(audited.acknowledged)} of {len(records)} with their audit "
                     f"records (a rerun skips them): {names(audited.acknowledged, out)}")
    lost_audit = sorted(set(range(len(out))) - set(audited.acknowledged))
    if lost_audit:
        why = audited.first_error or next(iter(audited.unknown.values()), "not sent")
        parts.append(f"RELEASED WITHOUT A CONFIRMED AUDIT RECORD ({why}; "
                     f"a rerun would release them again, write them down): {names(lost_audit, out)}")
    if clean.failed:
        parts.append(f"not released ({clean.first_error}): {names(sorted(clean.failed), records)}")
    if clean.unsent:
        parts.append("not sent (a release stops at its first failure, a rerun releases them): "
                     f"{names(sorted(clean.unsent), records)}")
    if clean.unknown:
        why = next(iter(clean.unknown.values()))
        parts.append(f"no definite answer from the broker ({why}), so possibly on "
                     f"{clean_topic} without an audit record (look there before a "
                     f"rerun): {names(clean.unknown, records)}")
    return "release stopped part-way: " + "; ".join(parts)


def _named(r: QuarantinedRecord) -> str:
    """A sample in an error line: its key (bounded, escaped) and, when that is not already it,
    its release id (keys repeat; release ids do not)."""
    name, rid = shown(r.sample_id), shown(r.release_id, RELEASE_ID_CHARS)
    return name if r.sample_id == r.release_id else f"{name} ({rid})"


def message_size(message: Message) -> int:
    """An upper estimate of ``message``'s size on the wire, as the producer's max_request_size
    counts it: key, value, headers and record framing."""
    key, value, headers = message
    return (len(key or b"") + len(value or b"") + _RECORD_OVERHEAD
            + sum(len(k.encode("utf-8", "surrogatepass")) + len(v) + H.HEADER_OVERHEAD
                  for k, v in headers))


def _refuse_oversized(records: Sequence[QuarantinedRecord], copy_sizes: Sequence[int],
                      audit_sizes: Sequence[int], settings: ReplaySettings,
                      max_request_size: int) -> None:
    """Refuse the whole release before anything is sent when a clean copy or an audit record
    is larger than the producer will send. The audit record matters as much as the copy: it
    carries the key twice (Kafka key and sample_id), so a long key can fit the copy but not its
    audit record, and a copy out without its audit record is released again by every rerun."""
    for r, copy_size, audit_size in zip(records, copy_sizes, audit_sizes):
        for what, topic, size in (("its clean copy", settings.clean_topic, copy_size),
                                  ("its audit record", settings.audit_topic, audit_size)):
            if size > max_request_size:
                raise ReplayError(
                    f"{_named(r)}: {what} would be about {size} bytes, over the producer's "
                    f"max_request_size of {max_request_size}; nothing was released. Raise it for "
                    "replay with DEPOIS_KAFKA='{\"max_request_size\": N}' (the max.message.bytes "
                    f"of {topic} must allow it too), or leave that sample out of the selection")


@dataclass(frozen=True)
class Sent:
    """What became of each message of one ``_send_all``, by position."""

    acknowledged: list[int]
    failed: dict[int, str]  # refused for good, and why: not written
    unsent: list[int]  # never handed to the client: an earlier send was refused at once
    unknown: dict[int, str]  # no answer, or a timeout or retriable error: maybe written

    @property
    def complete(self) -> bool:
        return not (self.failed or self.unsent or self.unknown)

    @classmethod
    def nothing(cls) -> Sent:
        return cls([], {}, [], {})

    def then(self, other: Sent, shift: int) -> Sent:
        """This outcome followed by ``other``'s, whose positions start at ``shift`` (a release
        sends chunk by chunk; its error speaks of positions in the whole selection)."""
        return Sent(self.acknowledged + [i + shift for i in other.acknowledged],
                    {**self.failed, **{i + shift: why for i, why in other.failed.items()}},
                    self.unsent + [i + shift for i in other.unsent],
                    {**self.unknown, **{i + shift: why for i, why in other.unknown.items()}})

    @property
    def first_error(self) -> str | None:
        return self.failed[min(self.failed)] if self.failed else None


def _send_all(producer: KafkaProducer, topic: str, messages: Sequence[Message],
              wait_s: float) -> Sent:
    """Hand the messages over in order, stop at the first one refused at once, and wait for
    the broker's answer to every one handed over (the delivery timeout bounds that wait)."""
    futures = []
    failed: dict[int, str] = {}
    for i, (key, value, headers) in enumerate(messages):
        try:
            futures.append(producer.send(topic, key=key, value=value, headers=headers))
        except (KafkaError, TypeError, ValueError, AssertionError) as exc:
            failed[i] = _why(exc)
            break
    try:
        producer.flush(timeout=wait_s)
    except KafkaError:  # a timeout: the futures say which answers are missing
        pass
    acknowledged: list[int] = []
    unknown: dict[int, str] = {}
    for i, f in enumerate(futures):
        if not f.is_done:
            unknown[i] = f"no answer within {wait_s:.0f} s"
        elif f.succeeded():
            acknowledged.append(i)
        elif _maybe_written(f.exception):
            unknown[i] = _why(f.exception)
        else:
            failed[i] = _why(f.exception)
    first_unsent = len(futures) + (1 if len(futures) in failed else 0)
    return Sent(acknowledged, failed, list(range(first_unsent, len(messages))), unknown)


def _maybe_written(exc: BaseException | None) -> bool:
    """A batch that expired or failed for a passing reason may still have been written by the
    broker (kafka-python expires a batch already sent once the delivery timeout has passed):
    only a definite refusal, such as a record too large, means it is not on the topic."""
    return isinstance(exc, KafkaTimeoutError) or bool(getattr(exc, "retriable", False))


def _why(exc: BaseException | None) -> str:
    return shown(f"{type(exc).__name__}: {exc}" if exc is not None else "no reason given", 200,
                 note=False)
