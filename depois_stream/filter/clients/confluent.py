"""confluent-kafka (librdkafka) behind the client seam: ``pip install 'depois-stream[fast]'``.

librdkafka consumes, batches, compresses and sends on its own C threads, so the Python main
loop only hands records over and collects reports. Its rebalance, commit and delivery callbacks
all run inside ``consume()``/``poll()``/``flush()`` on the calling thread, which is exactly where
the filter's source and delivery code expect them. The exceptions are the calls that wait on the
broker without a usable timeout (transactional calls, a synchronous commit, closing the
consumer): each runs on a short-lived thread and is abandoned if it has not returned in time
(``call_bounded``). The caller waits for it, so callbacks served inside it (delivery reports in
``commit_transaction``, revocations in ``close``) normally run while the main thread is idle; an
abandoned call may still run some later, which is safe because delivery reports only append to a
queue (``Delivery._report`` must stay append-only) and the source takes its lock.

Pass-through options use librdkafka's dotted names (``security.protocol``, ``sasl.mechanisms``,
``ssl.ca.location``); the common kafka-python names (``security_protocol``, ``sasl_mechanism``,
``sasl_plain_username``, ``ssl_cafile``, ...) are translated, so one config file works with
either client.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

import numpy as np
from confluent_kafka import (
    Consumer, IsolationLevel, KafkaError, KafkaException, Message, Producer, TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from depois_stream.filter.clients.base import (
    SHUTDOWN_STEP_S, TP, AssignCallback, ClientError, ClientSettings, CommitCallback,
    DeliveryCallback, Header, MissingTopic, ProduceError, RecordBatch, RevokeCallback, TransactionGuard,
    Unreadable, call_bounded,
)
from depois_stream.filter.clients.kafka_python import second_opinion

log = logging.getLogger(__name__)
rdkafka_log = logging.getLogger("librdkafka")

NAME = "confluent-kafka"

TRANSLATE = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanisms",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "ssl_ciphers": "ssl.cipher.suites",
    "sasl_kerberos_service_name": "sasl.kerberos.service.name",
    "max_request_size": "message.max.bytes",
    "fetch_max_wait_ms": "fetch.wait.max.ms",
    "request_timeout_ms": "request.timeout.ms",
}
OWNED = frozenset({
    "bootstrap.servers", "client.id", "group.id", "enable.auto.commit",
    "enable.auto.offset.store", "enable.idempotence", "acks", "request.required.acks",
    "transactional.id", "isolation.level", "auto.offset.reset", "session.timeout.ms",
    "heartbeat.interval.ms", "message.timeout.ms", "delivery.timeout.ms", "linger.ms",
    "queue.buffering.max.ms", "on_commit", "on_delivery", "logger", "error_cb",
})
# kafka-python's max_request_size default (1 MiB), not librdkafka's 1,000,000: a record's route
# must not depend on --client (records between the two were dead-lettered by this client only).
_DEFAULT_MESSAGE_MAX_BYTES = 1_048_576
_FRAMING = 16 * 1024
PRODUCER_LINGER_MS = 5
MAX_BLOCK_S = 10.0  # how long send() waits for room in a full local queue
FETCH_WAIT_MAX_MS = 100  # as kafka_python.FETCH_MAX_WAIT_MS: bounded latency on any broker
TOPIC_ID_EVERY_S = 2.0  # how often the consumer asks for its topic's id (one metadata request)
TOPIC_ID_WARN_S = 60.0  # unknown this long: one WARNING


def topic_id_text(ident: Any) -> str | None:
    """A librdkafka ``Uuid`` as text, or None for no id: None, or the all-zero id a broker
    gives below Metadata v10 (kafka-python turns that one into None as well)."""
    if ident is None:
        return None
    if ident.get_most_significant_bits() == 0 and ident.get_least_significant_bits() == 0:
        return None
    return str(ident)


def translate(options: Mapping[str, Any]) -> dict[str, Any]:
    """kafka-python's names for the common security and size options -> librdkafka's, so one
    ``DEPOIS_KAFKA`` serves ``run`` with either client and ``replay``/``produce`` (kafka-python)."""
    out = {TRANSLATE.get(k, k): v for k, v in options.items() if k != "ssl_check_hostname"}
    if "ssl_check_hostname" in options:
        out["ssl.endpoint.identification.algorithm"] = (
            "https" if _flag("ssl_check_hostname", options["ssl_check_hostname"]) else "none")
    return out


def kafka_python_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` in kafka-python's names, for the kafka-python reader of a second opinion
    (``ConfluentConsumer.unreadable_at``): librdkafka's names of the common security options
    (the reverse of ``TRANSLATE``) become kafka-python's; the rest is left as given.
    ValueError names a security property that has no kafka-python equivalent here (OAUTHBEARER,
    Kerberos keytabs, ...): a reader without it would connect unauthenticated."""
    back = {dotted: name for name, dotted in TRANSLATE.items()}
    out = {back.get(k, k): v for k, v in options.items()
           if k != "ssl.endpoint.identification.algorithm"}
    if "ssl.endpoint.identification.algorithm" in options:
        out["ssl_check_hostname"] = str(options["ssl.endpoint.identification.algorithm"]).lower() != "none"
    unmapped = sorted(k for k in out if k.startswith(("sasl.", "ssl.")))
    if unmapped:
        raise ValueError(f"{', '.join(unmapped)} has no kafka-python equivalent")
    return out


