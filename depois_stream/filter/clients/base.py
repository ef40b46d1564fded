"""The Kafka seam: what the stream filter needs from a client library, and nothing more.

Two implementations sit behind it: kafka-python (pure Python, always installed) and
confluent-kafka (librdkafka, ``pip install 'depois-stream[fast]'``). The filter's source,
delivery and probe code is written once against these protocols, so every guarantee (no record
lost on a rebalance, commits never ahead of acknowledgements, bounded waits) is the same with
either library and is tested against a real broker with both.

Records cross the seam as a columnar ``RecordBatch`` rather than one object per record: the
pipeline works on arrays, and building the columns in the client's own loop is the cheapest
place to touch each record once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from depois_stream.contract.headers import Header

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition): client-neutral and hashable

# Each step of the way out that waits on the broker (the final synchronous commit, closing the
# producer, leaving the group) waits at most this long: with the drain of the batches in flight
# (at most 10 s) the filter exits within about 20 s even when the broker does not answer, inside
# compose's 30 s stop grace period and the manifests' 45 s. A healthy broker answers in ms.
SHUTDOWN_STEP_S = 3.0

# The key, value and header bytes the filter holds in hand for one batch before it stops reading
# more into it: the linger window stops there (source.Source), and so does a kafka-python poll.
# A confluent-kafka poll hands over what librdkafka prefetched and decompressed, up to
# --batch-size records, before anything could refuse it (its prefetch limit counts bytes on the
# wire): with that client the bound holds between polls only. Without it,
# --batch-size records of any size were gathered: 25 records of 20 MiB of zeros, 18 kB of zstd
# on the wire, made one 500 MiB batch (a reviewer's find, stop 47). A batch of 512 digits
# images is 0.4 MB; images of 1 MiB make batches of 64, at the same rate.
MAX_HELD_BYTES = 64 << 20


# A transactional call that has not returned this long after its own timeout is taken as wedged
# (bound = TXN_BOUND_FACTOR * timeout + TXN_GRACE_S: 50 s at the default 30 s delivery timeout;
# one such call stays under the /healthz stall limit of 90 s, a transaction makes up to three).
TXN_BOUND_FACTOR = 1.5
TXN_GRACE_S = 5.0
_SLICE_S = 0.1  # how often a bounded call's waiter looks at the stop request

# Threads of calls given up on that are still inside the library (see ``abandoned_calls``).
_abandoned: list[threading.Thread] = []
_abandoned_lock = threading.Lock()


def abandoned_calls() -> int:
    """How many calls ``call_bounded`` gave up on are still running inside the library.

    Each may hold a whole client handle (a wedged transactional producer keeps its threads,
    sockets and buffers until its call returns), and against a broker that never answers a
    new one is abandoned every bound (about a minute). The filter exports the count
    (``depois_client_calls_abandoned``) and fails liveness above a cap, so that an orchestrator
    restarts the process, which frees them, before they exhaust its memory."""
    with _abandoned_lock:
        _abandoned[:] = [t for t in _abandoned if t.is_alive()]
        return len(_abandoned)


def call_bounded(call: Callable[[], object], timeout_s: float, name: str,
                 abandon: threading.Event | None = None) -> bool:
    """Run ``call`` on a daemon thread and wait for it at most ``timeout_s``.

    True when it returned (an exception it raised is raised here); False when it is still
    running, and then the thread is left behind. For librdkafka calls that wait on the broker
    without a timeout of their own (a synchronous commit, closing a consumer) or past the one
    they were given (transactional calls against a broker that lost its state): a blocked C call
    cannot be interrupted, only abandoned. With ``abandon``, the wait also ends
    ``SHUTDOWN_STEP_S`` after that event is first seen set: a stop asked for while the broker is
    silent must not wait out a transaction's full bound, while a call in flight when the stop
    comes still gets those seconds to complete (a healthy broker answers in ms)."""
    outcome: list[BaseException | None] = []
    given_up: list[bool] = []  # set, under the lock, once the caller stops waiting
    lock = threading.Lock()

    def attempt() -> None:
        error: BaseException | None = None
        try:
            call()
        except BaseException as exc:  # handed to the caller's thread below
            error = exc
        with lock:
            if not given_up:
                outcome.append(error)
        # an error nobody will raise is dropped here, not kept in ``outcome``: its traceback
        # holds this frame, whose closure holds ``outcome`` and ``call`` (the client handle)
        del error

    worker = threading.Thread(target=attempt, name=name, daemon=True)
    started = time.monotonic()
    worker.start()
    if abandon is None:
        worker.join(timeout_s)
    else:
        stop_seen: float | None = None
        while worker.is_alive():
            now = time.monotonic()
            if stop_seen is None and abandon.is_set():
                stop_seen = now
            if now - started >= timeout_s or (stop_seen is not None
                                              and now - stop_seen >= SHUTDOWN_STEP_S):
                break
            worker.join(min(_SLICE_S, timeout_s - (now - started)))
    with lock:
        if not outcome:
            given_up.append(True)
            with _abandoned_lock:
                _abandoned.append(worker)
            return False
    error = outcome.pop()
    if error is not None:
        # Raised without a reference cycle: the error's traceback holds attempt()'s frame
        # (whose closure holds ``outcome``) and this frame (whose local holds the error).
        # Cycles wait for a full garbage collection, which the filter's tuned collector rarely
        # runs, and this one kept the failed call's client handle alive: a librdkafka producer
        # whose init_transactions timed out, 4 threads leaked per retry during an outage.
        try:
            raise error
        finally:
            del error  # nor from this frame, which the traceback holds in turn
    return True


class Construction:
    """A client built on a thread of its own, waited for a bounded time, possibly more than once.

    kafka-python bootstraps inside its constructors and, once a connection is open, waits on it
    past its own ``bootstrap_timeout_ms``: against a listener that accepts the connection and
    never answers the TLS hello (``security_protocol=SSL`` against a plaintext port: the broker
    reads the hello as the start of a request and waits for the rest) the filter's start-up
    probe and replay's reads waited forever, deaf to SIGTERM. ``result`` waits at most its
    timeout and may be asked again (the probe's next check waits on the same attempt instead of
    starting another); ``drop`` gives up on it: a client that is still made later is closed at
    once, and a thread that never returns is counted in ``abandoned_calls``."""

    def __init__(self, make: Callable[[], Any], name: str) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._dropped = False
        self._thread = threading.Thread(target=self._run, args=(make,), name=name, daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], Any]) -> None:
        try:
            value = make()
        except BaseException as exc:  # handed to whoever asks for the result
            with self._lock:
                # without its traceback, which holds this frame and so this object: a cycle
                # only a full collection frees (rare in the filter), kept per failed check
                self._error = exc.with_traceback(None)
                self._done.set()
            return
        with self._lock:
            self._value = value
            self._done.set()
            dropped = self._dropped
        if dropped:
            close_quietly(value)

    def result(self, timeout_s: float) -> Any:
        """The client once made (an error its constructor raised is raised here); None while it
        is still being made after ``timeout_s``."""
        if not self._done.wait(timeout_s):
            return None
        if self._error is not None:
            raise self._error
        return self._value

    def drop(self) -> None:
        with self._lock:
            self._dropped = True
            value, done = self._value, self._done.is_set()
        if done:
            close_quietly(value)
        else:
            with _abandoned_lock:
                _abandoned.append(self._thread)


def close_quietly(client: Any) -> None:
    """``client.close()`` for a client given up on, an error only logged at DEBUG."""
    try:
        if client is not None:
            client.close()
    except Exception:  # noqa: BLE001  (a client given up on: nothing left to report to)
        log.debug("closing a client given up on failed", exc_info=True)


def construct(make: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``make()``, or a retriable ``ClientError`` naming ``what`` once ``timeout_s`` passed
    without it returning (see ``Construction``)."""
    attempt = Construction(make, what)
    value = attempt.result(timeout_s)
    if value is None:
        attempt.drop()
        raise ClientError(f"{what}: no answer from the broker within {timeout_s:g} s (a broker "
                          "that accepts connections but does not answer, or a TLS setting "
                          "against a plaintext listener)", retriable=True)
    return value


