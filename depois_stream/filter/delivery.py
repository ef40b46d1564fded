"""The produce side: send each batch's outputs, and commit its offsets only once they are safe.

The one rule never to break: **an offset is committed only after every output of every record
before it was acknowledged by the broker** (``acks=all``, idempotent producer). A crash at any
point therefore re-delivers, never skips.

Within that rule the filter does not wait: batch k+1 is read, decoded and scored while batch k's
outputs are still on their way (up to ``max_in_flight`` batches), and commits are asynchronous.
Batches are settled strictly in order: the commit for batch k covers every acknowledged batch
before it and nothing after.

When the broker does not acknowledge an output:

* **retriable** (timeout, broker down, leader moving): the batch and every later batch still in
  flight are abandoned and their partitions rewound to the batch's first record, then re-sent
  after an exponential backoff (``retry_backoff_max_s``), one batch at a time until the broker
  takes one again. Re-sending from the first unacknowledged record keeps per-key order: the last
  copy of every output comes after every output of its key that precedes it in the source.
* **rejected** (the broker will never take this record: too large for a topic's limit, invalid):
  the batch is re-processed at once with that record routed to the dead-letter topic without its
  payload (error class ``rejected_by_broker``), so one bad record can never stop a partition.
* **fatal** (the producer handle itself is broken, e.g. a restarted broker forgot its idempotent
  producer id): handled as retriable, and the producer is replaced by a new one as soon as
  nothing else is in flight on it; it is also replaced after ``RENEW_AFTER`` failed attempts in
  a row, which gets a client out of any state the broker no longer shares.

Outputs acknowledged before such a failure are produced again by the retry: at-least-once means
duplicates are possible (for the batches in flight), losses are not. With ``exactly_once`` every
batch is one Kafka transaction (outputs + offsets), sent one at a time.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from depois_stream.filter.clients.base import (
    TP, ClientError, Consumer, ProduceError, Producer, RecordBatch,
)
from depois_stream.filter.metrics import Metrics
from depois_stream.filter.pipeline import BARE_AFTER, Refusal, Routed
from depois_stream.filter.source import Source

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
MAX_REMEMBERED_REJECTIONS = 10_000
RENEW_AFTER = 3  # failed attempts in a row after which the producer is replaced
# Delivery timeouts a batch may wait for its reports before its producer counts as wedged.
REPORTS_WITHIN = 2


def commit_answered(metrics: Metrics, error: BaseException | None) -> None:
    """Count one offset commit once its outcome is known: the broker's answer to an
    asynchronous one (the consumer's ``on_commit``), a synchronous one's return, a committed
    transaction. Counted at send time, a filter whose commits were all refused looked healthy
    to DepoisConsumerStalled, which reads the timestamp."""
    if error is None:
        metrics.commits.inc()
        metrics.last_batch_timestamp.set_to_current_time()
        return
    metrics.commit_failures.inc()
    log.warning("offset commit failed (%s); the records after the last commit will be filtered "
                "again", error)


class DeliveryError(RuntimeError):
    """Outputs could not be produced within the configured retries; nothing past the first
    unacknowledged record was committed."""


@dataclass
class _InFlight:
    seq: int
    batch: RecordBatch
    routed: Routed
    pending: int
    failure: ProduceError | None = None  # first retriable failure
    rejected: dict[int, str] = field(default_factory=dict)  # output index -> why refused
    failed: int = 0  # records not acknowledged
    sent_at: float = 0.0  # the delivery clock once its outputs were handed to the producer

    @property
    def broken(self) -> bool:
        return self.failure is not None or bool(self.rejected)


class Delivery:
    """Sends routed batches, settles them in order, commits, and retries what failed."""

    def __init__(self, make_producer: Callable[[], Producer], consumer: Consumer, source: Source,
                 metrics: Metrics, topics: tuple[str, str, str], *,
                 on_delivered: Callable[[Routed], None],
                 max_in_flight: int = 4, retries: int | None = None,
                 retry_backoff_max_s: float = 30.0, delivery_timeout_s: float = 30.0,
                 exactly_once: bool = False, clock: Callable[[], float] = time.monotonic,
                 stopping: threading.Event | None = None,
                 broker_up: Callable[[], bool] = lambda: False) -> None:
        # set when the filter is asked to stop (``StreamFilter.run``'s event)
        self._make_producer = make_producer
        self._stopping = stopping or threading.Event()
        self._consumer = consumer
        self._source = source
        self._metrics = metrics
        self._topics = topics
        self._on_delivered = on_delivered
        self._max_in_flight = 1 if exactly_once else max(1, max_in_flight)
        self._retries = retries
        self._broker_up = broker_up  # the direct probe's answer (unknown: False)
        self._backoff_max_s = retry_backoff_max_s
        self._timeout_s = delivery_timeout_s
        self._exactly_once = exactly_once
        self._clock = clock
        self._seq = 0
        self._inflight: deque[_InFlight] = deque()
        self._by_seq: dict[int, _InFlight] = {}
        self._reports: deque[tuple[int, int, ProduceError | None]] = deque()
        self._acked: dict[TP, int] = {}  # next offsets of everything acknowledged
        # exactly-once: partitions of a transaction whose commit was not confirmed (it may have
        # completed); they resume at the group's committed offsets once that is settled
        # an exactly-once batch whose commit was not confirmed: its commit offsets and what it
        # routed, counted once the group's committed offsets say it did commit
        self._unsettled: tuple[dict[TP, int], Routed] | None = None
        self._attempts = 0  # consecutive failed attempts
        self._failed_records = 0  # outputs the last failed attempt left unacknowledged
        self._retry_turn: float | None = None  # since when the next attempt could have started
        self._blocked_until = 0.0
        self._renew = False  # replace the producer once nothing is in flight on it
        self.rejected: OrderedDict[tuple[int, int], Refusal] = OrderedDict()
        self.producer = self._new_producer()

    # ---------------------------------------------------------------- the producer

    def _new_producer(self) -> Producer:
        producer = self._make_producer()
        if self._exactly_once:
            producer.init_transactions(self._timeout_s)
        return producer

    def _renew_when_due(self) -> None:
        """Replace a failed producer once nothing is in flight on it (with exactly-once, that
        is between transactions). Not on the way out: nothing more will be sent, and making a
        producer waits on the broker (kafka-python's bootstrap took 30 s during an outage,
        past a stop's grace period); what was not committed is filtered again by the next
        owner."""
        if self._renew and not self._inflight and not self._stopping.is_set():
            self._renew_producer()

    def _renew_producer(self) -> None:
        """Replace a producer that failed (its pending reports no longer matter)."""
        try:
            new = self._new_producer()
        except ClientError as exc:  # keep the old one until a new one can be made
            log.warning("could not create a new producer yet (%s)", exc)
            return
        old, self.producer, self._renew = self.producer, new, False
        try:
            old.close(0.0)
        except Exception as exc:  # noqa: BLE001  (it is broken already; say so and move on)
            log.warning("closing the failed producer: %s", exc)
        log.warning("replaced the producer after failed deliveries")

    def close(self, timeout_s: float) -> None:
        self.producer.close(timeout_s)

    # ---------------------------------------------------------------- state

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def full(self) -> bool:
        """No room for another batch (one at a time while recovering from a failure)."""
        return len(self._inflight) >= (1 if self._attempts else self._max_in_flight)

    @property
    def backing_off(self) -> bool:
        return self._clock() < self._blocked_until or self._unsettled is not None

    # ---------------------------------------------------------------- sending

    def submit(self, batch: RecordBatch, routed: Routed) -> None:
        """Send every output of ``batch`` (asynchronously unless exactly-once)."""
        self._seq += 1
        # where the records came from is all an item needs of its batch (a retry reads them
        # again): their payloads, records too large to forward included, are not kept in flight
        item = _InFlight(self._seq, batch.positions(), routed, pending=len(routed))
        if self._exactly_once:
            self._transaction(item)
            return
        self._inflight.append(item)
        self._by_seq[item.seq] = item
        self._send(item)
        item.sent_at = self._clock()  # each report is due a delivery timeout after its send returned
        self.service(0.0)

    def _send(self, item: _InFlight) -> None:
        r, topics, send = item.routed, self._topics, self.producer.send
        report = self._report
        dest, parts = r.destination.tolist(), r.partitions.tolist()
        for i, (d, p, k, v, h) in enumerate(zip(dest, parts, r.keys, r.values, r.headers)):
            try:
                send(topics[d], p, k, v, h, functools.partial(report, item.seq, i))
            except ProduceError as exc:
                self._reports.append((item.seq, i, exc))
                if not exc.rejected:  # the client cannot take more now: stop, retry later
                    item.pending -= len(dest) - i - 1
                    break

    def _report(self, seq: int, index: int, error: BaseException | None) -> None:
        """Delivery callback (kafka-python: its IO thread; librdkafka: inside poll/flush, or on
        the thread of a bounded transactional call). It must only append to the queue: an
        abandoned call's thread may still run it while the main thread works."""
        if error is not None and not isinstance(error, ProduceError):
            error = ProduceError(str(error), retriable=True)
        self._reports.append((seq, index, error))

    # ---------------------------------------------------------------- settling

    def service(self, timeout_s: float = 0.0) -> None:
        """Take delivery reports (waiting at most ``timeout_s`` for one), settle finished
        batches in order and commit them; start the retry of a failed one."""
        self._renew_when_due()
        self._settle_unconfirmed_commit()
        self._count_a_retry_that_cannot_start()
        try:
            self.producer.poll(0.0 if self._reports else timeout_s)
        except ProduceError as exc:  # the handle failed as a whole (librdkafka raises fatal errors here)
            self._producer_failed(exc)
        self._take_reports()
        self._give_up_on_silent_reports()
        for k, item in enumerate(self._inflight):
            if item.broken:
                self._retry(k, item)
                break
        done: list[_InFlight] = []
        while self._inflight and self._inflight[0].pending <= 0 and not self._inflight[0].broken:
            item = self._inflight.popleft()
            del self._by_seq[item.seq]
            done.append(item)
        if done:
            self._attempts = 0
            for item in done:
                self._acked.update(item.batch.next_offsets())
                self._on_delivered(item.routed)
            self._commit(asynchronous=True)

    def _give_up_on_silent_reports(self) -> None:
        """Fail what is in flight once the oldest batch has waited twice the delivery timeout
        for its reports. Both clients report every send within the delivery timeout, success or
        failure; after a 45 s broker freeze a kafka-python producer never did (its close timed
        out too), and with no report nothing was retried, committed or counted, for good (the
        outage drill of stop 47). A producer that silent is wedged: it is replaced, and the
        batches are sent again from their first records."""
        if not self._inflight:
            return
        oldest = self._inflight[0]
        waited = self._clock() - oldest.sent_at
        if oldest.broken or oldest.pending <= 0 or waited < REPORTS_WITHIN * self._timeout_s:
            return
        self._producer_failed(ProduceError(
            f"no delivery report for {oldest.pending} output record(s) {waited:.0f} s after they "
            f"were sent (the delivery timeout is {self._timeout_s:.0f} s): the producer is wedged",
            retriable=False))

    def _producer_failed(self, error: ProduceError) -> None:
        """Every batch in flight failed with ``error`` (their reports may never come): they are
        retried from their first records, on a new producer when the error is fatal."""
        log.warning("the producer failed (%s); resending the %d batch(es) in flight%s", error,
                    len(self._inflight), " on a new producer" if error.fatal else "")
        for item in self._inflight:
            item.failure = item.failure or error
            item.failed = max(item.failed, item.pending)  # unacknowledged, for the metric and the log
        self._renew = self._renew or error.fatal

    def _take_reports(self) -> None:
        while self._reports:
            seq, index, error = self._reports.popleft()
            item = self._by_seq.get(seq)
            if item is None:
                continue  # a batch abandoned for a retry: its reports no longer matter
            item.pending -= 1
            if error is None:
                continue
            item.failed += 1
            if error.rejected:
                item.rejected[index] = str(error)
            else:
                item.failure = item.failure or error
                self._renew = self._renew or error.fatal

    def revoked(self, tps: set[TP]) -> None:
        """Partitions this member no longer owns (``Source``'s revocation, before any new
        assignment). What was acknowledged for them and not committed belongs to the ownership
        that ended: kept, it was committed with another partition's next batch once the
        partition came back, moving the group's commit behind the new owner's. Those records
        were delivered, so nothing is lost by dropping it: a member that gets the partition
        resumes at the group's commit (filtering them again) or, this member, past them.
        Batches still in flight stay as they are: this member resumes a returning partition
        after them, so a failed one must still rewind it (``_retry``), or its records would
        be skipped."""
        for tp in tps:
            self._acked.pop(tp, None)

    def log_restarted(self, tps: set[TP]) -> None:
        """Partitions the source restarted in a new log (the broker lost the old one). What was
        acknowledged for them, and the broker's refusals remembered by offset, were about the
        old log's records: a new record at a remembered offset was dead-lettered as refused
        without being sent (a diff review, stop 46), and an old acknowledgement committed an
        offset of the old log into the new one."""
        self.revoked(tps)  # its acknowledgements go as a revocation's do
        parts = {p for _, p in tps}
        for key in [k for k in self.rejected if k[0] in parts]:
            del self.rejected[key]

    def _commit(self, asynchronous: bool) -> None:
        owned = {tp: off for tp, off in self._acked.items() if tp in self._source.assigned}
        self._acked = owned  # a partition that moved away is its new owner's to commit
        if not owned:
            return
        try:
            self._consumer.commit(owned, asynchronous=asynchronous)
        except ClientError as exc:
            commit_answered(self._metrics, exc)
            return
        if not asynchronous:  # an asynchronous one counts when the broker answers (on_commit)
            commit_answered(self._metrics, None)

    def _retry(self, k: int, item: _InFlight) -> None:
        """Abandon ``item`` and every later batch, rewind their partitions, try again."""
        abandoned = [self._inflight[j] for j in range(k, len(self._inflight))]
        for _ in abandoned:
            gone = self._inflight.pop()
            self._by_seq.pop(gone.seq, None)
        rewind: dict[TP, int] = {}
        for a in abandoned:  # the smallest first offset per partition, whatever the order
            for tp, off in a.batch.first_offsets().items():
                rewind[tp] = min(rewind.get(tp, off), off)
        if item.rejected:
            item.failure = item.failure or self._remember_rejections(item)
        if item.failure is not None:
            self._metrics.delivery_failures.labels("retriable").inc(item.failed
                                                                    - len(item.rejected))
            self._backoff(item.failure, item.failed, rewind)
        self._source.rewind(rewind)

    def _remember_rejections(self, item: _InFlight) -> ProduceError | None:
        """Remember each refused record so that the retry dead-letters it without its value, and
        without its key and producer headers once it was refused again (``pipeline.score``).
        A record refused even bare cannot be written in any form: the error returned for that
        is a retriable failure to back off on (the dead-letter topic's settings are wrong),
        never a hot loop; None otherwise (the retry goes at once: it differs)."""
        parts, offs = item.batch.partitions.tolist(), item.batch.offsets.tolist()
        refused_bare = 0
        for i, why in item.rejected.items():
            key = (parts[i], offs[i])
            before = self.rejected.pop(key, None)
            times = 1 if before is None else before.times + 1
            refused_bare += times > BARE_AFTER
            self.rejected[key] = Refusal(f"the broker refused the forwarded record: {why}",
                                         min(times, BARE_AFTER + 1))
            while len(self.rejected) > MAX_REMEMBERED_REJECTIONS:
                self.rejected.popitem(last=False)
        self._metrics.delivery_failures.labels("rejected").inc(len(item.rejected))
        if refused_bare:
            return ProduceError(
                f"{refused_bare} dead letter(s) refused even without value, key and producer "
                f"headers ({next(iter(item.rejected.values()))}): check the dead-letter topic's "
                "max.message.bytes and cleanup.policy (compaction refuses records without a key)",
                retriable=True)
        log.warning("%d record(s) of a batch were refused by the broker (%s); they are "
                    "dead-lettered without their payload (without key and headers too if refused "
                    "again) and the batch is sent again",
                    len(item.rejected), next(iter(item.rejected.values())))
        return None

    def _count_a_retry_that_cannot_start(self) -> None:
        """With a retry limit, after a failed attempt, every delivery timeout that passes with
        the broker unreachable and no attempt under way counts as one more failed attempt. The
        batch to send again is read back from the broker first; with the broker gone it never
        is, no attempt was ever counted again, and ``--produce-retries`` never gave up (the
        partitions may even be lost to a session timeout first). Never while the broker answers
        the direct probe: the batch is then read back and sent, or nothing is left to send (a
        transaction that did commit, partitions another member took or moved past it). Nor
        while a batch is in flight (its own outcome counts) or the source is paused (a breaker
        holding the stream)."""
        if (self._retries is None or not self._attempts or self._inflight or self.backing_off
                or self._source.paused or self._broker_up()):
            self._retry_turn = None
            return
        now = self._clock()
        if self._retry_turn is None:
            self._retry_turn = now
        if now - self._retry_turn < self._timeout_s:
            return
        self._retry_turn = None
        self._backoff(ProduceError("the batch could not be read back from the broker to send "
                                   "again within the delivery timeout", retriable=True),
                      self._failed_records, {})

    def _backoff(self, error: BaseException, failed: int, rewind: Mapping[TP, int]) -> None:
        self._attempts += 1
        self._failed_records = failed
        self._metrics.produce_retries.inc()
        limit = self._retries
        if limit is not None and self._attempts > limit:
            raise DeliveryError(
                f"{failed} output record(s) were not acknowledged after {limit} "
                f"retr{'y' if limit == 1 else 'ies'} ({error}); nothing past the first of them "
                "was committed, a restart filters them again")
        if self._attempts >= RENEW_AFTER:
            self._renew = True
        wait = min(self._backoff_max_s, BACKOFF_START_S * 2 ** (self._attempts - 1))
        self._blocked_until = self._clock() + wait
        where = ({f"{t}[{p}]": o for (t, p), o in sorted(rewind.items())} if rewind
                 else "where they were left")
        log.warning("%d output record(s) not acknowledged (%s); attempt %d%s failed, sending "
                    "again from offsets %s in %.1f s", failed, error, self._attempts,
                    f" of {limit + 1}" if limit is not None else "", where, wait)

    # ---------------------------------------------------------------- exactly-once

    def _transaction(self, item: _InFlight) -> None:
        """Outputs and offsets in one transaction; on failure abort, rewind, back off."""
        self._renew_when_due()
        p = self.producer
        offsets = item.batch.next_offsets()
        committing = False
        refused = False  # an output the client would not take: no commit was tried
        try:
            p.begin_transaction()
            self._by_seq[item.seq] = item
            self._send(item)
            self._take_reports()
            if item.broken:
                # an output the client would not take (``send`` raised: a full local queue, a
                # record refused): committing the offsets now would skip it for good
                refused = True
                raise item.failure or ProduceError("an output record was refused", False, True)
            p.send_offsets_to_transaction(offsets, self._consumer.group_metadata(),
                                          self._timeout_s)
            committing = True
            p.commit_transaction(self._timeout_s)
        except ClientError as exc:
            if not refused:
                self._metrics.commit_failures.inc()
            try:
                p.abort_transaction(self._timeout_s)
            except ClientError as abort_exc:  # the transactional producer is unusable
                log.warning("aborting the failed transaction failed (%s); the producer will be "
                            "replaced", abort_exc)
                self._renew = True
            self._take_reports()
            self._by_seq.pop(item.seq, None)
            # Rejections first: the abort's purge reports of the batch's other outputs are not
            # failures of theirs, and a refused record is re-sent at once without its value.
            if item.rejected:
                refused_bare = self._remember_rejections(item)
                if refused_bare is not None:
                    self._backoff(refused_bare, item.failed, item.batch.first_offsets())
            else:
                item.failed = item.failed or len(item.routed)
                self._metrics.delivery_failures.labels("retriable").inc(item.failed)
                self._backoff(exc, item.failed, item.batch.first_offsets())
            self._source.rewind(item.batch.first_offsets())
            if committing:
                # the coordinator may have received the commit and completed it: re-sending
                # from the first offsets could write the batch twice
                self._unsettled = (dict(offsets), item.routed)
                self._renew = True
            return
        self._take_reports()
        self._by_seq.pop(item.seq, None)
        self._attempts = 0
        commit_answered(self._metrics, None)
        self._on_delivered(item.routed)

    def _settle_unconfirmed_commit(self) -> None:
        """After a commit_transaction that failed without saying whether it committed: make a
        new producer, whose init_transactions under the same transactional.id completes or
        aborts the old transaction, then resume at the group's committed offsets, which now say
        which of the two happened (the producer is replaced by ``_renew_when_due``, as after any
        other failure). Until then the loop backs off (reads nothing)."""
        if self._unsettled is None or self._renew or self._clock() < self._blocked_until:
            return
        offsets, routed = self._unsettled
        try:
            committed = self._consumer.committed(tuple(offsets), self._timeout_s)
        except ClientError as exc:
            log.warning("could not read the committed offsets yet (%s)", exc)
            self._blocked_until = self._clock() + BACKOFF_START_S
            return
        resume = {tp: off for tp, off in committed.items() if off is not None}
        log.warning("a transaction's commit was not confirmed; resuming at the group's committed "
                    "offsets %s", {f"{t}[{p}]": o for (t, p), o in sorted(resume.items())})
        self._source.rewind(resume, settled=True)
        self._unsettled = None
        # counted only while this member still owns the batch's partitions: past a rebalance a
        # commit at or past the batch may be another member's, after this transaction aborted
        if all(tp in self._source.assigned and resume.get(tp, -1) >= off
               for tp, off in offsets.items()):
            self._on_delivered(routed)  # it did commit: count it once, as an acknowledged batch

    # ---------------------------------------------------------------- shutdown, rebalance

    def drain(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for everything in flight, then commit synchronously.
        Returns False when something was still unacknowledged (it was not committed)."""
        deadline = self._clock() + timeout_s
        while self._inflight and self._clock() < deadline and not self.backing_off:
            try:
                self.producer.flush(min(1.0, max(0.0, deadline - self._clock())))
            except ProduceError as exc:  # a failed handle: what is not acknowledged is filtered again
                self._producer_failed(exc)
                break
            self.service(0.0)
        if self._acked:
            self._commit(asynchronous=False)
        return not self._inflight