def _as_given(options: Mapping[str, Any], error: str) -> str:
    """`` (given as NAME)`` when librdkafka's error names a property the user set under its
    kafka-python name (``max_request_size`` is ``message.max.bytes`` to librdkafka), else ''."""
    given = [name for name, dotted in TRANSLATE.items() if name in options and f'"{dotted}"' in error]
    return f" (given as {given[0]})" if given else ""


def _flag(name: str, value: Any) -> bool:
    """A boolean option's value; anything unclear is refused rather than read as false (for a
    security check, a typo must not turn it off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: use true or false")


# librdkafka warns about (and ignores) a property given to the wrong kind of handle; one
# pass-through dict serves all three handles, so each gets the properties of its kind only.
_CONSUMER_PREFIXES = ("fetch.", "max.poll.interval.ms", "partition.assignment.strategy",
                      "group.", "enable.partition.eof", "check.crcs", "queued.",
                      "auto.commit.", "coordinator.query.interval.ms", "allow.auto.create.topics")
_PRODUCER_PREFIXES = ("batch.", "compression.", "queue.buffering.", "retries", "retry.backoff",
                      "message.send.max.retries", "sticky.partitioning", "partitioner",
                      "enable.gapless.guarantee", "transaction.timeout.ms", "request.timeout.ms",
                      "message.max.bytes")


def _refuse_incremental_rebalancing(conf: Mapping[str, Any]) -> None:
    """The filter takes and hands back whole assignments (``assign``/``unassign``, eager
    rebalancing: ``Source`` rewinds and settles per assignment). librdkafka's cooperative
    assignor and the KIP-848 group protocol hand out increments instead, and refuse ``assign``
    at the first rebalance: refused here, at start-up, rather than there."""
    strategy = str(conf.get("partition.assignment.strategy", "")).lower()
    if "cooperative" in strategy:
        raise ValueError(f"partition.assignment.strategy={strategy}: incremental (cooperative) "
                         "rebalancing is not supported; use range or roundrobin (the default "
                         "is range,roundrobin)")
    protocol = str(conf.get("group.protocol", "classic")).lower()
    if protocol != "classic":
        raise ValueError(f"group.protocol={protocol}: its rebalancing is incremental, which is "
                         "not supported; use classic (the default)")


def _consumer_only(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if not k.startswith(_PRODUCER_PREFIXES)}


def _producer_only(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if not k.startswith(_CONSUMER_PREFIXES)}


def _global_only(options: dict[str, Any]) -> dict[str, Any]:
    return _consumer_only(_producer_only(options))


def _error(err: KafkaError | None, what: str) -> ClientError:
    if err is None:
        return ClientError(what, retriable=True)
    retriable = err.retriable() or err.code() in _TRANSIENT
    return ClientError(f"{what}: {err.str()} ({err.name()})", retriable=retriable)


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    """The KafkaError a KafkaException carries, if any."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


def _exc(exc: KafkaException, what: str) -> ClientError:
    err = _kafka_error(exc)
    return _error(err, what) if err is not None else ClientError(f"{what}: {exc}", True)


# librdkafka marks these non-retriable although waiting is exactly what fixes them.
_TRANSIENT = {KafkaError._TIMED_OUT, KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT,
              KafkaError._ALL_BROKERS_DOWN, KafkaError.REQUEST_TIMED_OUT,
              KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION,
              KafkaError.NETWORK_EXCEPTION, KafkaError._TIMED_OUT_QUEUE}
# The broker (or librdkafka's own size check) will never take these records in this form.
_REJECTED = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE,
             KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD}


def _produce_error(err: KafkaError, what: str) -> ProduceError:
    """Record-level refusals are ``rejected``; a fatal idempotence error is the producer's."""
    if err.code() in _REJECTED:
        return ProduceError(f"{what}: {err.str()} ({err.name()})", False, rejected=True)
    e = _error(err, what)
    return ProduceError(str(e), e.retriable and not err.fatal())