class TransactionGuard:
    """Transactional calls that talk to the broker, bounded, and the producer they wedge.

    Each call runs on a thread of its own (``call_bounded``) and is waited for at most
    ``TXN_BOUND_FACTOR * timeout + TXN_GRACE_S``, or ``SHUTDOWN_STEP_S`` once the filter is
    stopping. A call that has not returned by then marks the producer *wedged*: it and every
    later call on it fail as retriable without touching the library, so the abort that follows
    does not block too, and the delivery layer rewinds the batch and replaces the producer (the
    new one's ``init_transactions`` under the same ``transactional.id`` fences the old one; a
    stuck commit is settled from the group's committed offsets, ``Delivery``). Why both
    libraries need it: librdkafka 2.16's ``send_offsets_to_transaction`` blocked for minutes
    past its own timeout against a broker that had lost its transaction state, and
    kafka-python's ``commit_transaction`` and ``send_offsets_to_transaction`` take no timeout
    (55 s against a frozen broker), which made a stop during an outage outlast a 30 s grace
    period. The stuck thread (a daemon) keeps the old handle; it is leaked, not destroyed,
    because destroying a handle with a call still inside it could block as well."""

    def __init__(self, library: str, stopping: threading.Event) -> None:
        self.library = library
        self.stopping = stopping
        self.wedged: str | None = None  # why the producer is no longer called, once it is not

    def check(self, what: str) -> None:
        """Refuse any call, local ones included, on a wedged producer."""
        if self.wedged is not None:
            raise ClientError(f"{what}: not attempted, the producer is wedged ({self.wedged})",
                              retriable=True)

    def call(self, call: Callable[[], object], what: str, timeout_s: float | None) -> None:
        """Make ``call`` (exceptions it raises are the library's own: translate them). With no
        ``timeout_s`` it is a local call (``begin_transaction``): refused on a wedged producer,
        otherwise made on the caller's thread."""
        self.check(what)
        if timeout_s is None:
            call()
            return
        bound = TXN_BOUND_FACTOR * timeout_s + TXN_GRACE_S
        if call_bounded(call, bound, f"{self.library}-{what}", abandon=self.stopping):
            return
        if self.stopping.is_set():
            self.wedged = f"{what} abandoned: stopping while the broker did not answer"
            log.warning("%s's %s had not returned %.0f s into the stop; it is abandoned (an "
                        "open transaction is never committed: its records are filtered again "
                        "from the committed offsets)", self.library, what, SHUTDOWN_STEP_S)
        else:
            self.wedged = f"{what} did not return within {bound:.0f} s"
            log.warning("%s's %s did not return within %.0f s (its own timeout is %.0f s); the "
                        "transaction is abandoned and the producer replaced", self.library, what,
                        bound, timeout_s)
        raise ClientError(self.wedged, retriable=True)


