"""kafka-python behind the client seam: pure Python, installed with depois-stream itself.

Threading: kafka-python 3 runs its network and group protocol on an IO thread. Rebalance
listeners run there too, but only while the main thread is blocked inside ``poll()``, which is
when the filter's source expects them; delivery callbacks also arrive on that thread, so
``poll()`` here waits on an event the callbacks set instead of serving them itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import CorruptRecordError, KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from depois_stream.filter.clients.base import (
    SHUTDOWN_STEP_S, TP, AssignCallback, ClientError, ClientSettings, CommitCallback,
    Construction, DeliveryCallback, Header, MissingTopic, ProduceError, RecordBatch, RevokeCallback,
    TransactionGuard, close_quietly, construct,
)
from depois_stream.filter.clients.kafka_python_parsing import (
    bound_decompression, raised_by_parser, skip_unreadable,
)

log = logging.getLogger(__name__)

NAME = "kafka-python"

# Decided by the filter (delivery semantics, or a flag of its own): never passed through.
OWNED = frozenset({
    "bootstrap_servers", "client_id", "group_id", "enable_auto_commit", "enable_idempotence",
    "acks", "transactional_id", "isolation_level", "key_deserializer", "value_deserializer",
    "key_serializer", "value_serializer", "max_poll_records", "auto_offset_reset",
    "session_timeout_ms", "heartbeat_interval_ms", "delivery_timeout_ms", "linger_ms",
    "batch_size", "allow_auto_create_topics",
})
# The producer's own batching: a short linger keeps acknowledgements, and so commits, prompt.
PRODUCER_LINGER_MS = 20
MAX_BLOCK_MS = 10000  # send() waits at most this for metadata or buffer room
# How long making a producer may wait for a first broker (kafka-python's default is 30 s): the
# filter makes new ones during outages, and a stop that lands in the wait must fit the grace period.
PRODUCER_BOOTSTRAP_MS = 10000
_BOUNDED_BOOTSTRAP = "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG  # where this kafka-python has it
# A fetch returns when data arrives, or after this: brokers that hold an empty fetch for the whole
# wait (Tansu does, Kafka returns early) would otherwise add up to 500 ms to every record.
FETCH_MAX_WAIT_MS = 100
_DEFAULT_MAX_REQUEST = KafkaProducer.DEFAULT_CONFIG["max_request_size"]
# Room for the produce request's own framing around the largest record it carries.
_FRAMING = 16 * 1024


def options_for(client: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``client`` knows (kafka-python refuses the other client's options, e.g. a
    consumer's fetch_max_wait_ms given to the producer)."""
    return {k: v for k, v in options.items() if k in client.DEFAULT_CONFIG}



SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
CODECS = ("gzip", "snappy", "lz4", "zstd")  # kafka-python's compression types (None: none)


def check_passthrough(options: Mapping[str, Any], owned: frozenset[str], why_owned: str) -> None:
    """Raise ValueError naming options the caller decides itself or kafka-python does not know.

    Why a check at all: kafka-python raises on an unknown option only when a client is built,
    deep in start-up and with a message that does not name the setting; and an option the
    caller owns (commits, acks, group id) would silently change delivery semantics."""
    refused = sorted(set(options) & owned)
    if refused:
        raise ValueError(f"{refused} {why_owned}")
    known = (set(KafkaConsumer.DEFAULT_CONFIG) | set(KafkaProducer.DEFAULT_CONFIG)
             | set(KafkaAdminClient.DEFAULT_CONFIG))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{unknown} are not kafka-python client options (e.g. "
                         "security_protocol, sasl_mechanism, ssl_cafile)")
    # kafka-python takes any value and fails later with a traceback (a text where a number
    # goes) or not at all (an unknown security protocol ran as plaintext): check the type
    # against the option's own default, and the one enumeration that matters most.
    defaults = {**KafkaAdminClient.DEFAULT_CONFIG, **KafkaProducer.DEFAULT_CONFIG,
                **KafkaConsumer.DEFAULT_CONFIG}
    for name, value in options.items():
        default = defaults.get(name)
        wanted = next((t for t in (bool, int, float, str) if isinstance(default, t)), None)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        # No float where an int goes, not even 30000.0: kafka-python packs some of them into
        # the protocol as they are, and struct.pack refuses a float at the first fetch.
        ok = wanted is None or isinstance(value, wanted) or (wanted is float and number)
        if not ok or (wanted is int and isinstance(value, bool)):
            hint = {bool: " (JSON true or false: the text 'false' would read as true)",
                    int: f" (a whole number like {default!r})"}.get(wanted, f" (like {default!r})")
            raise ValueError(f"kafka-python option {name} must be of type "
                             f"{type(default).__name__}{hint}, not {value!r}")
    protocol = options.get("security_protocol")
    if protocol is not None and protocol not in SECURITY_PROTOCOLS:
        raise ValueError(f"security_protocol {protocol!r} is not one of "
                         f"{', '.join(SECURITY_PROTOCOLS)}")
    # kafka-python checks the codec only after its bootstrap, with a traceback
    codec = options.get("compression_type")
    if codec is not None and codec not in CODECS:
        raise ValueError(f"compression_type {codec!r} is not one of {', '.join(CODECS)} "
                         "(or null for none)")
    if codec in missing_codecs():
        raise ValueError(f"compression_type {codec!r} needs its compression library, which "
                         "is not installed (python-snappy, lz4 or zstandard)")