def _produce_exc(exc: KafkaException, what: str) -> ProduceError:
    """``_exc`` for a producer call: the KafkaError it carries as a ``ProduceError``."""
    err = _kafka_error(exc)
    return _produce_error(err, what) if err is not None else ProduceError(f"{what}: {exc}", retriable=True)


def _on_error(err: KafkaError) -> None:
    rdkafka_log.warning("%s (%s)", err.str(), err.name())


def _tps(tps: Iterable[TP]) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t, p in tps]


# Through the C API's generic call path, which checks the result: for a header name that is not
# UTF-8, confluent-kafka's Message.headers() returns a list *with an exception set* (its C code
# does not stop at the failed decode). The interpreter's fast path for method calls does not
# always check for that, so a plain ``m.headers()`` can leave the error pending, to surface a
# few instructions later outside any handler (seen: the filter's thread died); this call
# raises it (as SystemError) right here, every time.
_HEADERS = operator.methodcaller("headers")


# librdkafka's errors for a record batch it fetched but cannot read: each stalls the partition.
_UNREADABLE = frozenset({KafkaError._BAD_COMPRESSION, KafkaError._BAD_MSG})


def _headers(m: Message) -> list[Header] | Unreadable | None:
    """The record's headers, or ``Unreadable`` when confluent-kafka cannot give them."""
    try:
        return _HEADERS(m)
    except Exception as exc:  # noqa: BLE001 - any failure here is this one record's
        cause = exc.__cause__ or exc
        return Unreadable(f"its headers cannot be read ({type(cause).__name__}: {cause}); Kafka "
                          "header names must be UTF-8. Dead-lettered with its key and value, "
                          "without its headers")