class Unreadable(tuple):
    """In place of a record's headers: the client could not read this record, and why.

    Kafka brokers store a record's bytes unchecked, so a hostile or broken producer can write
    what no Python client will parse (header names that are not UTF-8, for one): librdkafka then
    fails on that record's headers only, kafka-python on the whole fetch (then spinning on it).
    An adapter that meets such a record hands it over with whatever it could read (key and value
    where it has them) and this marker: an empty header list, so nothing else needs a special
    case, that the pipeline dead-letters as ``malformed`` with ``error`` as the message. The
    partition moves on and the record is accounted for, never skipped silently."""

    error: str

    def __new__(cls, error: str) -> "Unreadable":
        self = super().__new__(cls)
        self.error = error
        return self


Headers = Sequence[Header] | Unreadable | None
DeliveryCallback = Callable[[BaseException | None], None]


class ClientError(Exception):
    """A client call failed; ``retriable`` says whether the same call may succeed later."""

    def __init__(self, message: str, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class MissingTopic(ClientError):
    """The broker answered, and the topic is not there (the filter never creates topics)."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist", retriable=False)


class ProduceError(ClientError):
    """One output record was not produced, synchronously at ``send`` or in its delivery report.

    Three kinds, because each needs its own remedy:

    * retriable (timeout, broker down, leader moving): send the batch again later;
    * ``rejected`` (the record itself is refused: too large, invalid): it will never be taken
      in this form, so the filter dead-letters it without its payload;
    * ``fatal`` (anything else that is not retriable, e.g. the broker forgot the idempotent
      producer's id after a restart): the producer handle is unusable, so the filter makes a
      new one and sends the batch again. Never a reason to dead-letter a record.
    """

    def __init__(self, message: str, retriable: bool, rejected: bool = False) -> None:
        super().__init__(message, retriable)
        self.rejected = rejected and not retriable
        self.fatal = not retriable and not rejected


@dataclass
class RecordBatch:
    """Records of one ingest topic, one entry per record in the order they were consumed."""

    topic: str
    partitions: np.ndarray  # int32 [n]
    offsets: np.ndarray  # int64 [n]
    timestamps_ms: np.ndarray  # int64 [n]
    keys: list[bytes | None]
    values: list[bytes | None]
    headers: list[Headers]

    def __len__(self) -> int:
        return len(self.values)

    @property
    def held_bytes(self) -> int:
        """Key, value and header value bytes (what MAX_HELD_BYTES bounds): a header is inside
        the compressed record batch too, so it can be a bomb as well."""
        return (sum(len(v) for v in self.values if v) + sum(len(k) for k in self.keys if k)
                + sum(len(v) for h in self.headers if isinstance(h, list) for _, v in h if v))

    @classmethod
    def empty(cls, topic: str) -> RecordBatch:
        return cls(topic, np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                   [], [], [])

    @classmethod
    def unreadable(cls, topic: str, partitions: Sequence[int], offsets: Sequence[int],
                   reasons: Sequence[str]) -> RecordBatch:
        """Placeholders for records the client cannot read: no key, no value, an
        ``Unreadable`` marker as headers (dead-lettered as malformed), and no timestamp (-1, as
        Kafka writes "none"): stamped with the time of reading, the dead letter's source
        timestamp was made up, and fed the end-to-end latency metric."""
        n = len(partitions)
        return cls(topic, np.array(partitions, np.int32), np.array(offsets, np.int64),
                   np.full(n, -1, np.int64), [None] * n, [None] * n,
                   [Unreadable(why) for why in reasons])

    @classmethod
    def concat(cls, topic: str, parts: Sequence[RecordBatch]) -> RecordBatch:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(topic)
        if len(parts) == 1:
            return parts[0]
        return cls(topic, np.concatenate([p.partitions for p in parts]),
                   np.concatenate([p.offsets for p in parts]),
                   np.concatenate([p.timestamps_ms for p in parts]),
                   [k for p in parts for k in p.keys], [v for p in parts for v in p.values],
                   [h for p in parts for h in p.headers])

    def positions(self) -> RecordBatch:
        """The same records without keys, values or headers: where they came from, no more."""
        n = len(self)
        return RecordBatch(self.topic, self.partitions, self.offsets, self.timestamps_ms,
                           [None] * n, [None] * n, [None] * n)

    def select(self, mask: np.ndarray) -> RecordBatch:
        """The records where ``mask`` is true (a boolean array of length n)."""
        idx = np.flatnonzero(mask).tolist()
        return RecordBatch(self.topic, self.partitions[mask], self.offsets[mask],
                           self.timestamps_ms[mask], [self.keys[i] for i in idx],
                           [self.values[i] for i in idx], [self.headers[i] for i in idx])

    def first_offsets(self) -> dict[TP, int]:
        """Per partition, its smallest offset here (where to rewind to). By offset, not by
        position: a client may append a placeholder for an unreadable record after records
        it read past it."""
        return self._per_partition(np.min)

    def next_offsets(self) -> dict[TP, int]:
        """Per partition, one past its largest offset here (what a commit of this batch says)."""
        return {tp: off + 1 for tp, off in self._per_partition(np.max).items()}

    def _per_partition(self, reduce: Callable[[np.ndarray], Any]) -> dict[TP, int]:
        """``reduce`` of each partition's offsets, one numpy pass per partition (a batch holds
        a few partitions and hundreds of records: a Python loop per record cost 4x as much)."""
        parts, offsets = self.partitions, self.offsets
        return {(self.topic, p): int(reduce(offsets[parts == p])) for p in np.unique(parts).tolist()}


@dataclass
class ClientSettings:
    """Everything a client needs to be built; the filter decides all of it but ``options``."""

    bootstrap_servers: str
    client_id: str
    group_id: str | None = None
    auto_offset_reset: str = "earliest"
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 1000
    max_poll_records: int = 512
    read_committed: bool = False
    delivery_timeout_ms: int = 30000
    transactional_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # pass-through (security, tuning)
    # set when the filter is asked to stop: transactional calls then give up sooner
    # (``TransactionGuard``)
    stopping: threading.Event = field(default_factory=threading.Event)


# on_assign returns the start offset to use for some of the newly assigned partitions: the
# records a revocation made the filter drop (see source.Source). on_revoke and on_lost are told
# which partitions went away.
AssignCallback = Callable[[list[TP]], Mapping[TP, int]]
RevokeCallback = Callable[[list[TP]], None]


class Consumer(Protocol):
    def subscribe(self, topic: str, on_assign: AssignCallback, on_revoke: RevokeCallback,
                  on_lost: RevokeCallback) -> None:
        """Join the group. Every partition of an assignment starts unpaused, one kept through
        the rebalance included (both libraries would keep its pause flag, and a pause lifted
        between revocation and assignment would never reach it); the source pauses them again
        after the poll if it is paused."""
        ...

    def poll(self, timeout_s: float, max_records: int) -> RecordBatch:
        """Up to ``max_records`` records; rebalance callbacks run inside this call only."""
        ...

    def seek(self, tp: TP, offset: int) -> None: ...

    def unreadable_at(self, tp: TP, offset: int, timeout_s: float) -> RecordBatch:
        """The records from ``offset`` on that this client cannot read and does not say so, as
        ``Unreadable`` records (empty when there are none, or it cannot tell within
        ``timeout_s``); the caller dead-letters them and seeks past. Asked by the stall watch
        when a restart at ``offset`` did not help; raises ClientError."""
        ...

    def pause(self, tps: Iterable[TP]) -> None: ...

    def resume(self, tps: Iterable[TP]) -> None: ...

    def commit(self, offsets: Mapping[TP, int], asynchronous: bool,
               timeout_s: float = SHUTDOWN_STEP_S) -> None:
        """Commit next offsets; synchronous failures raise ClientError, asynchronous ones are
        reported through the ``on_commit`` callback given when the client was made. A
        synchronous commit that has not completed after ``timeout_s`` raises ClientError too."""
        ...

    def committed(self, tps: Sequence[TP], timeout_s: float) -> dict[TP, int | None]:
        """The group's committed next offsets (None where nothing was committed); raises
        ClientError when the broker does not answer within ``timeout_s``."""
        ...

    def lag(self, tps: Sequence[TP], timeout_s: float) -> dict[TP, int]:
        """Records between this member's position and the end of each partition, every one of
        ``tps`` included: one that has handed no record yet is measured from where it will
        start (the group's commit, else where ``auto_offset_reset`` puts it); a partition left
        out is never counted as caught up."""
        ...

    def watermarks(self, tps: Sequence[TP], timeout_s: float,
                   listed: bool = False) -> dict[TP, tuple[int, int]]:
        """(first offset, end offset) of each partition's log, as the broker lists them now;
        raises ClientError when it does not answer within ``timeout_s``. The end may be taken
        further by the high watermark of the client's last fetch (Tansu's listing lags it),
        unless ``listed``: after the broker replaced a log, that cached value is the old log's."""
        ...

    def topic_id(self, topic: str) -> str | None:
        """``topic``'s id (KIP-516) as the client last learnt it, or None while it does not
        know (older brokers give none). A new id under the same name is a new log: the topic
        was re-created, or the broker lost its logs. Never waits on the broker: the source asks
        at every poll (kafka-python reads its metadata; confluent-kafka asks an AdminClient in
        the background every few seconds, its consumer metadata having no id)."""
        ...

    def topic_replaced(self) -> None:
        """The subscribed topic came back under a new id (``topic_id``): make sure the group
        sees the new log's partitions (a member may have rejoined while the topic was missing
        and hold none)."""
        ...

    def group_metadata(self) -> Any: ...

    def close(self, timeout_s: float = SHUTDOWN_STEP_S) -> None:
        """Leave the group (so the next member need not wait for a session timeout), waiting at
        most ``timeout_s`` for the broker; past that the member is left to time out."""
        ...


class Producer(Protocol):
    def partition_count(self, topic: str) -> int: ...

    def send(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
             headers: Sequence[Header], on_done: DeliveryCallback) -> None:
        """Queue one record; ``on_done(None)`` once acknowledged, ``on_done(error)`` when not.

        Raises ProduceError when the client refuses the record outright."""
        ...

    def poll(self, timeout_s: float) -> None:
        """Serve delivery reports, waiting at most ``timeout_s`` for one."""
        ...

    def flush(self, timeout_s: float) -> int:
        """Wait until everything queued was reported; returns how many were not."""
        ...

    def init_transactions(self, timeout_s: float) -> None: ...

    def begin_transaction(self) -> None: ...

    def send_offsets_to_transaction(self, offsets: Mapping[TP, int], group_metadata: Any,
                                    timeout_s: float) -> None: ...

    def commit_transaction(self, timeout_s: float) -> None: ...

    def abort_transaction(self, timeout_s: float) -> None: ...

    def close(self, timeout_s: float) -> None: ...


class Probe(Protocol):
    def check(self, timeout_s: float) -> bool:
        """One metadata request to the cluster: did any broker answer?"""
        ...

    def close(self) -> None: ...


CommitCallback = Callable[[BaseException | None], None]


class Client(Protocol):
    """A Kafka client library: makes the three handles the filter uses."""

    name: str
    size_option: str  # the option that bounds one produced record (max_record_bytes reads it)

    def consumer(self, settings: ClientSettings, on_commit: CommitCallback) -> Consumer: ...

    def producer(self, settings: ClientSettings) -> Producer: ...

    def probe(self, settings: ClientSettings) -> Probe: ...

    def max_record_bytes(self, options: Mapping[str, Any]) -> int:
        """The most one produced record (key + value + headers) may weigh with ``options``."""
        ...

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ValueError naming options this library does not know or the filter owns."""
        ...
