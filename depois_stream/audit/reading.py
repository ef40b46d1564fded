"""Reading topics back for replay: thin and conservative Kafka I/O.

It reads with manual ``assign()`` and no group id, so it can never commit, and therefore never
move, the live consumer's offsets, whatever topic or group the operator points it at.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, KafkaTimeoutError

from depois_stream.audit.records import QuarantinedRecord, ReadWindow, ReplayError
from depois_stream.audit.settings import CLIENT_ID, ReplaySettings
from depois_stream.audit.trail import AuditRecord, parse_audit_values
from depois_stream.filter.clients.base import ClientError, construct
from depois_stream.filter.clients.kafka_python_parsing import (
    bound_decompression, raised_by_parser, skip_unreadable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# kafka-python's own bound on its first bootstrap where a caller sets none, and how much longer
# a client being made is waited for (a healthy bootstrap ends well inside its bound)
DEFAULT_BOOTSTRAP_MS = 30_000
BOOTSTRAP_GRACE_S = 5.0


@dataclass(frozen=True)
class Unread:
    """A record kafka-python could not parse (a header name that is not UTF-8, a bad CRC, a
    batch that does not decompress) and the read left out: its bytes stay in the topic."""

    topic: str
    partition: int
    offset: int
    why: str


def describe_unread(unread: list[Unread], shown: int = 10) -> str:
    """One warning line for what a read left out (empty when nothing was), each reason once."""
    if not unread:
        return ""
    n, topic = len(unread), unread[0].topic
    where = ", ".join(f"[{u.partition}]@{u.offset}" for u in unread[:shown])
    more = f" and {n - shown} more" if n > shown else ""
    whys = list(dict.fromkeys(u.why for u in unread))
    why = "; ".join(whys[:3]) + (f"; and {len(whys) - 3} other reasons" if len(whys) > 3 else "")
    hint = (" (a confluent-kafka consumer reads a record whose header name is not UTF-8)"
            if any("UnicodeDecodeError" in w for w in whys) else "")
    return (f"{n} record{'s' if n > 1 else ''} of {topic!r} could not be read and "
            f"{'are' if n > 1 else 'is'} left out: {where}{more} ({why}); the bytes stay in the "
            f"topic at those offsets{hint}")


@contextmanager
def kafka_errors(bootstrap: str) -> Iterator[None]:
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
    bound_decompression()  # a compression bomb in a topic read back must not exhaust memory
    return bootstrapped(lambda: KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", client_id=CLIENT_ID, **options), options, "reader")


def bootstrapped(make: Callable[[], T], options: Mapping[str, Any], what: str) -> T:
    """A kafka-python client made within its own ``bootstrap_timeout_ms`` (plus a grace), not
    later: once a connection is open it waits on it past that bound (a TLS hello a plaintext
    listener never answers: `replay list` printed nothing for 400 s). Raises KafkaTimeoutError,
    which ``kafka_errors`` turns into the one line that names the security options."""
    bound_s = options.get("bootstrap_timeout_ms", DEFAULT_BOOTSTRAP_MS) / 1000 + BOOTSTRAP_GRACE_S
    try:
        return construct(make, bound_s, f"kafka-python {what}")
    except ClientError as exc:
        raise KafkaTimeoutError(str(exc)) from None


def read_raw(bootstrap: str, topic: str, window: ReadWindow | None = None, *,
             kafka: dict[str, Any] | None = None, timeout_s: float = 60.0,
             missing_hint: str = "check --topic and DEPOIS_BOOTSTRAP_SERVERS",
             grace_s: float = 0.5, unread: list[Unread] | None = None) -> list[ConsumerRecord]:
    """Read ``window`` of ``topic`` (all of it by default) and return kafka ConsumerRecords.

    A record kafka-python cannot parse is left out, not the whole read: it is appended to
    ``unread`` when a list is given (the CLI prints it), logged as a warning otherwise.
    (kafka-python parses a record batch from its start, so the records after it in the same
    producer batch are left out with it; other batches are read as usual.)

    Reading stops once every partition reached the end offset snapshotted at start and one
    poll came back empty, or ``grace_s`` after that when the topic is written to as it is read.
    The end offset cannot be trusted alone: Tansu reports the base offset of a partition's last
    batch, so a large last batch lies past it. Records written before the read began are part of
    the read: while polls still return some, no grace applies (``timeout_s`` bounds the read,
    with an error, never a silently shorter result). On Kafka the extra poll costs one poll.
    """
    window = window or ReadWindow()
    kafka = dict(kafka or {})
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:
        # kafka-python waits this long for a first broker (30 s) before any read can time out.
        default_ms = KafkaConsumer.DEFAULT_CONFIG["bootstrap_timeout_ms"]
        kafka.setdefault("bootstrap_timeout_ms", int(min(timeout_s * 1000, default_ms)))
    with kafka_errors(bootstrap):
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
            left_out: list[Unread] = [] if unread is None else unread
            got = _drain(consumer, tps, stops, window, timeout_s, grace_s, bootstrap=bootstrap,
                         unread=left_out)
        finally:
            consumer.close(autocommit=False)
    if unread is None and left_out:
        log.warning("%s", describe_unread(left_out))
    return got


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
    with kafka_errors(settings.bootstrap_servers):
        consumer = _consumer(settings.bootstrap_servers, settings.client_options(KafkaConsumer))
        try:
            _partitions(consumer, settings.bootstrap_servers, topic, missing_hint)
        finally:
            consumer.close(autocommit=False)


def _drain(consumer: KafkaConsumer, tps: list[TopicPartition], stops: dict[TopicPartition, int],
           window: ReadWindow, timeout_s: float, grace_s: float, *,
           bootstrap: str = "", unread: list[Unread] | None = None) -> list[ConsumerRecord]:
    unread = [] if unread is None else unread  # what could not be parsed (see read_raw)
    out: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    began_ms = time.time() * 1000
    caught_up_at: float | None = None
    while True:
        try:
            batch = consumer.poll(timeout_ms=200)
        except Exception as exc:  # noqa: BLE001 - only the parser's errors are handled here
            if not raised_by_parser(exc):
                raise
            try:
                tp, offsets, why = skip_unreadable(consumer, exc)
            except Exception as err:  # noqa: BLE001 - kafka-python's state is not as tested
                raise exc from err
            unread += [Unread(tp.topic, tp.partition, o, why) for o in offsets
                       if o < stops[tp]]  # past the snapshot: not part of this read
            batch = {}
        older = False  # a record written before the read began: the snapshot is not read yet
        for recs in batch.values():
            out.extend(r for r in recs if window.contains(r.partition, r.offset, r.timestamp))
            older = older or any(r.timestamp < began_ms for r in recs)
        now = time.monotonic()
        if caught_up_at is None and all(consumer.position(tp) >= stops[tp] for tp in tps):
            caught_up_at = now
        if caught_up_at is not None and older:
            caught_up_at = now  # the grace counts from the last of the snapshot's records
        if caught_up_at is not None and (not batch or now - caught_up_at > grace_s):
            return out
        if now > deadline:
            if bootstrap and not _accepts_connections(bootstrap):
                raise ReplayError(f"reading {tps[0].topic!r} stopped: the broker at {bootstrap} "
                                  "no longer accepts connections; nothing was changed, run the "
                                  "command again once it is back")
            raise ReplayError(f"reading {tps[0].topic!r} did not reach its end within "
                              f"{timeout_s} s; narrow the window (--since/--offsets) or raise "
                              "DEPOIS_READ_TIMEOUT_S")


def _accepts_connections(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """Whether any bootstrap server accepts a TCP connection (a frozen broker still does: only
    a broker that is gone is told apart from a slow read)."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().split("//")[-1].rpartition(":")  # PLAINTEXT://h:p too
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


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
                    topic: str | None = None, unread: list[Unread] | None = None
                    ) -> list[QuarantinedRecord]:
    """Records of the quarantine topic (or ``topic``) in time order, as a reviewer reads them
    (``unread``: see ``read_raw``)."""
    recs = read_raw(settings.bootstrap_servers, topic or settings.quarantine_topic, window,
                    kafka=settings.client_options(KafkaConsumer),
                    timeout_s=settings.read_timeout_s, unread=unread)
    return [QuarantinedRecord.from_kafka(r.topic, r.partition, r.offset, r.timestamp, r.key,
                                         r.value, r.headers)
            for r in sorted(recs, key=lambda r: (r.timestamp, r.partition, r.offset))]