class ConfluentConsumer:
    def __init__(self, s: ClientSettings, on_commit: CommitCallback) -> None:
        def committed(err: KafkaError | None, _partitions: object) -> None:
            on_commit(None if err is None else _error(err, "offset commit"))

        self._topic = ""
        self._subscription: dict[str, Any] | None = None  # subscribe()'s callbacks
        self._settings = s
        self._stuck: str | None = None  # a bounded call left running inside librdkafka
        # the topic's id (topic_id): the last answer, the request in flight, when to ask again
        self._topic_id: str | None = None
        self._id_asked: Any = None
        self._id_next = 0.0
        self._id_admin: AdminClient | None = None
        self._id_failing_since: float | None = None
        self._id_warned = False
        # partition -> an offset its position is known to be at or past: the last seek made here
        # (a rewind, a start offset, a skip past an unreadable record). librdkafka reports an
        # unreadable batch at its first offset whatever the position, and position() does not
        # follow seeks, so skipping one offset per poll needs this.
        self._floor: dict[int, int] = {}
        self._reset = s.auto_offset_reset  # where a partition with no position nor commit starts
        # partition -> offset of a seek librdkafka refused because the partition was not
        # fetching yet (``seek``); made at the next poll, before records are handed on
        self._pending_seek: dict[int, int] = {}
        self._c = Consumer({
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
            **_consumer_only(translate(s.options)),
            "bootstrap.servers": s.bootstrap_servers, "client.id": s.client_id,
            "group.id": s.group_id, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": s.auto_offset_reset,
            "session.timeout.ms": s.session_timeout_ms,
            "heartbeat.interval.ms": s.heartbeat_interval_ms,
            "isolation.level": "read_committed" if s.read_committed else "read_uncommitted",
            "on_commit": committed, "logger": rdkafka_log, "error_cb": _on_error,
        })

    def subscribe(self, topic: str, on_assign: AssignCallback, on_revoke: RevokeCallback,
                  on_lost: RevokeCallback) -> None:
        self._topic = topic

        def assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            starts = on_assign([(tp.topic, tp.partition) for tp in partitions])
            for tp in partitions:
                self._floor.pop(tp.partition, None)
                self._pending_seek.pop(tp.partition, None)
                start = starts.get((tp.topic, tp.partition))
                if start is not None:
                    tp.offset = self._floor[tp.partition] = start
            consumer.assign(partitions)
            # A partition kept through a rebalance keeps its pause flag; an assignment starts
            # unpaused (base.Consumer.subscribe), the source pauses it again if it must.
            if partitions:
                consumer.resume(partitions)

        self._subscription = {"on_assign": assign,
                              "on_revoke": lambda _c, ps: self._gone(ps, on_revoke),
                              "on_lost": lambda _c, ps: self._gone(ps, on_lost)}
        self._c.subscribe([topic], **self._subscription)

    def topic_replaced(self) -> None:
        """Subscribe again: librdkafka's group takes a topic that came back under a new id for
        the old one, whose partitions it may have dropped while the topic was missing, and
        refreshes that only with its periodic metadata (5 minutes). Members that rejoined while
        the topic did not exist stayed standbys with no partition, filtering nothing, long
        after it was re-created (an outside drill: 1,980 records, still unfiltered after 6
        minutes). Subscribing again makes the group look again and rebalance."""
        if self._subscription is not None:
            log.info("subscribing to %s again, so that the group sees its new log's partitions",
                     self._topic)
            self._c.unsubscribe()  # the same subscription again is a no-op to librdkafka
            self._c.subscribe([self._topic], **self._subscription)

    def _gone(self, partitions: list[TopicPartition], then: RevokeCallback) -> None:
        for tp in partitions:
            self._pending_seek.pop(tp.partition, None)
        then([(tp.topic, tp.partition) for tp in partitions])

    def poll(self, timeout_s: float, max_records: int) -> RecordBatch:
        """What is there now, up to ``max_records``; waits (at most ``timeout_s``) only when
        nothing is. librdkafka's ``consume(n, timeout)`` would wait for all ``n``: that is the
        linger's job (source.Source), not the client's."""
        self._seek_pending()
        try:
            msgs: list[Message] = self._c.consume(num_messages=max_records, timeout=0)
            if not msgs and timeout_s > 0:
                msgs = self._c.consume(num_messages=1, timeout=timeout_s)
                if msgs and max_records > 1:
                    msgs += self._c.consume(num_messages=max_records - 1, timeout=0)
        except KafkaException as exc:
            raise _exc(exc, "consume") from exc
        if self._pending_seek and msgs:
            # fetched from where the partition started, before the seek could be made
            msgs = [m for m in msgs if m.partition() not in self._pending_seek]
            self._seek_pending()
        if not msgs:
            return RecordBatch.empty(self._topic)
        bad = [m for m in msgs if m.error() is not None]
        unreadable = None
        if bad:
            for m in bad:
                rdkafka_log.warning("consume: %s", m.error().str())
            msgs = [m for m in msgs if m.error() is None]
            unreadable = self._unreadable(bad, msgs)
        n = len(msgs)
        got = RecordBatch(
            self._topic, np.fromiter((m.partition() for m in msgs), np.int32, n),
            np.fromiter((m.offset() for m in msgs), np.int64, n),
            np.fromiter((m.timestamp()[1] for m in msgs), np.int64, n),
            [m.key() for m in msgs], [m.value() for m in msgs], [_headers(m) for m in msgs])
        return got if not unreadable else RecordBatch.concat(self._topic, [got, unreadable])

    def _known_floor(self, topic: str, partition: int) -> int:
        """The last offset sought here, or else the group's committed offset: a partition just
        assigned starts there, while librdkafka reports an unreadable batch at its first offset,
        which may lie below it (those offsets were dead-lettered before the commit)."""
        if partition in self._floor:
            return self._floor[partition]
        try:
            (tp,) = self._c.committed([TopicPartition(topic, partition)], timeout=5)
        except KafkaException:
            return -1
        return tp.offset if tp.offset >= 0 else -1

    def _unreadable(self, errors: list[Message], good: list[Message]) -> RecordBatch:
        """Records librdkafka cannot read, as ``Unreadable`` records, each partition moved past.

        A record batch that does not decompress (garbage data behind a valid CRC: brokers that
        do not validate batches store it) comes back from librdkafka as an error at the batch's
        first offset, and librdkafka fetches it again and again: the partition stalled for good.
        Like kafka-python (``_stuck_at``), the offset handed over is the larger of the reported
        one and where the partition is known to be (``_known_floor``), and the seek past it
        moves on one offset per poll until the position leaves the batch; each is
        dead-lettered without bytes, which stay in the topic. Other errors (a partition's end,
        a broker going away) are librdkafka's to retry."""
        parts, offsets, why = [], [], []
        for m in errors:
            err, topic, partition = m.error(), m.topic(), m.partition()
            if (err.code() not in _UNREADABLE or partition is None or m.offset() is None
                    or m.offset() < 0 or partition in parts):
                continue
            offset = max(m.offset(), self._known_floor(topic, partition))
            # librdkafka may have gone on past it by itself (a legacy message set): no seek then
            moved_on = any(g.partition() == partition and g.offset() > offset for g in good)
            try:
                if not moved_on:
                    self.seek((topic, partition), offset + 1)
            except ClientError as exc:  # the error comes back with the next fetch
                log.warning("could not move past the unreadable record at %s[%d]@%d: %s",
                            topic, partition, offset, exc)
                continue
            log.error("%s[%d]@%d: librdkafka cannot read this record batch (%s); dead-lettered "
                      "without its bytes, which stay in the topic", topic, partition, offset,
                      err.str())
            parts.append(partition)
            offsets.append(offset)
            why.append(f"librdkafka cannot read the record batch ({err.str()}); its bytes stay "
                       f"at {topic}[{partition}]@{offset}")
        return RecordBatch.unreadable(self._topic, parts, offsets, why)

    def unreadable_at(self, tp: TP, offset: int, timeout_s: float) -> RecordBatch:
        """A second opinion from kafka-python (``kafka_python.second_opinion``): librdkafka
        stops without a word at a record whose lengths lie inside an uncompressed batch (a
        broker that does not validate batches stores it), handing on the records before it and
        then nothing, fetch after fetch. An outside fuzz drill (stop 51) stalled a partition
        for good that way, the stall watch's restarts at the same offset changing nothing.
        The reader gets the filter's security options in kafka-python's names; one that has no
        equivalent there makes this a ``ClientError`` (retried at the next stall), never an
        unauthenticated connection."""
        try:
            options = kafka_python_options(self._settings.options)
        except ValueError as exc:
            raise ClientError(f"no second opinion from kafka-python: {exc}", retriable=False) from None
        return second_opinion(replace(self._settings, options=options), tp, offset, timeout_s)

    def seek(self, tp: TP, offset: int) -> None:
        """Move ``tp`` to ``offset``. A partition assigned but not fetching yet cannot be
        sought (librdkafka: ``_STATE``); the seek is then kept and made by a later poll, and
        until it is made none of the partition's records is handed on, wherever the partition
        started (after the seek, librdkafka discards anything fetched before it)."""
        try:
            self._c.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is None or err.code() != KafkaError._STATE:
                raise _exc(exc, f"seek {tp[0]}[{tp[1]}] to {offset}") from exc
            self._pending_seek[tp[1]] = offset
        else:
            self._pending_seek.pop(tp[1], None)
        self._floor[tp[1]] = offset

    def _seek_pending(self) -> None:
        """Make the seeks librdkafka refused earlier. One that keeps failing keeps its
        partition's records back (never hands on a record past the seek's offset): a
        ``_STATE`` that lasts is a partition that never starts fetching; anything else is
        logged, and the stall watch restarts the partition (``source.Source``)."""
        for partition, offset in list(self._pending_seek.items()):
            try:
                self._c.seek(TopicPartition(self._topic, partition, offset))
            except KafkaException as exc:
                err = _kafka_error(exc)
                if err is None or err.code() not in (KafkaError._STATE, KafkaError._PREV_IN_PROGRESS):
                    log.warning("seek %s[%d] to %d still fails (%s); its records are held back",
                                self._topic, partition, offset, exc)
                continue
            del self._pending_seek[partition]

    def pause(self, tps: Iterable[TP]) -> None:
        parts = _tps(tps)
        if parts:
            self._c.pause(parts)

    def resume(self, tps: Iterable[TP]) -> None:
        parts = _tps(tps)
        if parts:
            self._c.resume(parts)

    def commit(self, offsets: Mapping[TP, int], asynchronous: bool,
               timeout_s: float = SHUTDOWN_STEP_S) -> None:
        parts = [TopicPartition(t, p, off) for (t, p), off in offsets.items()]
        try:
            if asynchronous:
                self._c.commit(offsets=parts, asynchronous=True)
            # librdkafka's synchronous commit has no timeout: it waited for a broker that did not
            # answer until the process was killed
            elif not call_bounded(lambda: self._c.commit(offsets=parts, asynchronous=False),
                                  timeout_s, "librdkafka-commit"):
                self._stuck = "an offset commit is still waiting inside librdkafka"
                raise ClientError(f"offset commit: no answer within {timeout_s:g} s", retriable=True)
        except KafkaException as exc:
            raise _exc(exc, "offset commit") from exc

    def committed(self, tps: Sequence[TP], timeout_s: float) -> dict[TP, int | None]:
        try:
            parts = self._c.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout_s)
        except KafkaException as exc:
            raise _exc(exc, "committed offsets") from exc
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in parts}

    def watermarks(self, tps: Sequence[TP], timeout_s: float,
                   listed: bool = False) -> dict[TP, tuple[int, int]]:
        # always the broker's listing (``listed`` or not), by the AdminClient (``_listed``)
        try:
            lows = self._listed(tps, OffsetSpec.earliest(), timeout_s)
            highs = self._listed(tps, OffsetSpec.latest(), timeout_s)
        except KafkaException as exc:
            raise _exc(exc, "log offsets") from exc
        return {tp: (lows[tp], highs[tp]) for tp in tps}

    def lag(self, tps: Sequence[TP], timeout_s: float) -> dict[TP, int]:
        """See ``base.Consumer.lag``. The partitions' ends are listed by the AdminClient
        (``_listed``)."""
        out: dict[TP, int] = {}
        try:
            positions = {(tp.topic, tp.partition): tp.offset
                         for tp in self._c.position(_tps(tps))}
            listed = self._listed(tps, OffsetSpec.latest(), timeout_s)
            committed = None
            starts: dict[TP, int] | None = None
            for t, p in tps:
                # fetch responses carry the high watermark too; Tansu's ListOffsets answer lags
                # behind it, so take whichever is further (as the kafka-python adapter does)
                fetched_high = self._c.get_watermark_offsets(TopicPartition(t, p), cached=True)[1]
                high = max(listed[(t, p)], fetched_high)
                pos = positions.get((t, p), -1)
                if pos < 0:  # librdkafka forgets the position on a seek until a record is read
                    pos = self._floor.get(p, -1)
                if pos < 0:  # nothing fetched yet: measure from the committed offset
                    if committed is None:
                        committed = {(x.topic, x.partition): x.offset
                                     for x in self._c.committed(_tps(tps), timeout=timeout_s)}
                    pos = committed.get((t, p), -1)
                if pos < 0:  # no commit either: it starts where auto_offset_reset puts it,
                    if fetched_high < 0:  # but no fetch answered yet: Tansu's ListOffsets end
                        continue          # can read 0 with records there; unknown, left out
                    if self._reset == "earliest":
                        if starts is None:
                            starts = self._listed(tps, OffsetSpec.earliest(), timeout_s)
                        pos = starts[(t, p)]
                    else:
                        pos = high
                out[(t, p)] = max(0, high - pos)
        except KafkaException as exc:
            raise _exc(exc, "lag") from exc
        return out

    def _listed(self, tps: Sequence[TP], spec: OffsetSpec, timeout_s: float) -> dict[TP, int]:
        """Each partition's offset for ``spec`` (its end: the high watermark, whatever the
        consumer's isolation level; or its start), by one ListOffsets request of the
        AdminClient, on a connection of its own. The consumer's own ``get_watermark_offsets``
        asks one partition at a time on the connection its fetches use, each answer queued
        behind a fetch the broker holds for ``fetch.wait.max.ms``: about 100 ms a partition (a
        lag read of 12 partitions held the filter's loop 1.2 s every ``--lag-interval-s``;
        measured on Tansu, 2 partitions: 203 ms before, 1.3 ms after). Raises KafkaException,
        or ClientError when the answer takes longer than ``timeout_s``."""
        futures = self._admin().list_offsets(
            {TopicPartition(t, p): spec for t, p in tps},
            isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=timeout_s)
        try:
            return {(tp.topic, tp.partition): int(f.result(timeout=timeout_s).offset)
                    for tp, f in futures.items()}
        except FutureTimeout:
            raise ClientError(f"log offsets: no answer within {timeout_s:g} s", retriable=True) from None

    def topic_id(self, topic: str) -> str | None:
        """librdkafka's consumer metadata carries no topic id (KIP-516); an AdminClient's
        ``describe_topics`` does. It is asked in the background (a future) at most every
        ``TOPIC_ID_EVERY_S``, and the last answer is returned meanwhile: the poll never waits
        on the broker, and a change is seen within a few seconds. No answer yet, a broker away,
        the topic missing or an answer without an id (the all-zero id of a broker that has
        none, below Metadata v10): the last id known (None at first). Taking the zero id as an
        id made the real one, given by a broker upgrade, look like a replaced log (a review)."""
        assert topic == self._topic or not self._topic, "one topic per consumer"
        asked = self._id_asked
        if asked is not None and asked.done():
            self._id_asked = None
            try:
                ident = topic_id_text(asked.result().topic_id)
            except Exception as exc:  # noqa: BLE001 - any failure: keep the last id known
                ident, why = None, f"{type(exc).__name__}: {exc}"
            else:
                why = "the broker gave no id"
            if ident is not None:
                if self._id_warned:
                    log.info("topic %s's id is known again", topic)
                self._topic_id, self._id_failing_since, self._id_warned = ident, None, False
            else:
                self._id_failed(topic, why)
        now = time.monotonic()
        if self._id_asked is None and now >= self._id_next:
            self._id_next = now + TOPIC_ID_EVERY_S
            try:
                admin = self._admin()
                admin.poll(0)  # serve its log and error callbacks
                self._id_asked = admin.describe_topics(TopicCollection([topic]))[topic]
            except (KafkaException, ValueError, TypeError) as exc:
                self._id_failed(topic, f"{type(exc).__name__}: {exc}")
        return self._topic_id

    def _id_failed(self, topic: str, why: str) -> None:
        """One WARNING once the id has been unknown for ``TOPIC_ID_WARN_S``: the check for a
        broker that lost its logs then stands on the commit and log-end signs alone."""
        now = time.monotonic()
        self._id_failing_since = self._id_failing_since or now
        if not self._id_warned and now - self._id_failing_since >= TOPIC_ID_WARN_S:
            self._id_warned = True
            log.warning("could not learn topic %s's id for %.0f s (%s): a broker that loses its "
                        "logs is noticed later, by commits and log ends only", topic,
                        now - self._id_failing_since, why)

    def _admin(self) -> AdminClient:
        if self._id_admin is None:
            self._id_admin = _admin_client(self._settings, "topic-id")
        return self._id_admin

    def group_metadata(self) -> Any:
        return self._c.consumer_group_metadata()

    def close(self, timeout_s: float = SHUTDOWN_STEP_S) -> None:
        self._id_asked = self._id_admin = None  # the id's AdminClient goes with the consumer
        if self._stuck is not None:  # close would wait for it too, then destroy the handle under it
            raise ClientError(f"leaving the group skipped: {self._stuck}; the partitions move after "
                              "the session timeout", retriable=True)
        # librdkafka's close waits for the group coordinator without a timeout
        if not call_bounded(self._c.close, timeout_s, "librdkafka-close"):
            raise ClientError(f"leaving the group: no answer within {timeout_s:g} s", retriable=True)


