"""The consume side of the filter: batches from the group's partitions, and rebalances done right.

What it guarantees, whichever client library is behind it:

* **Nothing is skipped on a rebalance.** Records collected for a batch but not yet handed on
  (the linger window) are dropped when their partition is revoked. If the partition comes
  straight back to this member, its position is set to the first dropped record (kafka-python
  would otherwise keep its fetch position past them, librdkafka would restart from the last
  commit); if it goes to another member, that member starts from the last commit. Either way
  each record is read again, never jumped over. The hand-back offsets live until the next
  assignment, however many polls later it comes (kafka-python revokes and assigns in different
  ``poll()`` calls when a join outlasts the poll's timeout), and that assignment consumes them.
  Before a record of a partition that came back is handed on, the hand-back is checked against
  the group's committed offset and the further of the two wins: a member whose session expired
  (a long GC pause, a frozen VM) can get its partition back after another member filtered and
  committed past the hand-back, and resuming at the hand-back filtered all of that again (over
  7,000 duplicate outputs per 15 s freeze, in exactly-once mode too; stop 42). Taking the commit
  skips nothing: an offset is committed only once every record below it was delivered, by
  whichever member. It is ahead of the hand-back only when someone moved it there: another
  member that filtered the partition, or an operator who moved the group's offsets forward
  while this member was away (honoured, as any member would; a reset backwards is not, the
  further of the two wins).
* **A batch never mixes in records read while paused.** While the circuit breaker holds the
  stream, anything a poll still returns is handed back (the partition is rewound to it).
* **Rewinds are exact.** ``rewind`` puts a partition back to a given offset and forgets what was
  buffered past it; the delivery side uses it to retry a batch the broker did not take.
* **A partition the client stops fetching is restarted.** One that has records to give (lag
  above zero) but gave none for ``stall_restart_s`` while the loop kept asking, and that the
  filter did not pause itself, is resumed and sought to the first record not yet handed on: no
  record is skipped or read twice by it. Client libraries have had such bugs (kafka-python lost
  partitions' fetches around pause and resume; tests/test_delivery_fuzz.py pins the ones found),
  and a partition that starves while the others flow shows on no member-level signal.

Rebalance callbacks run only inside ``poll()`` (kafka-python: on its IO thread while the main
thread waits in ``poll``; librdkafka: on the calling thread), so the buffer they touch is never
touched concurrently; a lock still guards it because that is cheap and obvious.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from depois_stream.filter.clients import base
from depois_stream.filter.clients.base import TP, ClientError, Consumer, RecordBatch
from depois_stream.filter.metrics import Metrics

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # longest single poll while waiting for a first record
# A stall needs this many under-full batches while it lasted, besides the time: the loop may
# have spent the time waiting for acknowledgements instead of asking for records, and under a
# backlog a partition's records may wait behind the others' (full batches do not count).
STALL_MIN_ASKS = 20
SETTLE_TIMEOUT_S = 5.0  # reading the group's commit for partitions that came back
LOG_CHECK_S = 5.0  # while idle: how often to look for a position past the end of the log
LOG_LOST_S = 10.0  # how long a position past the end, with no commit, lasts before a reset
LOG_CHECK_TIMEOUT_S = 1.0  # each broker call of that check: it runs on the loop's thread
# A stall watch's second opinion on a partition a restart did not move (it runs on the loop's
# thread; a reader is made, fetches once and is closed, well under a second on a live broker)
SECOND_OPINION_TIMEOUT_S = 5.0
# After an unreadable offset was passed: how long (and STALL_MIN_ASKS under-full asks) the
# client has to read on before the rest of that record batch counts as unreadable too
PASS_PROBE_S = 2.0
MAX_KNOWN_UNREADABLE = 10_000  # unreadable offsets remembered per partition


@dataclass
class _Passing:
    """A partition sought past an offset its client cannot read: the rest of that offset's
    record batch as the second opinion named it (``Unreadable`` placeholders, maybe none),
    where the partition now stands, since when, and how many under-full batches had been asked
    for by then."""

    rest: RecordBatch
    at: int
    since: float
    asks: int


@dataclass
class _Stall:
    """A partition seen with lag and no progress: since when, how many under-full batches had
    been asked for by then, and whether the episode began with a restart at this offset."""

    next_offset: int | None
    since: float
    asks: int
    restarted: bool = False


class Source:
    """Collects batches of at most ``batch_size`` records, lingering ``linger_ms`` to fill them,
    and stops filling one once it holds ``MAX_HELD_BYTES`` of keys, values and headers."""

    def __init__(self, consumer: Consumer, topic: str, batch_size: int, linger_ms: int,
                 metrics: Metrics, on_revoked: Callable[[set[TP]], None] = lambda tps: None,
                 stall_restart_s: float = 0.0, reset_to: str = "earliest",
                 clock: Callable[[], float] = time.monotonic,
                 frozen_for: Callable[[], float] = lambda: 0.0) -> None:
        self._consumer = consumer
        self._topic = topic
        self._batch_size = batch_size
        self._linger_s = linger_ms / 1000
        self._metrics = metrics
        self._on_revoked = [on_revoked]
        self._lock = threading.Lock()
        self._buffer: list[RecordBatch] = []
        self._next: dict[TP, int] = {}  # offset after the last record handed on, per partition
        self._counted: dict[int, int] = {}  # highest offset counted as consumed, per partition
        self._handback: dict[TP, int] = {}  # where a revoked partition must resume if it returns
        self._unsettled: dict[TP, int] = {}  # hand-backs applied, not yet checked against the commit
        # positions of a member that woke past its session timeout, not yet checked against it
        self._woken: dict[TP, int] = {}
        # how long this process did not run since the last call, if long enough for its group
        # session to expire (``freeze.FreezeWatch.frozen_for``), else 0.0
        self._frozen_for = frozen_for
        self._first_ts: dict[TP, int] = {}  # timestamp of the first record of the last batch
        # when the last lag read that the broker answered, with nothing left to read, began
        self.caught_up_at: float | None = None
        self.assigned: frozenset[TP] = frozenset()
        self.joined = False
        self._pause_reasons: set[str] = set()  # "breaker", "backoff": paused while non-empty
        self.rebalances = 0
        self._stall_restart_s = stall_restart_s  # 0: never restart a partition
        self._stalls: dict[TP, _Stall] = {}
        self._passing: dict[TP, _Passing] = {}  # sought past an unreadable offset, on watch
        # offsets passed as unreadable, per partition, and why: a rewind back over them (a
        # retried delivery) passes them again without another second opinion
        self._unreadable: dict[TP, dict[int, str]] = {}
        # batches asked for that came back under-full: the client had nothing more to give,
        # so a partition with records to give was not merely queued behind the others
        self._asks = 0
        self._reset_to = reset_to  # auto_offset_reset: where a lost log's partition restarts
        self._clock = clock
        self._next_log_check = clock() + LOG_CHECK_S
        self._past_end: dict[TP, float] = {}  # since when a position lies past its log's end
        # whether nothing of this member's is in flight or unsettled (set by the app once its
        # Delivery exists): a first batch not yet committed must not look like a lost log
        self.quiet: Callable[[], bool] = lambda: True
        self._log_id: str | None = None  # the topic's id (KIP-516) in the client's metadata
        self._old_ids: set[str] = set()  # ids replaced since: never taken back
        self._replaced: set[TP] = set()  # partitions whose log was replaced, not yet restarted
        self._switching = False  # a replacement seen, its restart not yet done
        self._restart_refused = False  # its last attempt failed (said once at INFO)
        self._on_log_restarted: list[Callable[[set[TP]], None]] = []

    # ---------------------------------------------------------------- group membership

    def subscribe(self) -> None:
        self._consumer.subscribe(self._topic, self._assigned, self._revoked, self._lost)
        log.info("joining consumer group for %s (a join takes up to the session timeout)",
                 self._topic)

    def _revoked(self, tps: list[TP]) -> None:
        # Between a revocation and the next assignment the member is in no settled group (both
        # clients rebalance eagerly: every join revokes everything first). Reported as joined, a
        # join that never ended looked like a healthy standby on /readyz and the metric.
        self.joined = False
        self._metrics.group_joined.set(0)
        gone = set(tps)
        with self._lock:
            kept: list[RecordBatch] = []
            for part in self._buffer:
                mask = ~np.isin(part.partitions, [p for _, p in gone])
                for tp, off in part.select(~mask).first_offsets().items():
                    self._handback[tp] = min(self._handback.get(tp, off), off)
                kept.append(part.select(mask))
            self._buffer = [p for p in kept if len(p)]
            for tp in gone:  # nothing buffered: resume right after what was handed on
                if tp in self._next:
                    self._handback.setdefault(tp, self._next[tp])
                self._next.pop(tp, None)
                self._first_ts.pop(tp, None)
                self._stalls.pop(tp, None)
                self._passing.pop(tp, None)
        held = gone & self.assigned  # kafka-python revokes again at close what a rebalance took
        self.assigned = self.assigned - gone
        self.rebalances += 1
        self._forget_series(gone)
        self._metrics.partitions_assigned.set(len(self.assigned))
        for listener in self._on_revoked:
            listener(gone)
        if held:
            log.info("partitions revoked: %s", sorted(p for _, p in held))

    def on_revoked(self, listener: Callable[[set[TP]], None]) -> None:
        """Also call ``listener`` with the partitions of every revocation (and loss)."""
        self._on_revoked.append(listener)

    def _lost(self, tps: list[TP]) -> None:
        log.warning("left the group involuntarily (session expired?): partitions %s lost; "
                    "rejoining", sorted(p for _, p in tps))
        self._revoked(tps)

    def _assigned(self, tps: list[TP]) -> Mapping[TP, int]:
        # A replaced log's partition restarts at the new start (_restart_replaced), not at a
        # position in the old log, if it comes straight back; one that went to another member
        # is that member's now (it resumes at the group's commit).
        with self._lock:
            self._replaced = self._replaced & set(tps)
            starts = {tp: self._handback[tp] for tp in tps
                      if tp in self._handback and tp not in self._replaced}
            self._handback.clear()
            self._unsettled.update(starts)
            for tp, off in starts.items():
                self._next[tp] = off
        self.assigned = self.assigned | set(tps)
        for t, p in tps:  # exported from 0, so that increase() sees the first restart
            self._metrics.partition_restarts.labels(t, str(p))
            for cause in ("new_id", "past_end"):  # the causes DepoisPartitionLogReset counts
                self._metrics.partition_log_resets.labels(t, str(p), cause)
        self.joined = True
        self._metrics.group_joined.set(1)
        self._metrics.partitions_assigned.set(len(self.assigned))
        if self.assigned:
            log.info("partitions assigned: %s%s", sorted(p for _, p in self.assigned),
                     f" (resuming {len(starts)} at the first record not yet filtered)"
                     if starts else "")
        else:
            log.info("joined the group with no partitions: %s has fewer partitions than the "
                     "group has members, so this member is a standby", self._topic)
        return starts

    # ---------------------------------------------------------------- batches

    def next_batch(self, should_stop: Callable[[], bool] = lambda: False) -> RecordBatch:
        """The next batch, or an empty one after ``IDLE_POLL_S`` without records."""
        deadline: float | None = None
        held = 0  # bytes gathered for this batch (a revocation's drop does not give them back)
        while True:
            room = self._batch_size - self._buffered()
            wait = IDLE_POLL_S if deadline is None else max(0.0, deadline - time.monotonic())
            got = self._poll(wait, room)
            if len(got):
                if len(got) < room:  # a full batch ends here anyway: only a partial one is counted
                    held += got.held_bytes
                with self._lock:
                    self._buffer.append(got)
            if deadline is None:
                if not self._buffered():
                    self._asks += 1
                    self._check_for_lost_logs()
                    return RecordBatch.empty(self._topic)
                deadline = time.monotonic() + self._linger_s
            if (self._buffered() >= self._batch_size or time.monotonic() >= deadline
                    or held >= base.MAX_HELD_BYTES or should_stop()):
                break
        with self._lock:
            batch = RecordBatch.concat(self._topic, self._buffer)
            self._buffer = []
            self._next.update(batch.next_offsets())
            # per partition, its first record with a timestamp (-1: unreadable, or an old
            # format without one), in one pass over the batch
            stamped = batch.timestamps_ms >= 0
            stamps = batch.timestamps_ms[stamped]
            parts, first = np.unique(batch.partitions[stamped], return_index=True)
            self._first_ts.update({(batch.topic, int(p)): int(stamps[i])
                                   for p, i in zip(parts.tolist(), first.tolist())})
        if len(batch) < self._batch_size and held < base.MAX_HELD_BYTES:
            self._asks += 1  # the client had no more to give just now
        return batch

    def idle(self, timeout_s: float) -> None:
        """Poll without taking records (all paused or backing off): keeps group membership,
        heartbeats and rebalances going while nothing is consumed."""
        self._poll(timeout_s, 1)

    def _poll(self, timeout_s: float, max_records: int) -> RecordBatch:
        try:
            got = self._consumer.poll(timeout_s, max(1, max_records))
        except ClientError as exc:
            log.warning("poll failed: %s", exc)
            time.sleep(min(timeout_s, 0.5))
            got = RecordBatch.empty(self._topic)
        self._watch_wake_up()
        got = self._watch_log_identity(got)
        if self._replaced & self.assigned:
            self.pause("log replaced")  # assigned again before its restart
        if self._unsettled or self._woken:
            got = self._settle(got)
        if self.paused:
            if self.assigned:
                self._consumer.pause(self.assigned)  # a partition assigned while paused
            if len(got):
                self.rewind(got.first_offsets())
                got = RecordBatch.empty(self._topic)
        self._metrics.records_consumed.labels(self._topic).inc(self._first_reads(got))
        self._check_passing(got)
        return got

    def _watch_wake_up(self) -> None:
        """Notice that this process did not run for long enough for its group session to expire
        (``frozen_for``: stopped, a frozen VM, a pause of every thread) and have ``_settle``
        check its owned partitions' positions against the group's commits before anything more
        of them is handed on.

        Its group may have moved on without it by then: another member took its partitions
        over and filtered and committed past where this one stands. Until its client learns
        that the session expired (kafka-python: its first heartbeat answer, about half a second)
        it still believes it owns them and filtered on from its old position, every record the
        other member had already committed (an outside drill, stop 51: 5,126 duplicates of
        12,000 records in 1.5 s, kafka-python exactly-once; on Tansu, which does not fence
        such a member, they were all published). Taking the commit where it is further skips
        nothing (the module's docstring). Batches handed on before the freeze are the delivery
        side's, filtered again at worst."""
        frozen = self._frozen_for()
        if frozen <= 0:
            return
        with self._lock:
            # a partition with nothing handed on yet: -1, so that any commit of the group wins
            mine = {tp: self._next.get(tp, -1) for tp in self.assigned}
            self._woken.update(mine)
        if mine:
            log.warning("this process did not run for %.0f s (stopped, a frozen VM, a pause of "
                        "every thread), long enough for its group session to expire: another "
                        "member may have filtered partitions %s meanwhile; reading the group's "
                        "commits before handing on more of them", frozen,
                        sorted(p for _, p in mine))

    def _settle(self, got: RecordBatch) -> RecordBatch:
        """Check the hand-backs just applied against the group's committed offsets, and move a
        partition on to its commit where that is further (see the module's docstring); ``got``
        without the records of the partitions moved. Runs on the polling thread, after the
        assignment and before any record of those partitions is buffered or counted. If the
        commit cannot be read, the hand-back stands: records may be filtered twice, none is
        skipped."""
        with self._lock:
            came_back = {tp for tp in self._unsettled if tp in self.assigned}
            pending = {tp: off for tp, off in {**self._woken, **self._unsettled}.items()
                       if tp in self.assigned}
            self._unsettled, self._woken = {}, {}
        if not pending:
            return got
        try:
            committed = self._consumer.committed(sorted(pending), SETTLE_TIMEOUT_S)
        except ClientError as exc:
            log.warning("could not read the group's commit for partitions %s (%s): going on "
                        "where this member stands (records may be filtered twice, none "
                        "skipped)", sorted(p for _, p in pending), exc)
            return got
        ahead = {tp: int(off) for tp, off in committed.items()
                 if tp in pending and off is not None and off > pending[tp]}
        # only a partition that came back: a woken one with no commit was never committed by anyone
        restart = self._restarts_without_commit(
            [tp for tp in came_back if committed.get(tp) is None], pending)
        if not (ahead or restart):
            return got
        moved = [p for _, p in {**ahead, **restart}]
        with self._lock:
            self._drop_buffered(ahead)
            for tp, off in ahead.items():
                self._seek(tp, off)
        self._restart_logs(restart, "no_commit")
        if ahead:
            log.warning("partitions %s: another member filtered and committed past where this "
                        "one stands (its session had expired: it was frozen, or they came back "
                        "after a rebalance): resuming at the group's commit %s, not filtering "
                        "those records again",
                        sorted(p for _, p in ahead), {p: off for (_, p), off in sorted(ahead.items())})
        if restart:
            log.warning("partitions %s came back with no commit of the group for them (a broker "
                        "that came back empty, or a re-created topic): restarting them at the "
                        "log's start %s instead of where this member left them %s; records may "
                        "be filtered twice, none skipped", sorted(p for _, p in restart),
                        {p: off for (_, p), off in sorted(restart.items())},
                        {p: pending[(t, p)] for (t, p) in sorted(restart)})
        return got.select(~np.isin(got.partitions, moved))

    def _restarts_without_commit(self, tps: list[TP], pending: Mapping[TP, int]) -> dict[TP, int]:
        """Where to restart partitions that came back with no commit of the group: the log's
        start, under ``auto_offset_reset=earliest``, where it lies before the hand-back.

        A broker that came back empty (Tansu restarted; on Kafka a lost log) or a topic deleted
        and re-created holds a new log: this member's position in the old one means nothing
        there, and resuming at it skipped every record of the new log before it (stop 45, an SRE
        drill). With no commit the group never settled that partition anyway, so the log's start
        is where any new owner would begin; at worst records are filtered twice, never skipped.
        Under ``latest`` the hand-back stands (a restart at the end would skip records)."""
        if not tps or self._reset_to != "earliest":
            return {}
        try:
            marks = self._consumer.watermarks(sorted(tps), SETTLE_TIMEOUT_S)
        except ClientError as exc:
            log.warning("could not read the log start of partitions %s that came back with no "
                        "commit (%s): resuming them where this member left them",
                        sorted(p for _, p in tps), exc)
            return {}
        return {tp: marks[tp][0] for tp in tps if tp in marks and marks[tp][0] < pending[tp]}

    def _check_for_lost_logs(self) -> None:
        """While idle, every ``LOG_CHECK_S``: a partition whose position lies past the end of its
        log, with no commit of the group for it, for ``LOG_LOST_S``, lost its log at the broker
        (a broker that came back empty, a topic deleted and re-created): restart it at the new
        log's start (``auto_offset_reset=latest``: its end). Apache Kafka answers a fetch past
        the end with OFFSET_OUT_OF_RANGE and the client resets; Tansu answers with nothing, and
        the member waited, filtering nothing, until the new log grew past the old position:
        the records before it were never filtered (stop 45, an SRE drill: 441 records on the new
        broker, old position 12,000). A log end that lags (Tansu lists the base offset of the last
        batch) never resets a partition on its own: the group's commit is there. Only records
        filtered again can come of a wrong reset, never records skipped."""
        now = self._clock()
        if self.paused or not self.quiet():  # records in flight: no commit yet is expected
            self._past_end.clear()
            return
        if now < self._next_log_check:
            return
        self._next_log_check = now + LOG_CHECK_S
        with self._lock:
            known = {tp: off for tp, off in self._next.items() if tp in self.assigned}
        if not known:
            self._past_end.clear()
            return
        try:
            marks = self._consumer.watermarks(sorted(known), LOG_CHECK_TIMEOUT_S)
            past = {tp: marks[tp] for tp, off in known.items() if tp in marks and off > marks[tp][1]}
            committed = self._consumer.committed(sorted(past), LOG_CHECK_TIMEOUT_S) if past else {}
        except ClientError as exc:  # the broker is away: nothing to decide now
            log.debug("could not check the partitions' log ends: %s", exc)
            return
        lost = {tp: mark for tp, mark in past.items() if committed.get(tp) is None}
        self._past_end = {tp: self._past_end.get(tp, now) for tp in lost}
        due = {tp: lost[tp] for tp, since in self._past_end.items() if now - since >= LOG_LOST_S}
        targets = {tp: high if self._reset_to == "latest" else low
                   for tp, (low, high) in sorted(due.items())}
        self._restart_logs(targets, "past_end")
        for tp, target in targets.items():
            self._past_end.pop(tp, None)
            log.error("partition %d: its log ends at offset %d, before this member's position %d, "
                      "and the group has no commit for it: the broker lost the log (it came back "
                      "empty, or the topic was re-created); restarting the partition at offset %d "
                      "(auto_offset_reset=%s). Records the old log held past the last commit were "
                      "not filtered", tp[1], due[tp][1], known[tp], target, self._reset_to)

    def _watch_log_identity(self, got: RecordBatch) -> RecordBatch:
        """Notice the topic coming back under a new id (KIP-516) and restart the partitions this
        member held at the new log's start; ``got`` without records of partitions waiting for
        that restart, or restarted by this call (they were read at a position in the old log).

        A broker that came back empty, or a topic deleted and re-created, holds new logs under
        the old name. Offsets in the old log mean nothing there, and neither does a commit made
        at one: a member that read the new log at its old position before the group noticed
        could commit there (kafka-python, exactly-once: 4 of 7 broker restarts, stop 45), and
        the partition then came back with a commit, so nothing looked lost and the new log's
        records before that commit were never filtered. The id is the surest sign there is, as
        fresh as the client's metadata (refreshed at once after the connection errors of a
        restart, and after a deleted topic's errors); the commit and log-end checks
        (``_settle``, ``_check_for_lost_logs``) remain for clients that give no id. An id seen
        before and replaced is never taken back (a broker with stale metadata)."""
        ident = self._consumer.topic_id(self._topic)
        if ident is not None and ident != self._log_id and ident not in self._old_ids:
            if self._log_id is not None:
                self._old_ids.add(self._log_id)
                self._log_replaced(self._log_id, ident)
            self._log_id = ident
        if not (self._switching or self._replaced & self.assigned):
            return got
        # read at positions in the old log, before the restart (the pause hands back the rest)
        stale = [p for _, p in self._replaced]
        self._restart_replaced()
        return got.select(~np.isin(got.partitions, stale))

    def _log_replaced(self, was: str, now: str) -> None:
        with self._lock:
            held = set(self.assigned) | set(self._handback) | set(self._next)
            reached = {p: off for (_, p), off in sorted({**self._next, **self._handback}.items())}
            self._buffer = []  # the linger window's records: read again from the new start
            self._handback.clear()
            self._unsettled.clear()
            self._replaced = self._replaced | held
        self._switching = True
        self._past_end.clear()
        if not self.assigned:  # rejoined while the topic was missing: the group may not know it
            self._consumer.topic_replaced()
        log.error("topic %s is listed under a new id (%s, was %s): the broker lost its logs (it "
                  "came back empty) or the topic was deleted and re-created. Positions and "
                  "commits in the old log mean nothing in the new one: partitions %s restart at "
                  "the new log's %s once nothing is in flight. This member had read the old log "
                  "up to offsets %s; what it held from there (or from the group's last commit, "
                  "if lower) to its end was never filtered and is gone with it", self._topic,
                  now, was, sorted(p for _, p in held),
                  "end" if self._reset_to == "latest" else "start", reached)
        self.pause("log replaced")

    def _restart_replaced(self) -> None:
        """Seek the replaced partitions this member owns to the new log's start (``latest``: its
        end) and commit that, once nothing of this member's is in flight: a batch of the old
        log that failed later would rewind into the new one. The commit replaces any commit an
        old position left in the new log, which would otherwise move the partition on when
        it changes owner. Everything stays paused from the change until every replaced
        partition owned here is restarted and its commit taken (a group re-forming refuses
        it: tried again at the next poll), through any rebalance in between; a replaced
        partition assigned again later is paused again until it is restarted."""
        due = sorted(self._replaced & self.assigned)
        if not self.quiet():
            return
        if due:
            try:
                marks = self._consumer.watermarks(due, LOG_CHECK_TIMEOUT_S, listed=True)
                targets = {tp: marks[tp][1 if self._reset_to == "latest" else 0]
                           for tp in due if tp in marks}
                # committed first: until it is taken nothing moves (the partitions are paused)
                self._consumer.commit(targets, asynchronous=False, timeout_s=LOG_CHECK_TIMEOUT_S)
                self._restart_logs(targets, "new_id")
            except ClientError as exc:  # tried again at the next poll: said once
                log.log(logging.DEBUG if self._restart_refused else logging.INFO,
                        "replaced log: could not restart partitions %s yet (%s); trying again at "
                        "every poll", [p for _, p in due], exc)
                self._restart_refused = True
                return
            self._restart_refused = False
            self._replaced = self._replaced - set(targets)
            log.error("partitions %s restarted at offsets %s of the new log and committed there",
                      [p for _, p in targets], {p: off for (_, p), off in sorted(targets.items())})
        if not self._replaced & self.assigned:
            self._switching = False
            self.resume("log replaced")

    def on_log_restarted(self, listener: Callable[[set[TP]], None]) -> None:
        """Also call ``listener`` with the partitions of every restart in a new log: what the
        delivery side remembers by offset (acknowledgements, refusals) was about the old one."""
        self._on_log_restarted.append(listener)

    def _restart_logs(self, targets: Mapping[TP, int], cause: str) -> None:
        """Restart partitions in a new log at these offsets, the one way all three checks do it:
        what is buffered of them goes, each is sought there, its records count as read for the
        first time (whatever offsets the old log's records had), the delivery side forgets what
        it remembered by offset, and each restart is counted under ``cause``."""
        if not targets:
            return
        with self._lock:
            self._drop_buffered(targets)
            for tp, off in targets.items():
                self._seek(tp, off)
                self._counted[tp[1]] = off - 1
                self._unreadable.pop(tp, None)  # offsets of the old log
        for listener in self._on_log_restarted:
            listener(set(targets))
        for t, p in targets:
            self._metrics.partition_log_resets.labels(t, str(p), cause).inc()

    def _drop_buffered(self, tps: Iterable[TP]) -> None:
        """Forget what the linger window holds of these partitions (the caller holds the lock)."""
        gone = [p for _, p in tps]
        self._buffer = [b for b in (part.select(~np.isin(part.partitions, gone))
                                    for part in self._buffer) if len(b)]

    def _first_reads(self, got: RecordBatch) -> int:
        """How many of ``got`` this process reads for the first time. A record handed back (a
        breaker trip, a retried delivery, a pause) and read again is consumed once: counted at
        each read, every trip added a batch that was never routed, and the delivery SLO (routed
        / consumed) paged for losses that did not happen."""
        if not len(got):
            return 0
        new = 0
        for p in np.unique(got.partitions).tolist():
            offsets = got.offsets[got.partitions == p]
            seen = self._counted.get(p, -1)
            new += int(np.count_nonzero(offsets > seen))
            self._counted[p] = max(seen, int(offsets.max()))
        return new

    def _buffered(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._buffer)

    # ---------------------------------------------------------------- control

    def rewind(self, offsets: Mapping[TP, int], settled: bool = False) -> None:
        """Resume the given owned partitions at these offsets, dropping anything buffered
        past them (a retried or held-back batch is read again, in order).

        ``settled``: the offsets are the group's committed ones, read after an exactly-once
        commit whose outcome was unknown; they replace a revoked partition's hand-back offset
        instead of taking the earlier of the two (which would transact a committed batch twice)."""
        owned = {tp: off for tp, off in offsets.items() if tp in self.assigned}
        with self._lock:
            for tp, off in offsets.items():
                # Revoked and not yet re-assigned: if it comes back here, resume at the earlier
                # of the two (a batch that failed after its partition was revoked is re-read).
                if tp in self._handback:
                    self._handback[tp] = off if settled else min(self._handback[tp], off)
            kept = []
            for part in self._buffer:
                drop = np.zeros(len(part), bool)
                for (_, p), off in owned.items():
                    drop |= (part.partitions == p) & (part.offsets >= off)
                kept.append(part.select(~drop))
            self._buffer = [p for p in kept if len(p)]
            for tp, off in owned.items():
                self._seek(tp, off)

    def _seek(self, tp: TP, offset: int) -> None:
        """Resume ``tp`` at ``offset`` (the caller holds the lock): the consumer, this source's
        position, and a new start for the stall watch (read again from here, not a stall)."""
        self._consumer.seek(tp, offset)
        self._next[tp] = offset
        self._stalls.pop(tp, None)
        self._passing.pop(tp, None)

    @property
    def switching(self) -> bool:
        """Whether a replaced log's partitions are waiting for their restart (not idle: a run
        that ended now would leave a stray commit in the new log)."""
        return self._switching or bool(self._replaced & self.assigned)

    @property
    def paused(self) -> bool:
        return bool(self._pause_reasons)

    def pause(self, reason: str) -> None:
        """Stop fetching from every owned partition (and any assigned later) until every
        reason given here was lifted with ``resume``."""
        self._stalls.clear()  # paused by the filter: no partition is stalled meanwhile
        if reason not in self._pause_reasons:
            self._pause_reasons.add(reason)
            self._consumer.pause(self.assigned)

    def resume(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons:
                self._consumer.resume(self.assigned)

    # ---------------------------------------------------------------- lag

    def update_lag(self, timeout_s: float = 2.0) -> None:
        """Lag in records and in seconds for the partitions this member owns, and no others."""
        owned = sorted(self.assigned)
        if not owned:
            return
        began = time.monotonic()
        try:
            lags = self._consumer.lag(owned, timeout_s)
        except ClientError as exc:
            log.warning("could not read end offsets for the lag metrics: %s", exc)
            return
        if all(lags.get(tp, 1) <= 0 for tp in owned):  # one not measured is not caught up
            self.caught_up_at = began
        now_ms = time.time() * 1000
        for tp in owned:
            if tp not in lags:
                continue
            labels = (tp[0], str(tp[1]))
            self._metrics.consumer_lag.labels(*labels).set(lags[tp])
            first = self._first_ts.get(tp)
            # The oldest unfiltered record is at least as old as the first stamped record of
            # the latest batch read from the partition; with none read yet it is unknown.
            if lags[tp] == 0:
                self._metrics.consumer_lag_seconds.labels(*labels).set(0.0)
            elif first is not None:
                self._metrics.consumer_lag_seconds.labels(*labels).set(
                    max(0.0, (now_ms - first) / 1000))
        self._watch_stalls(lags, time.monotonic())

    def _watch_stalls(self, lags: Mapping[TP, int], now: float) -> None:
        """Restart each owned partition that has had records to give, and given none, for
        ``stall_restart_s`` while the loop asked for batches (see the module's docstring); one
        still stalled where it was restarted gets a second opinion (``_pass_unreadable``), at
        most one per call (each may hold the loop up to SECOND_OPINION_TIMEOUT_S).

        Progress is the offset after the last record handed on; the lag is measured from the
        client's position, so records the client holds back (a partition it stopped fetching)
        count, and records already handed on do not. A partition behind an upstream transaction
        left open (read_committed cannot pass it) looks the same and is restarted too, which is
        harmless: the seek is to where it stands."""
        if self._stall_restart_s <= 0:
            return
        asked = False
        for tp in sorted(self.assigned):
            at = self._next.get(tp)
            seen = self._stalls.get(tp)
            if self.paused or lags.get(tp, 0) <= 0:
                self._stalls.pop(tp, None)
            elif seen is None or seen.next_offset != at:
                self._stalls[tp] = _Stall(at, now, self._asks)
            elif (at in self._unreadable.get(tp, {}) and now - seen.since >= PASS_PROBE_S
                    and self._asks - seen.asks >= STALL_MIN_ASKS):
                self._pass_known(tp, at)
            elif (now - seen.since >= self._stall_restart_s
                    and self._asks - seen.asks >= STALL_MIN_ASKS):
                if seen.restarted:
                    if asked:
                        continue  # due at the next check: one second opinion per check
                    asked = True
                    where = at if at is not None else self._start_of(tp)
                    if where is not None and self._pass_unreadable(tp, where):
                        continue
                self._restart(tp, lags[tp], now - seen.since)
                self._stalls[tp] = _Stall(self._next.get(tp), now, self._asks, restarted=True)

    def _start_of(self, tp: TP) -> int | None:
        """Where a partition that has handed nothing on since its assignment stands: the
        group's commit, else the log's start under ``auto_offset_reset=earliest``; None when
        neither can be read, or under ``latest`` (its end: nothing there to be stuck on). A
        lying record at the very start of a partition no group had committed stalled it for
        good: the second opinion needs an offset to look at (a fuzz drill, stop 51)."""
        try:
            start = self._consumer.committed([tp], LOG_CHECK_TIMEOUT_S).get(tp)
            if start is None and self._reset_to == "earliest":
                start = self._consumer.watermarks([tp], LOG_CHECK_TIMEOUT_S)[tp][0]
        except (ClientError, KeyError) as exc:
            log.debug("partition %s[%d]: where it starts is unknown (%s)", tp[0], tp[1], exc)
            return None
        return start

    def _second_opinion(self, tp: TP, at: int) -> RecordBatch:
        """The records of ``tp`` from ``at`` on that the client cannot read and does not say so
        (``Consumer.unreadable_at``), the partition's only; empty when there are none or the
        question failed (logged: a diagnosis never takes the filter down)."""
        try:
            found = self._consumer.unreadable_at(tp, at, SECOND_OPINION_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - ClientError, or a client's surprise
            log.warning("partition %s[%d] stalled at offset %d after a restart there; the "
                        "second opinion on it failed (%s)", tp[0], tp[1], at, exc)
            return RecordBatch.empty(self._topic)
        return found.select((found.partitions == tp[1]) & (found.offsets >= at))

    def _pass_unreadable(self, tp: TP, at: int) -> bool:
        """For a partition still stalled at ``at`` after a restart there: ask the client what it
        cannot read from there (``_second_opinion``) and, if it names anything, hand on the
        first such offset as ``Unreadable`` (the pipeline dead-letters it with its reason and
        commits past it), seek past it and watch whether the client reads on from there
        (``_check_passing``). Whether anything was found.

        librdkafka stops silently at a record whose lengths lie inside an uncompressed batch:
        a restart lands on the same bytes, and the partition stalled for good, its later
        batches never filtered (stop 51, an outside fuzz drill). Only the client's positive
        finding moves the partition on: a partition held back by anything else (an upstream
        transaction left open, a slow broker) gets nothing from the second opinion and is
        restarted as before, its records never dead-lettered for it. Offsets between ``at``
        and the first one named hold no record (a transaction marker, a compacted gap): the
        second opinion returns at the first record it reads.

        Only the first offset, because the rest of the batch may be readable by this client:
        kafka-python cannot reach past a bad record, librdkafka can when the record's own
        length is right (a key length that lies): a diff review dead-lettered four readable
        records that way. Whether it can is what ``_check_passing`` finds out."""
        found = self._second_opinion(tp, at)
        if not len(found):
            return False
        first = int(found.offsets.min())
        if not self._hand_on_unreadable(tp, found.select(found.offsets == first)):
            return False
        rest = found.select(found.offsets > first)
        self._passing[tp] = _Passing(rest, first + 1, self._clock(), self._asks)
        log.error("partition %s[%d] stalled at offset %d, a restart there did not help, and the "
                  "client cannot read offset %d (it said nothing about it): dead-lettering it "
                  "without its bytes, which stay in the topic, and going on at %d%s", tp[0],
                  tp[1], at, first, first + 1,
                  f" (offsets to {int(rest.offsets.max())} share its record batch: passed too "
                  "if the client cannot read on from there either)" if len(rest) else "")
        return True

    def _pass_known(self, tp: TP, at: int) -> None:
        """Pass again the unreadable offsets from ``at`` on that were passed before: a rewind
        (a retried delivery, a breaker's hand-back) put the partition back before them, and the
        client stalls on the same bytes; without this each such rewind cost two
        ``stall_restart_s`` and another second opinion (a diff review)."""
        known = self._unreadable[tp]
        end = at
        while end in known:
            end += 1
        offsets = range(at, end)
        again = RecordBatch.unreadable(self._topic, [tp[1]] * len(offsets), offsets,
                                       [known[o] for o in offsets])
        if self._hand_on_unreadable(tp, again):
            log.error("partition %s[%d]: back at offsets %d to %d, which the client could not "
                      "read before: dead-lettered again, going on at %d", tp[0], tp[1], at,
                      end - 1, end)

    def _hand_on_unreadable(self, tp: TP, records: RecordBatch) -> bool:
        """Seek ``tp`` past ``records`` (``Unreadable`` placeholders of it), then put them in
        the next batch and count them as read. Whether the seek was made (a refused one is
        logged, and nothing is handed on: the caller tries again later)."""
        past = int(records.offsets.max()) + 1
        with self._lock:
            try:
                self._seek(tp, past)
            except ClientError as exc:
                log.warning("partition %s[%d]: could not seek past the unreadable offsets %d to "
                            "%d (%s); trying again later", tp[0], tp[1],
                            int(records.offsets.min()), past - 1, exc)
                return False
            self._buffer.append(records)
            known = self._unreadable.setdefault(tp, {})
            for offset, why in zip(records.offsets.tolist(), records.headers):
                if len(known) < MAX_KNOWN_UNREADABLE:
                    known[offset] = why.error
        self._metrics.records_consumed.labels(self._topic).inc(self._first_reads(records))
        return True

    def _check_passing(self, got: RecordBatch) -> None:
        """After an unreadable offset was passed (``_pass_unreadable``): a record of the
        partition read since means the client reads on, and the watch ends. None for
        PASS_PROBE_S and STALL_MIN_ASKS under-full asks means it cannot read from there either:
        the rest of the record batch, as the second opinion named it, is passed at once (one
        dead letter per offset), or, where it could not name the rest (a batch whose header
        cannot be believed), the second opinion is asked again at the new position. Seconds
        per batch, not two ``stall_restart_s`` per offset."""
        if not self._passing:
            return
        now = self._clock()
        for tp, p in list(self._passing.items()):
            if tp not in self.assigned or bool(np.any(got.partitions == tp[1])):
                self._passing.pop(tp, None)
            elif self.paused:  # nothing is read while paused: the watch starts over afterwards
                self._passing[tp] = _Passing(p.rest, p.at, now, self._asks)
            elif now - p.since >= PASS_PROBE_S and self._asks - p.asks >= STALL_MIN_ASKS:
                if len(p.rest) and int(p.rest.offsets.min()) == p.at:
                    if not self._hand_on_unreadable(tp, p.rest):  # kept: tried at the next poll
                        continue
                    log.error("partition %s[%d]: the client cannot read on from offset %d either: "
                              "dead-lettering the rest of that record batch, offsets %d to %d, "
                              "without their bytes, and going on at %d", tp[0], tp[1], p.at, p.at,
                              int(p.rest.offsets.max()), int(p.rest.offsets.max()) + 1)
                else:
                    self._passing.pop(tp, None)
                    self._pass_unreadable(tp, p.at)

    def _restart(self, tp: TP, lag: int, stalled_s: float) -> None:
        """Resume ``tp`` and seek it to the first record not yet handed on (from the last
        commit when nothing was handed on since the assignment)."""
        start = self._next.get(tp)
        try:
            if start is None:
                start = self._consumer.committed([tp], 2.0).get(tp)
            self._consumer.resume([tp])  # only called unpaused: no pause of the filter's undone
            if start is not None:
                self.rewind({tp: start})
        except ClientError as exc:
            log.warning("partition %s[%d] stalled; restarting its fetch failed (%s), trying "
                        "again in %.0f s", tp[0], tp[1], exc, self._stall_restart_s)
            return
        self._metrics.partition_restarts.labels(tp[0], str(tp[1])).inc()
        log.warning("partition %s[%d] had %d records to give and gave none for %.0f s while the "
                    "filter kept asking: the client stopped fetching it; restarted it at offset %s "
                    "(nothing skipped, nothing read twice)", tp[0], tp[1], lag, stalled_s,
                    start if start is not None else "where it stood")

    def _forget_series(self, tps: set[TP]) -> None:
        for t, p in tps:
            for gauge in (self._metrics.consumer_lag, self._metrics.consumer_lag_seconds):
                try:
                    gauge.remove(t, str(p))
                except KeyError:
                    pass