# Errors that concern the record itself (kafka.errors class names): dead-letter it. Every other
# non-retriable error is the producer's state, not the record's (see base.ProduceError).
REJECTED = frozenset({"MessageSizeTooLargeError", "RecordListTooLargeError",
                      "InvalidRecordError", "CorruptRecordError"})


def _produce_error(exc: BaseException) -> ProduceError:
    retriable = bool(getattr(exc, "retriable", False))
    return ProduceError(f"{type(exc).__name__}: {exc}", retriable,
                        rejected=type(exc).__name__ in REJECTED)


def _error(exc: BaseException) -> ClientError:
    return ClientError(f"{type(exc).__name__}: {exc}", bool(getattr(exc, "retriable", False)))


class _Listener(ConsumerRebalanceListener):
    def __init__(self, consumer: KafkaConsumer, on_assign: AssignCallback,
                 on_revoke: RevokeCallback, on_lost: RevokeCallback) -> None:
        self._consumer, self._assign, self._revoke, self._lost = (consumer, on_assign, on_revoke,
                                                                  on_lost)

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._revoke([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        self._lost([(tp.topic, tp.partition) for tp in lost])

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = list(assigned)
        # An eager rebalance keeps the state of a partition that stays with this member, its
        # pause flag included: an assignment starts unpaused (base.Consumer.subscribe).
        self._consumer.resume(*assigned)
        starts = self._assign([(tp.topic, tp.partition) for tp in assigned])
        for (topic, partition), offset in starts.items():
            # kafka-python keeps the fetch position of a partition that comes straight back
            # (eager rebalances revoke everything first): rewind it to the first record the
            # filter dropped, or that record is skipped.
            self._consumer.seek(TopicPartition(topic, partition), offset)


def missing_codecs() -> list[str]:
    """The Kafka compression codecs kafka-python has no library for (dependencies of this
    package, so only a broken install lacks one): checked at start-up, because a missing library
    is not a bad batch."""
    from kafka import codec

    return [name for name in CODECS if not getattr(codec, f"has_{name}")()]


def built(cls: Any, **config: Any) -> Any:
    """``cls(**config)`` for a kafka-python client class, closing what a failed constructor
    leaves running: kafka-python 3 starts the client's network thread before its first
    bootstrap and leaves it (and its selector) behind when the bootstrap fails, so a probe or a
    producer rebuilt every few seconds through an outage leaked one thread per try."""
    made: list[Any] = []
    default = getattr(cls, "DEFAULT_CONFIG", {}).get("kafka_client")
    if default is None or "kafka_client" in config:  # a release without the hook
        return cls(**config)

    def network_client(**cfg: Any) -> Any:
        made.append(default(**cfg))
        return made[-1]

    try:
        return cls(kafka_client=network_client, **config)
    except BaseException:
        for net in made:  # its close() stops the network thread; the constructor's error wins
            close_quietly(net)
        raise


def unreadable_batch(consumer: KafkaConsumer, topic: str, exc: BaseException,
                     hint: str = "", announce: bool = True) -> RecordBatch:
    """The records ``consumer`` cannot parse (``exc``, raised by its parser), as ``Unreadable``
    records, and the consumer moved past them.

    kafka-python raises once when a record of a fetch does not parse (a header name that is
    not UTF-8, a bad CRC, a record whose lengths lie) or its batch does not decompress (or
    decompresses past MAX_BATCH_BYTES); its fetcher then keeps the stuck fetch, and later polls
    spin on it (the partition stalls for good) or, for a batch that did not decompress, loop
    inside kafka-python without returning at all. ``skip_unreadable`` moves past the bad record
    and, since kafka-python parses a batch from its start and so cannot read past it, the rest
    of its record batch: each of those offsets is handed over without key or value (kafka-python
    never gives them), all at once. Their bytes stay in the topic (offsets in the dead letters'
    provenance headers). ``announce``: log what is dead-lettered (not for a second opinion,
    whose caller decides what to make of it). Raises whatever ``skip_unreadable`` raises."""
    tp, offsets, why = skip_unreadable(consumer, exc)
    first, last = offsets[0], offsets[-1]
    if announce:
        log.error("%s[%d]@%s: %s; dead-lettered without %s bytes, which stay in the topic",
                  tp.topic, tp.partition, first if first == last else f"{first}..{last}", why,
                  "its" if first == last else f"their ({len(offsets)} offsets of one record batch)")
    return RecordBatch.unreadable(
        topic, [tp.partition] * len(offsets), offsets,
        [f"{why}; its bytes stay at {tp.topic}[{tp.partition}]@{o}{hint}" for o in offsets])


def second_opinion(s: ClientSettings, tp: TP, offset: int, timeout_s: float) -> RecordBatch:
    """What kafka-python makes of ``tp`` from ``offset``: the records there that it cannot
    parse, as ``Unreadable`` records (``unreadable_batch``: the bad one and the rest of its
    batch, which kafka-python cannot reach), or an empty batch when it reads a record there,
    or when a fetch came back with nothing to give (the log's end, a transaction still open),
    or when it cannot tell within ``timeout_s``. Any failure is a ``ClientError``.

    For the confluent-kafka consumer's stall watch: librdkafka stops silently at a record whose
    lengths lie inside an uncompressed batch (no error, no record, the same fetch again and
    again), which a broker that does not validate batches stores (Tansu; Apache Kafka refuses
    it on produce). kafka-python parses the same bytes strictly and says where they stop. A
    consumer of no group, so nothing is committed or rebalanced; ``s.options`` must be in
    kafka-python's names (``confluent.kafka_python_options``)."""
    try:
        return _second_opinion(s, tp, offset, timeout_s)
    except ClientError:
        raise
    except Exception as exc:  # noqa: BLE001 - a diagnosis must never take the filter down
        raise ClientError(f"second opinion on {tp[0]}[{tp[1]}]@{offset}: "
                          f"{type(exc).__name__}: {exc}", retriable=True) from exc


def _second_opinion(s: ClientSettings, tp: TP, offset: int, timeout_s: float) -> RecordBatch:
    deadline = time.monotonic() + timeout_s
    bound_decompression()
    consumer = construct(lambda: built(
        KafkaConsumer, bootstrap_servers=s.bootstrap_servers, client_id=f"{s.client_id}-second-opinion",
        group_id=None, enable_auto_commit=False,
        isolation_level="read_committed" if s.read_committed else "read_uncommitted",
        allow_auto_create_topics=False,
        **{"fetch_max_wait_ms": FETCH_MAX_WAIT_MS, **options_for(KafkaConsumer, s.options)}),
        timeout_s, "a second-opinion reader")
    try:
        part = TopicPartition(*tp)
        consumer.assign([part])
        consumer.seek(part, offset)
        empty_answers = 0
        while (left := deadline - time.monotonic()) > 0:
            try:
                polled = consumer.poll(timeout_ms=max(1, int(min(left, 0.2) * 1000)), max_records=1)
            except Exception as exc:  # noqa: BLE001 - sorted just below
                if not raised_by_parser(exc):
                    raise
                return unreadable_batch(consumer, tp[0], exc, announce=False)
            if any(polled.values()):
                return RecordBatch.empty(tp[0])  # it reads a record there
            # A fetch response was parsed (it sets the high watermark) and gave nothing: the
            # log's end, or records a read_committed reader may not see yet. Twice, so that a
            # response that held only what lies before ``offset`` is not taken for it.
            if consumer.highwater(part) is not None:
                empty_answers += 1
                if empty_answers >= 2:
                    return RecordBatch.empty(tp[0])
        return RecordBatch.empty(tp[0])
    finally:
        close_quietly(consumer)


class KafkaPythonConsumer:
    def __init__(self, s: ClientSettings, on_commit: CommitCallback) -> None:
        self._on_commit = on_commit
        self._topic = ""
        bound_decompression()
        self._c = built(
            KafkaConsumer, bootstrap_servers=s.bootstrap_servers, group_id=s.group_id, client_id=s.client_id,
            enable_auto_commit=False, auto_offset_reset=s.auto_offset_reset,
            max_poll_records=s.max_poll_records, session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            isolation_level="read_committed" if s.read_committed else "read_uncommitted",
            # the filter never creates topics: a misspelt ingest topic was created by the
            # subscription's metadata request (kafka-python's default; librdkafka's is off)
            allow_auto_create_topics=False,
            **{"fetch_max_wait_ms": FETCH_MAX_WAIT_MS, **options_for(KafkaConsumer, s.options)})

    def subscribe(self, topic: str, on_assign: AssignCallback, on_revoke: RevokeCallback,
                  on_lost: RevokeCallback) -> None:
        self._topic = topic
        self._c.subscribe([topic], listener=_Listener(self._c, on_assign, on_revoke, on_lost))

    def poll(self, timeout_s: float, max_records: int) -> RecordBatch:
        self._drop_parked()
        try:
            polled = self._c.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except Exception as exc:  # noqa: BLE001 - sorted just below
            if raised_by_parser(exc):
                return self._unreadable(exc)
            if isinstance(exc, KafkaError):
                raise _error(exc) from exc
            raise
        recs = [r for rs in polled.values() for r in rs]
        n = len(recs)
        got = RecordBatch.empty(self._topic) if not recs else RecordBatch(
            self._topic, np.fromiter((r.partition for r in recs), np.int32, n),
            np.fromiter((r.offset for r in recs), np.int64, n),
            # a v0 record has no timestamp (None): -1, as Kafka writes "none"
            np.fromiter((-1 if r.timestamp is None else r.timestamp for r in recs), np.int64, n),
            [r.key for r in recs], [r.value for r in recs], [r.headers for r in recs])
        # A poll that returned records and then met an unparseable one keeps that error for the
        # next poll, but drops it if the partition is paused meanwhile (the breaker, a backoff),
        # after which every poll spins on the stuck fetch: handle it now instead.
        held = getattr(getattr(self._c, "_fetcher", None), "_next_in_line_exception_metadata", None)
        if held is not None and raised_by_parser(getattr(held, "exception", None)):
            self._c._fetcher._next_in_line_exception_metadata = None
            return RecordBatch.concat(self._topic, [got, self._unreadable(held.exception)])
        return got

    def _drop_parked(self) -> None:
        """Drop the records kafka-python parked for partitions that are no longer paused.

        kafka-python 3.0.12 parks the fetched records it holds for a partition that gets paused
        and does not fetch that partition while they are parked. It gives them back one
        partition per poll, and only into an empty in-hand slot; but it leaves spent records
        in that slot (so a parked partition stalled for good after its resume) and a backlog
        on other partitions keeps the slot full (so a second parked partition starved for as
        long as the backlog lasted). Parked records were never handed over and the fetch
        position never moved past them, so dropping them costs one fetch: the partition is
        fetched again from its position at the next poll."""
        fetcher = getattr(self._c, "_fetcher", None)
        parked = getattr(fetcher, "_paused_partition_records", None)
        if not parked:
            return
        for tp in [tp for tp in parked if not self._c._subscription.is_paused(tp)]:
            parked.pop(tp).drain()

    def _unreadable(self, exc: Exception) -> RecordBatch:
        """The records kafka-python cannot parse, as ``Unreadable`` records, and the partition
        moved past them (``unreadable_batch``). Without the fetcher's state (kafka-python other
        than the 3.0 line tested), the error goes up as before."""
        try:
            return unreadable_batch(self._c, self._topic, exc, hint=(
                " (confluent-kafka reads records one by one: --client confluent-kafka)"
                if isinstance(exc, CorruptRecordError) else ""))
        except Exception as err:  # noqa: BLE001 - anything here is "cannot recover"
            raise _error(exc) from err

    def unreadable_at(self, tp: TP, offset: int, timeout_s: float) -> RecordBatch:
        """Nothing: kafka-python raises on every record it cannot parse, and ``poll`` hands
        those over itself."""
        return RecordBatch.empty(tp[0])

    def seek(self, tp: TP, offset: int) -> None:
        try:
            self._c.seek(TopicPartition(*tp), offset)
        except (KafkaError, ValueError, AssertionError) as exc:
            # retriable only for a partition no longer assigned (a rebalance under the call);
            # a bad offset is not fixed by trying again
            raise ClientError(f"seek of {tp[0]}[{tp[1]}] to {offset}: {exc}",
                              retriable="nassigned" in str(exc)) from exc

    def pause(self, tps: Iterable[TP]) -> None:
        self._c.pause(*(TopicPartition(*tp) for tp in tps))

    def resume(self, tps: Iterable[TP]) -> None:
        self._c.resume(*(TopicPartition(*tp) for tp in tps))
        self._drop_parked()

    def commit(self, offsets: Mapping[TP, int], asynchronous: bool,
               timeout_s: float = SHUTDOWN_STEP_S) -> None:
        meta = {TopicPartition(*tp): OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
        if asynchronous:
            def done(_offsets: object, response: object) -> None:
                self._on_commit(response if isinstance(response, BaseException) else None)
            self._c.commit_async(meta, callback=done)
            return
        try:
            self._c.commit(meta, timeout_ms=int(timeout_s * 1000))
        except KafkaTimeoutError:
            raise ClientError(f"offset commit: no answer within {timeout_s:g} s", retriable=True) from None
        except KafkaError as exc:
            raise _error(exc) from exc

    def committed(self, tps: Sequence[TP], timeout_s: float) -> dict[TP, int | None]:
        try:
            return {tp: self._c.committed(TopicPartition(*tp), timeout_ms=int(timeout_s * 1000))
                    for tp in tps}
        except KafkaTimeoutError:
            raise ClientError(f"committed offsets: no answer within {timeout_s:g} s", retriable=True) from None
        except KafkaError as exc:
            raise _error(exc) from exc

    def lag(self, tps: Sequence[TP], timeout_s: float) -> dict[TP, int]:
        parts = [TopicPartition(*tp) for tp in tps]
        ms = int(timeout_s * 1000)
        try:
            ends = self._c.end_offsets(parts, timeout_ms=ms)
            # Fetch responses carry the high watermark too; Tansu's ListOffsets answer lags
            # behind it, so take whichever is further.
            return {(tp.topic, tp.partition): max(0, max(end, self._c.highwater(tp) or 0)
                                                  - self._c.position(tp, timeout_ms=ms))
                    for tp, end in ends.items()}
        except KafkaError as exc:
            raise _error(exc) from exc

    def watermarks(self, tps: Sequence[TP], timeout_s: float,
                   listed: bool = False) -> dict[TP, tuple[int, int]]:
        parts = [TopicPartition(*tp) for tp in tps]
        ms = int(timeout_s * 1000)
        try:
            lows = self._c.beginning_offsets(parts, timeout_ms=ms)
            highs = self._c.end_offsets(parts, timeout_ms=ms)
            # as in lag(): fetch responses carry a later end than Tansu's ListOffsets answer
            # (not with ``listed``: after a log replacement the cached one is the old log's)
            return {(tp.topic, tp.partition): (
                        int(lows[tp]),
                        int(highs[tp]) if listed else max(int(highs[tp]), self._c.highwater(tp) or 0))
                    for tp in parts}
        except KafkaTimeoutError:
            raise ClientError(f"log offsets: no answer within {timeout_s:g} s", retriable=True) from None
        except KafkaError as exc:  # IllegalStateError: a partition no longer assigned
            raise _error(exc) from exc

    def topic_replaced(self) -> None:
        pass  # kafka-python's metadata refresh sees the new log's partitions and rejoins itself

    def topic_id(self, topic: str) -> str | None:
        # kafka-python keeps the ids of its MetadataResponse (v10+) on the cluster object, and
        # logs "topic_id changed ... likely recreated" when one changes
        try:
            ident = self._c._client.cluster.topic_id(topic)
        except AttributeError:  # another kafka-python layout: no id, the other checks stand
            return None
        return None if ident is None else str(ident)

    def group_metadata(self) -> Any:
        return self._c.group_metadata()

    def close(self, timeout_s: float = SHUTDOWN_STEP_S) -> None:
        self._c.close(autocommit=False, timeout_ms=int(timeout_s * 1000))


class KafkaPythonProducer:
    def __init__(self, s: ClientSettings) -> None:
        options = options_for(KafkaProducer, s.options)
        linger = PRODUCER_LINGER_MS
        request_timeout = int(options.pop("request_timeout_ms",
                                          max(1000, min(30000, s.delivery_timeout_ms - linger))))
        extra: dict[str, Any] = {}
        if s.transactional_id:
            extra["transactional_id"] = s.transactional_id
        if _BOUNDED_BOOTSTRAP:
            extra["bootstrap_timeout_ms"] = options.pop(
                "bootstrap_timeout_ms", min(PRODUCER_BOOTSTRAP_MS, s.delivery_timeout_ms))
        self._p = built(
            KafkaProducer, bootstrap_servers=s.bootstrap_servers, client_id=s.client_id, acks="all",
            enable_idempotence=True, linger_ms=linger, batch_size=1 << 20, allow_auto_create_topics=False,
            delivery_timeout_ms=max(s.delivery_timeout_ms, linger + request_timeout),
            request_timeout_ms=request_timeout,
            max_block_ms=options.pop("max_block_ms", min(MAX_BLOCK_MS, s.delivery_timeout_ms)),
            **extra, **options)
        self._reported = threading.Event()
        self._guard = TransactionGuard(NAME, s.stopping)
        self._settings = s
        self._topics: set[str] | None = None

    def partition_count(self, topic: str) -> int:
        if topic not in self._existing_topics():
            raise MissingTopic(topic)
        try:
            parts = self._p.partitions_for(topic)
        except KafkaError as exc:
            raise _error(exc) from exc
        if not parts:
            raise ClientError(f"topic {topic!r} has no partitions", retriable=True)
        return len(parts)

    def _existing_topics(self) -> set[str]:
        """Every topic's name, from one metadata request for all topics (read once: start-up).

        ``partitions_for`` asks for the one topic, and a broker that creates topics on first
        mention (Tansu always, Apache Kafka by default) then creates a mistyped output topic
        that nobody reads; a request for all topics creates nothing."""
        if self._topics is None:
            s = self._settings
            try:
                admin = built(KafkaAdminClient, bootstrap_servers=s.bootstrap_servers,
                              client_id=f"{s.client_id}-topics",
                              **options_for(KafkaAdminClient, s.options))
                try:
                    self._topics = set(admin.list_topics())
                finally:
                    admin.close()
            except KafkaError as exc:
                raise _error(exc) from exc
        return self._topics

    def send(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
             headers: Sequence[Header], on_done: DeliveryCallback) -> None:
        try:
            future = self._p.send(topic, value=value, key=key, headers=list(headers),
                                  partition=partition)
        except KafkaError as exc:
            raise _produce_error(exc) from exc
        future.add_callback(self._ok, on_done)
        future.add_errback(self._failed, on_done)

    def _ok(self, on_done: DeliveryCallback, _metadata: object) -> None:
        on_done(None)
        self._reported.set()

    def _failed(self, on_done: DeliveryCallback, exc: BaseException) -> None:
        on_done(_produce_error(exc))
        self._reported.set()

    def poll(self, timeout_s: float) -> None:
        if timeout_s > 0 and self._reported.wait(timeout_s):
            self._reported.clear()

    def flush(self, timeout_s: float) -> int:
        try:
            self._p.flush(timeout=timeout_s)
        except KafkaError:
            pass  # the records' own callbacks carry what went wrong
        return 0

    def init_transactions(self, timeout_s: float) -> None:
        self._txn(self._p.init_transactions, "init_transactions", timeout_s)

    def begin_transaction(self) -> None:
        self._txn(self._p.begin_transaction, "begin_transaction")

    def send_offsets_to_transaction(self, offsets: Mapping[TP, int], group_metadata: Any,
                                    timeout_s: float) -> None:
        meta = {TopicPartition(*tp): OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
        self._txn(lambda: self._p.send_offsets_to_transaction(meta, group_metadata),
                  "send_offsets_to_transaction", timeout_s)

    def commit_transaction(self, timeout_s: float) -> None:
        self._txn(self._p.commit_transaction, "commit_transaction", timeout_s)

    def abort_transaction(self, timeout_s: float) -> None:
        self._txn(self._p.abort_transaction, "abort_transaction", timeout_s)

    def _txn(self, call: Any, what: str, timeout_s: float | None = None) -> None:
        """One transactional call; those that wait on the broker (kafka-python gives them no
        timeout) go through the ``TransactionGuard``."""
        try:
            self._guard.call(call, what, timeout_s)
        except KafkaError as exc:
            raise _error(exc) from exc

    def close(self, timeout_s: float) -> None:
        if self._guard.wedged is not None and self._guard.stopping.is_set():
            # On the way out: close() flushes first, and the records of an abandoned
            # transaction never complete, so it would wait out timeout_s and raise. Not during
            # the run: a stopped sender never re-sends the stuck call's request, which would
            # then never return (its thread and this producer kept for good), while a running
            # one ends it once the broker answers.
            sender = getattr(self._p, "_sender", None)
            if sender is not None:
                sender.force_close()
            return
        self._p.close(timeout=timeout_s)


class KafkaPythonProbe:
    def __init__(self, s: ClientSettings) -> None:
        self._settings = s
        self._admin: KafkaAdminClient | None = None
        self._making: Construction | None = None  # an admin client still bootstrapping

    def check(self, timeout_s: float) -> bool:
        try:
            if self._admin is None:
                # a bootstrap that hangs past its own bound (a TLS hello nobody answers) is
                # waited on again at the next check, never started twice
                if self._making is None:
                    self._making = Construction(lambda: self._admin_client(timeout_s),
                                                "kafka-python-probe")
                made = self._making.result(timeout_s + 1.0)
                if made is None:
                    return False
                self._making, self._admin = None, made
            self._admin.describe_cluster()
            return True
        except Exception:  # noqa: BLE001  (any failure means: not reachable now)
            self.close()
            return False

    def _admin_client(self, timeout_s: float) -> KafkaAdminClient:
        """Bounded both ways: the first bootstrap waited 30 s (its own default) on a broker that
        accepts connections but does not answer, past --startup-timeout-s."""
        s = self._settings
        bound_ms = int(timeout_s * 1000)
        bootstrap = ({"bootstrap_timeout_ms": bound_ms}
                     if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG else {})
        options = options_for(KafkaAdminClient, {
            k: v for k, v in s.options.items()
            if k not in ("request_timeout_ms", "bootstrap_timeout_ms")})
        return built(KafkaAdminClient, bootstrap_servers=s.bootstrap_servers,
                     client_id=f"{s.client_id}-probe", request_timeout_ms=bound_ms,
                     **bootstrap, **options)

    def close(self) -> None:
        making, self._making = self._making, None
        if making is not None:  # given up on: closed once made, if it ever is
            making.drop()
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:  # noqa: BLE001
                pass
            self._admin = None


class KafkaPythonClient:
    name = NAME
    size_option = "max_request_size"  # the producer's limit on one request, in this library's name

    def consumer(self, settings: ClientSettings, on_commit: CommitCallback) -> KafkaPythonConsumer:
        try:
            return KafkaPythonConsumer(settings, on_commit)
        except KafkaError as exc:
            raise _error(exc) from exc

    def producer(self, settings: ClientSettings) -> KafkaPythonProducer:
        try:
            return KafkaPythonProducer(settings)
        except KafkaError as exc:
            raise _error(exc) from exc

    def probe(self, settings: ClientSettings) -> KafkaPythonProbe:
        return KafkaPythonProbe(settings)

    def max_record_bytes(self, options: Mapping[str, Any]) -> int:
        return int(options.get("max_request_size", _DEFAULT_MAX_REQUEST)) - _FRAMING

    def check_options(self, options: Mapping[str, Any]) -> None:
        check_passthrough(options, OWNED, "are set by depois-stream itself (use its own flags)")