class ConfluentProducer:
    def __init__(self, s: ClientSettings) -> None:
        conf: dict[str, Any] = {
            "message.max.bytes": _DEFAULT_MESSAGE_MAX_BYTES,
            **_producer_only(translate(s.options)),
            "bootstrap.servers": s.bootstrap_servers, "client.id": s.client_id,
            "acks": "all", "enable.idempotence": True, "linger.ms": PRODUCER_LINGER_MS,
            "message.timeout.ms": s.delivery_timeout_ms, "logger": rdkafka_log,
            "error_cb": _on_error,
            # the filter never creates topics: librdkafka's producer would ask the broker to create
            # an output topic deleted under it (its default, unlike its consumer's)
            "allow.auto.create.topics": False,
        }
        if s.transactional_id:
            conf["transactional.id"] = s.transactional_id
        self._p = Producer(conf)
        self._guard = TransactionGuard("librdkafka", s.stopping)
        self._cluster: Any = None  # every topic's metadata, read at the first partition_count

    def partition_count(self, topic: str) -> int:
        # The metadata of all topics: asking for this one lets a broker that creates topics on
        # first mention (Tansu always, Apache Kafka by default) create a mistyped output topic
        # that nobody reads.
        try:
            if self._cluster is None:  # read once: start-up asks for three topics
                self._cluster = self._p.list_topics(timeout=10)
        except KafkaException as exc:
            raise _exc(exc, f"metadata of {topic!r}") from exc
        info = self._cluster.topics.get(topic)
        if info is None:
            raise MissingTopic(topic)
        if info.error is not None or not info.partitions:
            raise ClientError(f"topic {topic!r} is not available"
                              + (f" ({info.error.str()})" if info.error else ""),
                              retriable=True)
        return len(info.partitions)

    def send(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
             headers: Sequence[Header], on_done: DeliveryCallback) -> None:
        def report(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                on_done(None)
            else:
                on_done(_produce_error(err, "delivery"))

        deadline = None
        while True:
            try:
                self._p.produce(topic, value=value, key=key, partition=partition,
                                headers=headers, on_delivery=report)
                return
            except BufferError:  # local queue full: let librdkafka drain it, then try again
                deadline = deadline or time.monotonic() + MAX_BLOCK_S
                if time.monotonic() > deadline:
                    raise ProduceError("local producer queue stayed full", retriable=True) from None
                self.poll(0.05)  # a fatal error raised here is the producer's too
            except KafkaException as exc:
                raise _produce_exc(exc, "produce") from exc

    def poll(self, timeout_s: float) -> None:
        """Serve delivery reports. librdkafka raises a fatal producer error from here too (a
        restarted broker that forgot the idempotent producer id: OUT_OF_ORDER_SEQUENCE_NUMBER),
        not only in the reports: it comes out as a ``ProduceError`` whose ``fatal`` says the
        handle must be replaced, not as an unexpected exception (exit 3, "a bug")."""
        try:
            self._p.poll(timeout_s)
        except KafkaException as exc:
            raise _produce_exc(exc, "poll") from exc

    def flush(self, timeout_s: float) -> int:
        try:
            return int(self._p.flush(timeout_s))
        except KafkaException as exc:
            raise _produce_exc(exc, "flush") from exc

    def init_transactions(self, timeout_s: float) -> None:
        self._txn(lambda: self._p.init_transactions(timeout_s), "init_transactions", timeout_s)

    def begin_transaction(self) -> None:
        self._txn(self._p.begin_transaction, "begin_transaction")

    def send_offsets_to_transaction(self, offsets: Mapping[TP, int], group_metadata: Any,
                                    timeout_s: float) -> None:
        parts = [TopicPartition(t, p, off) for (t, p), off in offsets.items()]
        self._txn(lambda: self._p.send_offsets_to_transaction(parts, group_metadata, timeout_s),
                  "send_offsets_to_transaction", timeout_s)

    def commit_transaction(self, timeout_s: float) -> None:
        self._txn(lambda: self._p.commit_transaction(timeout_s), "commit_transaction", timeout_s)

    def abort_transaction(self, timeout_s: float) -> None:
        self._txn(lambda: self._p.abort_transaction(timeout_s), "abort_transaction", timeout_s)

    def _txn(self, call: Any, what: str, timeout_s: float | None = None) -> None:
        """Make one transactional call; one that talks to the broker goes through the
        ``TransactionGuard`` (bounded, and abandoned sooner once the filter is stopping)."""
        try:
            self._guard.call(call, what, timeout_s)
        except KafkaException as exc:
            raise _exc(exc, what) from exc

    def close(self, timeout_s: float) -> None:
        if self._guard.wedged is None:  # a wedged handle is left alone (TransactionGuard)
            self._p.flush(timeout_s)


def _admin_client(s: ClientSettings, role: str) -> AdminClient:
    """An AdminClient with the member's connection settings (TLS, SASL), named for its role;
    its errors are the caller's to report (the probe's answer, the topic id's warning)."""
    return AdminClient({**_global_only(translate(s.options)),
                        "bootstrap.servers": s.bootstrap_servers,
                        "client.id": f"{s.client_id}-{role}", "logger": rdkafka_log,
                        "error_cb": lambda _err: None})


class ConfluentProbe:
    def __init__(self, s: ClientSettings) -> None:
        self._admin = _admin_client(s, "probe")

    def check(self, timeout_s: float) -> bool:
        try:
            self._admin.list_topics(timeout=timeout_s)
            return True
        except KafkaException:
            return False

    def close(self) -> None:
        pass


class ConfluentClient:
    name = NAME
    size_option = "message.max.bytes"  # the producer's limit on one request, in this library's name

    def consumer(self, settings: ClientSettings, on_commit: CommitCallback) -> ConfluentConsumer:
        try:
            return ConfluentConsumer(settings, on_commit)
        except KafkaException as exc:
            raise _exc(exc, "consumer") from exc

    def producer(self, settings: ClientSettings) -> ConfluentProducer:
        try:
            return ConfluentProducer(settings)
        except KafkaException as exc:
            raise _exc(exc, "producer") from exc

    def probe(self, settings: ClientSettings) -> ConfluentProbe:
        return ConfluentProbe(settings)

    def max_record_bytes(self, options: Mapping[str, Any]) -> int:
        conf = translate(options)
        return int(conf.get("message.max.bytes", _DEFAULT_MESSAGE_MAX_BYTES)) - _FRAMING

    def check_options(self, options: Mapping[str, Any]) -> None:
        conf = translate(options)
        refused = sorted(set(conf) & OWNED
                         | {k for k in conf if k.replace("_", ".") in OWNED})
        if refused:
            raise ValueError(f"{refused} are set by depois-stream itself (use its own flags)")
        snake = sorted(k for k in conf if "_" in k and "." not in k)
        if snake:
            raise ValueError(f"{snake} are not confluent-kafka options: use librdkafka's dotted "
                             "names (security.protocol, sasl.mechanisms, ssl.ca.location, ...) "
                             "or --client kafka-python")
        _refuse_incremental_rebalancing(conf)
        for make, only in ((Producer, _producer_only), (Consumer, _consumer_only)):
            try:  # librdkafka validates names and values when a handle is made
                # the filter's own group settings at their smallest allowed values, so that
                # only the pass-through options can be at fault
                extra = ({"group.id": "check", "session.timeout.ms": 1000,
                          "heartbeat.interval.ms": 100} if make is Consumer else {})
                handle = make({**only(conf), **extra, "logger": logging.getLogger("check")})
            except KafkaException as exc:
                raise ValueError(f"librdkafka refuses the options: {exc.args[0].str()}"
                                 f"{_as_given(options, exc.args[0].str())}") from None
            if make is Consumer:
                handle.close()