def read_audit(settings: ReplaySettings) -> tuple[list[AuditRecord], int]:
    """All audit records (and how many values were unreadable).

    The audit topic must exist. It is release's memory: read as empty, a mistyped
    ``DEPOIS_AUDIT_TOPIC`` would make every earlier release releasable again (and a broker that
    creates topics on first write would keep the typo's own, separate memory from then on).
    """
    unread: list[Unread] = []
    recs = read_raw(settings.bootstrap_servers, settings.audit_topic,
                    kafka=settings.client_options(KafkaConsumer), unread=unread,
                    timeout_s=settings.read_timeout_s, missing_hint=(
                        "release reads it to refuse samples released before: check "
                        "DEPOIS_AUDIT_TOPIC, or create it once with unlimited retention (e.g. "
                        f"kafka-topics.sh --create --topic {settings.audit_topic} --config "
                        "retention.ms=-1; docs/replay.md)"))
    if unread:
        # Not counted and passed over like a value that does not parse: a record that cannot
        # be read may be a whole producer batch of releases, which would be released again.
        raise ReplayError(f"the audit topic cannot be read whole: {describe_unread(unread)}; "
                          "release refuses to run without its memory of earlier releases (read "
                          "those records with a confluent-kafka consumer and take them to the "
                          "Kafka operators)")
    return parse_audit_values(r.value for r in recs)
