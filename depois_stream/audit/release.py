"""Releasing quarantined records to the clean topic with an audit trail.

``plan_release`` decides per record (pure: the loop guard, idempotence, what a released copy
carries); ``release`` publishes the plan and audits each sample so that a rerun after any
failure reads every sample's state correctly.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from pydantic import BaseModel, ValidationError

from depois_stream.audit.export import common_shape
from depois_stream.audit.metrics import ReplayMetrics
from depois_stream.audit.reading import bootstrapped, kafka_errors, read_audit, require_topic
from depois_stream.audit.records import RELEASE_ID_CHARS, QuarantinedRecord, ReplayError, shown
from depois_stream.audit.settings import CLIENT_ID, ReplaySettings
from depois_stream.audit.trail import AuditRecord, released_ids
from depois_stream.contract import headers as H
from depois_stream.contract import utc_now_iso
from depois_stream.contract.headers import Header
from depois_stream.contract.wire import DecodeError, decode_image
from depois_stream.filter.config import describe_errors

Message = tuple[bytes | None, bytes | None, list[Header]]  # key, value, headers

SkipReason = Literal["already_released", "loop_guard", "not_quarantined", "no_value",
                     "repeated_headers", "undecodable", "conflicting_copies", "duplicate"]


# ---------------------------------------------------------------- release planning (pure)

@dataclass
class ReleasePlan:
    release: list[QuarantinedRecord]
    skipped: list[tuple[QuarantinedRecord, SkipReason]]


def plan_release(records: Iterable[QuarantinedRecord], already_released: set[str],
                 undecodable: Collection[int] = (),
                 copies: Iterable[QuarantinedRecord] = ()) -> ReleasePlan:
    """Decide per selected record whether it may go to the clean topic.

    Records are identified by ``release_id`` (the ingest record they came from), never by key.
    Refused: records with a release on the audit topic (idempotence), records that were already
    released once (replay_count >= 1: a loop guard should a released copy ever be routed back;
    a count the filter never writes, such as -1, is held back too),
    records that are not quarantine verdicts (dead letters cannot be decoded downstream),
    records without a value (a tombstone written by hand: released, it would delete the key's
    sample from a compacted clean topic) and a second copy of the same ingest record in the
    selection (at-least-once delivery can write one ingest record to quarantine twice), and
    records with a ``depois.*`` header more than once (``repeated_headers``: the filter writes
    each once and drops producers' own, and a clean copy forwarding both would let a consumer
    that reads the last one take another sample's provenance).
    ``undecodable``: positions of records whose value the filter could not have decoded (see
    ``undecodable_records``): a record written to the quarantine topic by hand, not by the
    filter, must not reach the training topic. Copies of one ingest record whose values differ
    are all skipped (``conflicting_copies``): at-least-once copies are identical. ``copies``:
    every quarantine record read besides the selection (the command line passes its whole read
    window), so a filter option cannot select a forged copy and leave the genuine one out.
    """
    records = list(records)
    # At-least-once delivery writes identical copies of one ingest record; copies that differ
    # mean one was not written by the filter (a forged provenance): release neither.
    values: dict[str, set[bytes | None]] = {}
    for r in records:
        values.setdefault(r.release_id, set()).add(r.value)
    for r in copies:
        if r.release_id in values and r.verdict == H.VERDICT_QUARANTINE:
            values[r.release_id].add(r.value)
    conflicting = {sid for sid, v in values.items() if len(v) > 1}
    plan = ReleasePlan(release=[], skipped=[])
    seen: set[str] = set()
    for i, r in enumerate(records):
        sid = r.release_id
        why: SkipReason | None = None
        if sid in already_released:
            why = "already_released"
        elif r.replay_count != 0:  # released before, or a count the filter never writes
            why = "loop_guard"
        elif r.verdict != H.VERDICT_QUARANTINE:
            why = "not_quarantined"
        elif r.value is None:
            why = "no_value"
        elif r.repeated_router_headers:
            why = "repeated_headers"
        elif i in undecodable:
            why = "undecodable"
        elif sid in conflicting:
            why = "conflicting_copies"
        elif sid in seen:
            why = "duplicate"
        if why is None:
            seen.add(sid)
            plan.release.append(r)
        else:
            plan.skipped.append((r, why))
    return plan


def undecodable_records(records: Sequence[QuarantinedRecord]) -> set[int]:
    """Positions of the records the stream filter would have dead-lettered: values that do not
    decode (garbage, NaN or out-of-range pixels), a shape other than most of the selection's
    (no model at hand: the one ``export`` holds to), or a label in the value that is not the
    ``depois.label`` header the filter wrote from it."""
    bad: set[int] = set()
    shapes: dict[int, tuple[int, ...]] = {}
    for i, r in enumerate(records):  # one image at a time: a selection can be large
        if r.value is None:
            continue  # skipped as no_value
        try:
            _, label, image = decode_image(r.value, r.content_type)
        except DecodeError:
            bad.add(i)
            continue
        shapes[i] = image.shape
        # the filter writes the value's label as a decimal integer; a header that says
        # anything else (another label, or text that is no label at all) is not the filter's
        if r.h.get(H.LABEL) is not None and r.h[H.LABEL] != str(label):
            bad.add(i)
    common = common_shape(list(shapes.values()))
    return bad | {i for i, shape in shapes.items() if shape != common}


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


def release(settings: ReplaySettings, selected: Sequence[QuarantinedRecord], operator: str | None,
            reason: str | None, *, dry_run: bool = False,
            metrics: ReplayMetrics | None = None,
            stop: threading.Event | None = None,
            read: Sequence[QuarantinedRecord] = ()) -> ReleaseReport:
    """Publish ``selected`` to the clean topic and audit each one; see ``plan_release``.

    Every sample ends in one of two states that a rerun reads correctly: released with its audit
    record (a rerun skips it) or not released at all (a rerun releases it). When a step fails
    part-way, the ``ReplayError`` names the samples of each state and any sample whose fate the
    broker never answered; see ``_publish``. ``selected`` is released as given: a caller that
    selected by key should ``require_unambiguous_keys`` first (the command line does), since a
    key can stand for more than one sample. ``stop``: once set, the chunk in flight finishes
    (its copies and their audit records) and the release stops there, reported like a failure
    part-way (the command line sets it on SIGINT and SIGTERM). ``read``: every record read
    with the selection (before its filters), checked for copies that conflict with it.
    """
    operator, reason = require_operator_and_reason(operator, reason)
    audit, unreadable = read_audit(settings)
    # A missing clean topic would be created by a broker that creates topics on first write: the
    # audit trail would say released, and the rerun with the right name would skip the sample.
    require_topic(settings, settings.clean_topic, "release publishes there: check "
                  "DEPOIS_CLEAN_TOPIC (the stream filter's clean topic)")
    plan = plan_release(selected, released_ids(audit), undecodable_records(selected), read)
    failure: ReplayError | None = None
    released = plan.release
    # built (and size-checked) for a dry run too: it must refuse what the real run would refuse
    messages = _messages(settings, plan.release, operator, reason) if plan.release else None
    if not dry_run and messages is not None:
        try:
            _publish(settings, plan.release, messages, stop)
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
             messages: _Messages, stop: threading.Event | None = None) -> None:
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
    stopped: str | None = None
    with kafka_errors(settings.bootstrap_servers):
        producer = bootstrapped(lambda: KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, acks="all", client_id=CLIENT_ID,
            **producer_options), producer_options, "producer")
        try:
            for part in release_chunks(messages.copy_sizes):
                if stop is not None and stop.is_set():  # between chunks: nothing half-done
                    stopped = "stopped on request"
                    clean = clean.then(Sent([], {}, list(range(part.start, len(records))), {}), 0)
                    break
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
        raise ReleaseIncomplete(_incomplete(records, clean, audited, settings.clean_topic,
                                            stopped),
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
                clean_topic: str, stopped: str | None = None) -> str:
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
        why = stopped or "a release stops at its first failure"
        parts.append(f"not sent ({why}, a rerun releases them): "
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
