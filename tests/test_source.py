"""The Source's rebalance bookkeeping, step by step.

The real-broker tests (test_delivery_rebalance.py, test_delivery_chaos.py) prove the property end
to end; this file pins down the orderings they can only hit by chance. The consumer here is a
script: each ``poll`` plays the next step (records, a revocation, an assignment), which is the
only way to put a revocation and its assignment several polls apart, or a failed delivery in
between, at will. Nothing here stands in for Kafka in a delivery test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from depois_stream.filter.clients.base import TP, RecordBatch, Unreadable
from depois_stream.filter.metrics import Metrics
from depois_stream.filter.source import PASS_PROBE_S, STALL_MIN_ASKS, Source

TOPIC = "in"


def _records(partition: int, start: int, n: int) -> RecordBatch:
    return RecordBatch(TOPIC, np.full(n, partition, np.int32), np.arange(start, start + n),
                       np.zeros(n, np.int64), [None] * n, [b"x"] * n, [[] for _ in range(n)])


class ScriptedConsumer:
    """Plays one step per poll: a RecordBatch, ("revoke", [tps]), ("lost", [tps]) or ("assign",
    [tps]) (optionally with a RecordBatch the same poll returns)."""

    def __init__(self, steps: list) -> None:
        self.steps = list(steps)
        self.seeks: list[tuple[TP, int]] = []
        self._cb: tuple[Callable, Callable, Callable] | None = None

    def subscribe(self, topic, on_assign, on_revoke, on_lost) -> None:
        self._cb = (on_assign, on_revoke, on_lost)

    def poll(self, timeout_s: float, max_records: int) -> RecordBatch:
        if not self.steps:
            return RecordBatch.empty(TOPIC)
        step = self.steps.pop(0)
        if isinstance(step, RecordBatch):
            return step
        kind, tps, *fetched = step  # ("assign", tps, batch): records fetched in the same poll
        on_assign, on_revoke, on_lost = self._cb
        if kind == "revoke":
            on_revoke(tps)
        elif kind == "lost":
            on_lost(tps)
        else:
            for tp, off in on_assign(tps).items():
                self.seeks.append((tp, off))
        return fetched[0] if fetched else RecordBatch.empty(TOPIC)

    def seek(self, tp, offset) -> None:
        self.seeks.append((tp, offset))

    def unreadable_at(self, tp, offset: int, timeout_s: float) -> RecordBatch:
        """What a test sets in ``unreadable`` (offset -> RecordBatch), asked for in ``asked``."""
        self.asked = [*getattr(self, "asked", []), (tp, offset)]
        return getattr(self, "unreadable", {}).get(offset, RecordBatch.empty(TOPIC))

    def committed(self, tps, timeout_s: float) -> dict:
        """The group's committed offsets: none, unless a test sets ``group``."""
        return {tp: getattr(self, "group", {}).get(tp) for tp in tps}

    def watermarks(self, tps, timeout_s: float, listed: bool = False) -> dict:
        """(log start, log end) per partition when a test sets ``logs``; otherwise no answer,
        and a partition that comes back without a commit resumes at its hand-back. A test's
        ``fetched_end`` plays kafka-python's cached fetch high watermark, taken unless ``listed``."""
        from depois_stream.filter.clients.base import ClientError

        if not hasattr(self, "logs"):
            raise ClientError("log offsets: no answer", True)
        cached = getattr(self, "fetched_end", 0)
        return {tp: (self.logs[tp][0], self.logs[tp][1] if listed else max(self.logs[tp][1], cached))
                for tp in tps}

    def pause(self, tps) -> None:
        pass

    def resume(self, tps) -> None:
        pass

    def topic_replaced(self) -> None:
        self.resubscribed = getattr(self, "resubscribed", 0) + 1

    def topic_id(self, topic: str):
        """The topic's id in the client's metadata: None (not known) unless a test sets ``ident``."""
        return getattr(self, "ident", None)

    def commit(self, offsets, asynchronous: bool, timeout_s: float = 1.0) -> None:
        """Recorded in ``commits``; raises ClientError while a test sets ``refuse_commits``."""
        from depois_stream.filter.clients.base import ClientError

        if getattr(self, "refuse_commits", 0):
            self.refuse_commits -= 1
            raise ClientError("offset commit: unknown member", True)
        self.commits = [*getattr(self, "commits", []), dict(offsets)]
        if not asynchronous:
            self.group = {**getattr(self, "group", {}), **offsets}


P0 = (TOPIC, 0)


def _source(consumer: ScriptedConsumer, linger_ms: int = 0) -> Source:
    source = Source(consumer, TOPIC, batch_size=100, linger_ms=linger_ms, metrics=Metrics())
    source.subscribe()
    return source


def test_dropped_records_are_re_read_when_the_assignment_comes_polls_after_the_revocation():
    """kafka-python: a join that outlasts poll's timeout revokes in one poll and assigns in a
    later one; the hand-back must survive the polls in between (it did not: ~50 records lost
    per rebalance in the chaos test)."""
    consumer = ScriptedConsumer([("assign", [P0])])
    source = _source(consumer, linger_ms=50)
    source.next_batch()  # joined, nothing yet
    consumer.steps = [_records(0, 0, 10), ("revoke", [P0]), _records(0, 99, 0),
                      _records(0, 99, 0), ("assign", [P0])]
    # one linger window: the records, the revocation (drops them), polls with nothing while
    # the join goes on, then the assignment, each in its own poll
    batch = source.next_batch()
    assert len(batch) == 0 and not consumer.steps
    assert consumer.seeks == [(P0, 0)], "the partition came back without a rewind"


def test_a_batch_that_fails_after_its_partition_was_revoked_is_re_read_if_it_comes_back():
    consumer = ScriptedConsumer([("assign", [P0]), _records(0, 0, 10)])
    source = _source(consumer)
    source.next_batch()
    batch = source.next_batch()  # handed on to delivery: in flight
    assert batch.offsets.tolist() == list(range(10))
    consumer.steps = [("revoke", [P0])]
    source.next_batch()  # revoked: resume after the in-flight batch if it comes back ...
    source.rewind(batch.first_offsets())  # ... but its delivery failed meanwhile
    consumer.steps = [("assign", [P0])]
    source.next_batch()
    assert consumer.seeks[-1] == (P0, 0)


def test_a_hand_back_is_only_for_the_assignment_that_follows_the_revocation():
    """Moved to another member and back later: start from the group's commit, not from an
    old hand-back (the other member has filtered and committed past it)."""
    consumer = ScriptedConsumer([("assign", [P0]), _records(0, 0, 10)])
    source = _source(consumer)
    source.next_batch()
    source.next_batch()
    consumer.steps = [("revoke", [P0]), ("assign", [(TOPIC, 1)]), ("revoke", [(TOPIC, 1)]),
                      ("assign", [P0])]
    for _ in range(4):
        source.next_batch()
    assert consumer.seeks == []


def test_a_lost_partition_that_comes_back_resumes_at_the_groups_commit_if_another_member_went_further():
    """A kafka-python member frozen past its session (SIGSTOP 15 s) got its partition back after
    the other member had filtered and committed 7,000 records past its hand-back, and filtered
    them all again (a chaos run, stop 42; in exactly-once mode too)."""
    consumer = ScriptedConsumer([("assign", [P0]), _records(0, 0, 10)])
    source = _source(consumer)
    source.next_batch()
    assert source.next_batch().offsets.tolist() == list(range(10))  # handed on; commit pending
    consumer.steps = [("lost", [P0])]
    source.next_batch()
    consumer.group = {P0: 7010}  # meanwhile another member filtered 10..7009 and committed
    # the assignment seeks to the hand-back (10); what the client fetched from there in the
    # same poll must not be handed on
    consumer.steps = [("assign", [P0], _records(0, 10, 5)), _records(0, 7010, 3)]
    handed = [source.next_batch() for _ in range(3)]
    assert consumer.seeks == [(P0, 10), (P0, 7010)]
    assert [o for b in handed for o in b.offsets.tolist()] == [7010, 7011, 7012]


def test_only_the_partition_another_member_moved_on_is_moved_and_its_neighbours_records_stay():
    """Review: two partitions come back in one assignment, one filtered meanwhile by another
    member; the other's records, fetched in the same poll, must be handed on untouched."""
    p1 = (TOPIC, 1)
    both = RecordBatch.concat(TOPIC, [_records(0, 0, 10), _records(1, 0, 10)])
    consumer = ScriptedConsumer([("assign", [P0, p1]), both])
    source = _source(consumer)
    source.next_batch()
    source.next_batch()
    consumer.group = {P0: 500, p1: 3}
    came_back = RecordBatch.concat(TOPIC, [_records(0, 10, 4), _records(1, 10, 4)])
    consumer.steps = [("lost", [P0, p1]), ("assign", [P0, p1], came_back), _records(0, 500, 2)]
    handed = [source.next_batch() for _ in range(3)]
    assert sorted(consumer.seeks) == sorted([(P0, 10), (p1, 10), (P0, 500)])
    got = sorted((int(p), int(o)) for b in handed for p, o in zip(b.partitions, b.offsets))
    assert got == [(0, 500), (0, 501), (1, 10), (1, 11), (1, 12), (1, 13)]


def test_a_hand_back_ahead_of_the_groups_commit_stands():
    """Nobody else filtered the partition: the commit lags the records this member handed on,
    and resuming at the commit would filter them twice; at the hand-back nothing is skipped."""
    consumer = ScriptedConsumer([("assign", [P0]), _records(0, 0, 10)])
    source = _source(consumer)
    source.next_batch()
    source.next_batch()
    consumer.group = {P0: 4}
    consumer.steps = [("lost", [P0]), ("assign", [P0]), _records(0, 10, 5)]
    handed = [source.next_batch() for _ in range(3)]
    assert consumer.seeks == [(P0, 10)]
    assert [o for b in handed for o in b.offsets.tolist()] == [10, 11, 12, 13, 14]


def test_an_unreadable_commit_keeps_the_hand_back():
    """The broker does not answer the commit read: nothing may be skipped, so the hand-back
    stands (records may be filtered twice)."""
    from depois_stream.filter.clients.base import ClientError

    class Unanswered(ScriptedConsumer):
        def committed(self, tps, timeout_s: float) -> dict:
            raise ClientError("no answer", retriable=True)

    consumer = Unanswered([("assign", [P0]), _records(0, 0, 10)])
    source = _source(consumer)
    source.next_batch()
    source.next_batch()
    consumer.steps = [("lost", [P0]), ("assign", [P0]), _records(0, 10, 2)]
    handed = [source.next_batch() for _ in range(3)]
    assert consumer.seeks == [(P0, 10)]
    assert [o for b in handed for o in b.offsets.tolist()] == [10, 11]


class _StallingConsumer(ScriptedConsumer):
    """A scripted consumer that also answers the stall watch's questions."""

    def __init__(self, steps: list, committed: int | None = None) -> None:
        super().__init__(steps)
        self.resumed: list[TP] = []
        self._committed = committed

    def resume(self, tps) -> None:
        self.resumed.extend(tps)

    def committed(self, tps, timeout_s):
        return {tp: self._committed for tp in tps}


def _stalled_source(steps: list, committed: int | None = None) -> tuple[Source, _StallingConsumer]:
    consumer = _StallingConsumer([("assign", [P0]), *steps], committed)
    source = Source(consumer, TOPIC, batch_size=100, linger_ms=0, metrics=Metrics(),
                    stall_restart_s=60.0)
    source.subscribe()
    for _ in range(1 + len(steps)):
        source.next_batch()
    return source, consumer


def _asked(source: Source, n: int) -> None:
    """The loop asks for ``n`` batches and gets nothing."""
    for _ in range(n):
        source.next_batch()


def _restarts(source: Source) -> float:
    return source._metrics.registry.get_sample_value(
        "depois_partition_restarts_total", {"topic": TOPIC, "partition": "0"}) or 0.0


def test_a_partition_with_lag_and_no_progress_while_asked_is_restarted_where_it_stood():
    source, consumer = _stalled_source([_records(0, 0, 10)])
    source._watch_stalls({P0: 5}, now=0.0)
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=59.0)
    assert consumer.seeks == [] and _restarts(source) == 0  # not yet the limit
    source._watch_stalls({P0: 5}, now=60.0)
    assert consumer.seeks == [(P0, 10)] and consumer.resumed == [P0]  # after the last handed on
    assert _restarts(source) == 1
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=119.0)
    source._watch_stalls({P0: 5}, now=120.0)  # still stuck: again, a limit after the first
    assert consumer.seeks == [(P0, 10), (P0, 10)] and _restarts(source) == 2


def _stalled_twice(steps: list, clock: list[float]) -> tuple[Source, _StallingConsumer]:
    """A source on a fake clock whose partition 0 stalled at 10 and was restarted there once."""
    consumer = _StallingConsumer([("assign", [P0]), _records(0, 0, 10), *steps])
    source = Source(consumer, TOPIC, batch_size=100, linger_ms=0, metrics=Metrics(),
                    stall_restart_s=60.0, clock=lambda: clock[0])
    source.subscribe()
    source.next_batch()
    source.next_batch()
    source._watch_stalls({P0: 5}, now=0.0)
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=60.0)
    assert consumer.seeks == [(P0, 10)] and getattr(consumer, "asked", []) == []  # a restart first
    return source, consumer


def _consumed(source: Source) -> float:
    return source._metrics.registry.get_sample_value("depois_records_consumed_total", {"topic": TOPIC})


def test_a_partition_a_restart_did_not_move_is_passed_only_on_the_clients_own_finding():
    """Still stalled at the offset of its restart: the client is asked what it cannot read
    there. Nothing found (a transaction left open upstream, a slow broker): restarted again,
    nothing dead-lettered. Found: the first offset named is handed on as unreadable (the
    pipeline dead-letters it) and the partition sought past it; the rest of its batch only
    once the client has read nothing from there for PASS_PROBE_S and STALL_MIN_ASKS asks."""
    clock = [0.0]
    source, consumer = _stalled_twice([], clock)
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=120.0)
    assert consumer.asked == [(P0, 10)]  # nothing found: restarted again
    assert consumer.seeks == [(P0, 10), (P0, 10)] and _restarts(source) == 2

    why = ["cannot parse"] * 3
    consumer.unreadable = {10: RecordBatch.unreadable(TOPIC, [0, 0, 0], [10, 11, 12], why)}
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=180.0)
    assert consumer.asked == [(P0, 10), (P0, 10)] and consumer.seeks[-1] == (P0, 11)
    batch = source.next_batch()
    assert batch.offsets.tolist() == [10] and isinstance(batch.headers[0], Unreadable)
    assert _consumed(source) == 11 and _restarts(source) == 2
    clock[0] += PASS_PROBE_S
    _asked(source, STALL_MIN_ASKS - 1)
    assert consumer.seeks[-1] == (P0, 11)  # not yet: the client may still read on
    batch = source.next_batch()
    assert consumer.seeks[-1] == (P0, 13) and batch.offsets.tolist() == [11, 12]
    assert _consumed(source) == 13 and len(consumer.asked) == 2  # no new question


def test_offsets_passed_as_unreadable_are_passed_again_at_once_after_a_rewind():
    """A retried delivery rewinds the partition back before offsets already passed as
    unreadable: the client stalls on the same bytes, and they are passed again after
    PASS_PROBE_S and STALL_MIN_ASKS asks, without a restart or another second opinion."""
    clock = [0.0]
    source, consumer = _stalled_twice([], clock)
    consumer.unreadable = {10: RecordBatch.unreadable(TOPIC, [0, 0], [10, 11], ["x"] * 2)}
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=120.0)
    source.next_batch()
    clock[0] += PASS_PROBE_S
    _asked(source, STALL_MIN_ASKS)
    assert consumer.seeks[-1] == (P0, 12) and len(consumer.asked) == 1
    source.rewind({P0: 10})  # the delivery of that batch failed: read again from 10
    source._watch_stalls({P0: 5}, now=200.0)
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=200.0 + PASS_PROBE_S)
    assert consumer.seeks[-1] == (P0, 12) and len(consumer.asked) == 1
    batch = source.next_batch()
    assert batch.offsets.tolist() == [10, 11] and _restarts(source) == 1
    assert _consumed(source) == 12  # read again, counted once


def test_a_partition_that_reads_on_after_the_passed_offset_keeps_the_rest_of_its_batch():
    """librdkafka can step over a record whose key length lies (its own length is right): the
    records after it in the batch are read, not dead-lettered (a diff review, stop 51). And an
    offset named past ``at`` (a transaction marker in between) is passed too."""
    clock = [0.0]
    source, consumer = _stalled_twice([], clock)
    consumer.unreadable = {10: RecordBatch.unreadable(TOPIC, [0, 0, 0], [11, 12, 13], ["x"] * 3)}
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=120.0)
    assert consumer.seeks[-1] == (P0, 12)
    assert source.next_batch().offsets.tolist() == [11]
    consumer.steps = [_records(0, 12, 2)]  # the client reads on
    assert source.next_batch().offsets.tolist() == [12, 13]
    clock[0] += 10 * PASS_PROBE_S
    _asked(source, STALL_MIN_ASKS)
    assert consumer.seeks[-1] == (P0, 12)  # nothing more passed


def test_no_restart_while_progressing_paused_caught_up_or_not_asked():
    source, consumer = _stalled_source([_records(0, 0, 10)])
    source._watch_stalls({P0: 5}, now=0.0)
    _asked(source, STALL_MIN_ASKS - 1)  # the loop spent the time waiting for acknowledgements
    source._watch_stalls({P0: 5}, now=100.0)
    consumer.steps = [_records(0, 10, 3)]
    _asked(source, STALL_MIN_ASKS)  # progress: a new episode starts now
    source._watch_stalls({P0: 5}, now=110.0)
    source._watch_stalls({P0: 5}, now=169.0)
    source.pause("breaker")  # the filter's own pause is never undone by the watch
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=500.0)
    source.resume("breaker")
    source._watch_stalls({P0: 0}, now=600.0)  # caught up
    source._watch_stalls({P0: 5}, now=601.0)
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=660.0)  # lag since 601 only
    assert consumer.seeks == [] and consumer.resumed == [P0] and _restarts(source) == 0
    source._watch_stalls({P0: 5}, now=661.0)
    assert consumer.seeks == [(P0, 13)] and _restarts(source) == 1


def test_a_partition_that_never_gave_a_record_restarts_from_the_commit_or_only_resumes():
    for committed, seeks in ((42, [(P0, 42)]), (None, [])):
        source, consumer = _stalled_source([], committed)
        source._watch_stalls({P0: 7}, now=0.0)
        _asked(source, STALL_MIN_ASKS)
        source._watch_stalls({P0: 7}, now=60.0)
        assert consumer.seeks == seeks and consumer.resumed == [P0] and _restarts(source) == 1


def test_the_stall_watch_is_off_at_zero():
    consumer = _StallingConsumer([("assign", [P0])])
    source = Source(consumer, TOPIC, batch_size=100, linger_ms=0, metrics=Metrics())
    source.subscribe()
    source._watch_stalls({P0: 5}, now=0.0)
    _asked(source, 100)
    source._watch_stalls({P0: 5}, now=1e6)
    assert consumer.seeks == [] and consumer.resumed == []


def test_a_pause_or_a_rewind_between_two_checks_starts_the_watch_over():
    """A delivery backoff pauses and resumes inside one turn of the loop and re-reads the failed
    batch from the same offset: that is the filter's own doing, not a client that stopped."""
    for interrupt in (lambda s: (s.pause("backoff"), s.resume("backoff")),
                      lambda s: s.rewind({P0: 10})):
        source, consumer = _stalled_source([_records(0, 0, 10)])
        source._watch_stalls({P0: 5}, now=0.0)
        _asked(source, STALL_MIN_ASKS)
        interrupt(source)
        source._watch_stalls({P0: 5}, now=60.0)  # a new episode starts here
        _asked(source, STALL_MIN_ASKS)
        source._watch_stalls({P0: 5}, now=119.0)
        assert _restarts(source) == 0
        source._watch_stalls({P0: 5}, now=120.0)
        assert _restarts(source) == 1


def test_full_batches_of_other_partitions_are_not_asks():
    """Under a backlog the client hands out full batches; a partition whose records wait behind
    the others' is queued, not stalled."""
    source, consumer = _stalled_source([_records(0, 0, 10)])
    source._watch_stalls({P0: 5}, now=0.0)
    consumer.steps = [_records(1, k * 100, 100) for k in range(STALL_MIN_ASKS)]  # batch_size 100
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=60.0)
    assert _restarts(source) == 0
    _asked(source, STALL_MIN_ASKS)  # the backlog is worked off: nothing for P0 all the same
    source._watch_stalls({P0: 5}, now=61.0)
    assert _restarts(source) == 1


def test_batches_full_in_bytes_of_other_partitions_are_not_asks(monkeypatch):
    """A batch cut short by MAX_HELD_BYTES (large records of another partition) is as full as
    one of --batch-size records: the partition whose records wait behind them is queued, not
    stalled, and restarting it would read its records twice."""
    from depois_stream.filter.clients import base

    monkeypatch.setattr(base, "MAX_HELD_BYTES", 10)
    source, consumer = _stalled_source([_records(0, 0, 10)])
    source._watch_stalls({P0: 5}, now=0.0)
    consumer.steps = [_records(1, k * 10, 10) for k in range(STALL_MIN_ASKS)]  # 10 bytes each
    _asked(source, STALL_MIN_ASKS)
    source._watch_stalls({P0: 5}, now=60.0)
    assert _restarts(source) == 0
    _asked(source, STALL_MIN_ASKS)  # worked off: nothing for P0 all the same
    source._watch_stalls({P0: 5}, now=61.0)
    assert _restarts(source) == 1


def test_a_settled_rewind_replaces_the_hand_back_of_a_revoked_partition():
    """Exactly-once, kafka-python: a commit whose reply was lost rewinds the batch (100), the
    partition is revoked while the filter backs off, then the group's committed offset (104:
    the commit did complete) is read. Taking the earlier of the two, as for a failed batch,
    resumed at 100 and transacted the committed batch a second time."""
    consumer = ScriptedConsumer([("assign", [P0]), _records(0, 100, 4)])
    source = _source(consumer)
    source.next_batch()
    batch = source.next_batch()
    source.rewind(batch.first_offsets())  # the commit failed, as far as the filter knows
    consumer.steps = [("revoke", [P0])]
    source.next_batch()
    source.rewind({P0: 104}, settled=True)  # the committed offsets say it did commit
    consumer.steps = [("assign", [P0])]
    source.next_batch()
    assert consumer.seeks[-1] == (P0, 104)


def test_a_batch_out_of_offset_order_rewinds_to_its_first_offset_and_commits_past_its_last():
    """librdkafka can hand over records past an unreadable legacy message set before the
    placeholder for it, which the adapter appends: [105, 106, 107, 100]. Read by position, the
    batch rewound to 105 (the dead letter for 100 never produced after a retry) and its commit
    said 101, behind records already filtered."""
    batch = RecordBatch.concat("t", [
        RecordBatch("t", np.array([0, 0, 0], np.int32), np.array([105, 106, 107], np.int64),
                    np.zeros(3, np.int64), [b"k"] * 3, [b"v"] * 3, [[]] * 3),
        RecordBatch.unreadable("t", [0], [100], ["cannot read"]),
    ])
    assert batch.first_offsets() == {("t", 0): 100}
    assert batch.next_offsets() == {("t", 0): 108}


def test_a_partition_that_comes_back_with_no_commit_restarts_at_the_log_start() -> None:
    """Stop 45, an SRE drill: the broker came back empty (new logs, no group commits) and the
    member resumed its partition where it had left the old log (12,000), so every record of the
    new log before that offset was skipped. With no commit of the group, the partition restarts
    at the new log's start (auto_offset_reset=earliest); at worst records are filtered twice."""
    consumer = ScriptedConsumer([
        ("assign", [P0]),
        _records(0, 100, 5),
        ("lost", [P0]),
        ("assign", [P0], _records(0, 105, 3)),  # the client resumed at the hand-back
    ])
    consumer.logs = {P0: (0, 40)}
    source = _source(consumer)
    source.next_batch()  # joined
    assert len(source.next_batch()) == 5
    source.next_batch()  # lost
    assert len(source.next_batch()) == 0  # the records read at 105 are dropped ...
    assert consumer.seeks[-1] == (P0, 0)  # ... and the partition restarts at the log start


def test_an_owned_partition_whose_log_ends_before_its_position_restarts_when_idle() -> None:
    """The other path of the same loss: the partition stays assigned across the broker's
    restart, the member's position (105) lies past the new log's end (40), the group has no
    commit, and Tansu answers each fetch with nothing. After LOG_LOST_S of that while idle the
    partition restarts at the log's start; with a commit of the group (a log end that merely
    lags, as Tansu lists it) it never does."""
    from depois_stream.filter import source as source_module

    # quiet False: the batch is still in flight, so no commit yet is expected (a diff review:
    # on a healthy Tansu a new group's first batch, slow to deliver, was sought back)
    for group, quiet, expected in (({}, True, (P0, 0)), ({P0: 105}, True, None),
                                   ({}, False, None)):
        consumer = ScriptedConsumer([("assign", [P0]), _records(0, 100, 5)])
        consumer.logs = {P0: (0, 40)}
        consumer.group = group
        now = [0.0]
        source = Source(consumer, TOPIC, batch_size=100, linger_ms=0, metrics=Metrics(),
                        clock=lambda: now[0])
        source.quiet = lambda: quiet
        source.subscribe()
        source.next_batch()
        assert len(source.next_batch()) == 5
        seeks = len(consumer.seeks)
        for _ in range(5):  # idle: every poll comes back empty
            now[0] += source_module.LOG_CHECK_S
            source.next_batch()
        if expected is None:
            assert len(consumer.seeks) == seeks
        else:
            assert consumer.seeks[-1] == expected


def _replaced_log(refuse_commits: int, reset_to: str = "earliest"):
    """A member that filtered the old log to 200, then sees the topic under a new id with a
    stray commit at 712 in the new log, while the group refuses ``refuse_commits`` commits."""
    consumer = ScriptedConsumer([("assign", [P0]), _records(0, 190, 10)])
    consumer.ident = "old"
    consumer.logs = {P0: (0, 1200)}
    source = Source(consumer, TOPIC, batch_size=100, linger_ms=0, metrics=Metrics(),
                    reset_to=reset_to)
    source.subscribe()
    source.next_batch()
    assert len(source.next_batch()) == 10  # the old log, delivered
    consumer.ident = "new"  # the broker came back empty ...
    consumer.group = {P0: 712}  # ... and a batch read at 200 committed in its new log
    consumer.refuse_commits = refuse_commits
    return consumer, source


def test_a_topic_under_a_new_id_restarts_at_the_new_logs_start_whatever_the_group_committed():
    """Stop 45's open case (kafka-python, exactly-once, 4 of 7 runs): the broker came back empty
    and, before the group noticed, the member read the new log at its old position (200) and its
    transaction committed there (712). When the partition came back, a commit existed, so nothing
    looked lost, and the commit looked like another member's progress: the new log's records
    0 to 711 were never filtered. The client's metadata names the change (the topic's id,
    KIP-516): the partition restarts at the new log's start, and that start is committed so
    that the stray commit cannot move it on later. A commit refused while the group re-forms is
    tried again, and nothing is handed on meanwhile: not the records read at the old position in
    the poll that saw the change, nor those read at the stray commit when the partition came
    back (a diff review: with the commit taken at once, the first poll's records went on)."""
    for refused in (0, 1, 2, 3):
        consumer, source = _replaced_log(refused)
        # the group resumes the partition at its commit: the stray one until the restart's
        back_at = 0 if refused == 0 else 712
        consumer.steps = [_records(0, 200, 12), ("lost", [P0]),
                          ("assign", [P0], _records(0, back_at, 4))]
        handed_on = [source.next_batch() for _ in range(6)]
        offsets = [o for b in handed_on for o in b.offsets.tolist()]
        assert all(o < 200 for o in offsets), (refused, offsets)
        assert consumer.seeks[-1] == (P0, 0) and (P0, 712) not in consumer.seeks, refused
        assert consumer.group[P0] == 0, f"{refused}: the stray commit was left to move it on"
        assert not source.paused, refused
        consumer.steps = [_records(0, 0, 5)]
        assert source.next_batch().offsets.tolist() == list(range(5)), refused
        counted = {s.labels["cause"]: s.value for m in source._metrics.partition_log_resets.collect()
                   for s in m.samples if s.name.endswith("_total")}
        assert counted == {"new_id": 1, "past_end": 0}, counted


def test_under_latest_a_replaced_log_restarts_at_its_listed_end_not_the_old_logs():
    """auto_offset_reset=latest restarts a replaced log at its end. kafka-python's log end also
    takes the high watermark of its last fetch, which after the replacement is the old log's
    (12,000; the new log ends at 441): the partition was sought and committed past the new
    log's end, and Tansu answers such a fetch with nothing (a second review)."""
    consumer, source = _replaced_log(refuse_commits=0, reset_to="latest")
    consumer.logs = {P0: (0, 441)}
    consumer.fetched_end = 12_000
    consumer.steps = [_records(0, 200, 12)]
    source.next_batch()
    assert consumer.seeks[-1] == (P0, 441) and consumer.group[P0] == 441


def test_a_replaced_log_holds_the_stream_until_its_restart_is_committed():
    consumer, source = _replaced_log(refuse_commits=100)
    consumer.steps = [_records(0, 200, 12)]
    assert len(source.next_batch()) == 0
    assert source.paused, "records of the new log could be read at the old position"
    consumer.refuse_commits = 0
    source.next_batch()
    assert not source.paused and consumer.group[P0] == 0


def test_a_replaced_partition_that_went_to_another_member_is_not_restarted_when_it_returns():
    """The restart belongs to the ownership that saw the change. A partition that went to
    another member meanwhile is that member's; coming back days later it resumes at the group's
    commit, not at the log's start (a diff review: it stayed marked and was restarted, filtering
    the whole partition again)."""
    consumer, source = _replaced_log(refuse_commits=100)
    consumer.steps = [_records(0, 200, 12), ("lost", [P0]), ("assign", [(TOPIC, 1)])]
    for _ in range(3):
        source.next_batch()
    consumer.refuse_commits = 0
    source.next_batch()
    assert not source.paused
    consumer.group = {P0: 50_000}
    seeks = len(consumer.seeks)
    consumer.steps = [("revoke", [(TOPIC, 1)]), ("assign", [P0], _records(0, 50_000, 3))]
    got = [source.next_batch() for _ in range(2)]
    assert [o for b in got for o in b.offsets.tolist()] == [50_000, 50_001, 50_002]
    assert consumer.seeks[seeks:] == []


def test_an_old_topic_id_seen_again_is_not_a_new_replacement():
    """A broker whose metadata is stale can still answer with the replaced id; taking it as one
    more replacement filtered the whole partition again (a diff review)."""
    consumer, source = _replaced_log(refuse_commits=0)
    consumer.steps = [_records(0, 200, 12)]
    source.next_batch()
    assert consumer.group[P0] == 0
    seeks, commits = len(consumer.seeks), len(consumer.commits)
    consumer.ident = "old"
    consumer.steps = [_records(0, 0, 5)]
    assert source.next_batch().offsets.tolist() == list(range(5))
    consumer.ident = "new"
    source.next_batch()
    assert len(consumer.seeks) == seeks and len(consumer.commits) == commits


def test_a_member_without_partitions_asks_the_group_to_look_again_when_the_topic_is_replaced():
    """A member that rejoined while the topic was missing holds no partition, and librdkafka's
    group does not look at the re-created topic for minutes (an outside drill): it subscribes
    again. A member that holds partitions restarts them instead, without a rebalance."""
    consumer = ScriptedConsumer([])
    consumer.ident = "old"
    source = _source(consumer)
    source.next_batch()
    consumer.ident = "new"
    source.next_batch()
    assert getattr(consumer, "resubscribed", 0) == 1
    held, member = _replaced_log(refuse_commits=0)
    held.steps = [_records(0, 200, 1)]
    member.next_batch()
    assert held.group[P0] == 0 and getattr(held, "resubscribed", 0) == 0


def test_a_member_between_a_revocation_and_its_next_assignment_is_not_in_a_settled_group():
    """A rebalance that never completes (Tansu's coordinator wedges when membership changes
    overlap a join) left /readyz at group_joined true and depois_group_joined at 1 on every
    member that had been in the group: "joined, 0 partitions", a healthy standby to look at
    (rebalance drill). A member is in its group from an assignment (empty or not) to the next
    revocation; DepoisMemberOutOfGroup then sees a join that does not end."""
    metrics = Metrics()
    consumer = ScriptedConsumer([("assign", [P0])])
    source = Source(consumer, TOPIC, batch_size=100, linger_ms=0, metrics=metrics)
    source.subscribe()
    joined = lambda: (source.joined, metrics.group_joined._value.get())  # noqa: E731
    source.next_batch()
    assert joined() == (True, 1)
    consumer.steps = [("revoke", [P0])]
    source.next_batch()
    assert joined() == (False, 0)
    consumer.steps = [("assign", [])]  # a standby: in the group, with no partition
    source.next_batch()
    assert joined() == (True, 1)


def test_a_revocation_names_only_the_partitions_the_member_held(caplog):
    """kafka-python revokes at close what the last rebalance had already taken: the log said
    "partitions revoked: [0, 1, 2]" a second time, for partitions it no longer held."""
    consumer = ScriptedConsumer([("assign", [P0])])
    source = _source(consumer)
    source.next_batch()
    with caplog.at_level(logging.INFO, logger="depois_stream.filter.source"):
        consumer.steps = [("revoke", [P0]), ("revoke", [P0])]
        source.next_batch()
        source.next_batch()
    assert [r.getMessage() for r in caplog.records if "revoked" in r.getMessage()] == [
        "partitions revoked: [0]"]


def test_caught_up_only_when_every_owned_partition_was_measured_at_0():
    """``--exit-when-idle-s`` ends a run only once the broker said nothing is left
    (``caught_up_at``). A partition the client could not measure (no answer for it) is not a
    partition with nothing left: the run must wait, not end with its records unread."""
    p1 = (TOPIC, 1)
    consumer = _StallingConsumer([("assign", [P0, p1])])
    source = Source(consumer, TOPIC, batch_size=100, linger_ms=0, metrics=Metrics())
    source.subscribe()
    source.next_batch()
    assert source.assigned == {P0, p1}
    for answer, caught_up in (({P0: 0}, False), ({}, False), ({P0: 0, p1: 3}, False),
                              ({P0: 0, p1: 0}, True)):
        consumer.lag = lambda tps, timeout_s, answer=answer: dict(answer)
        source.caught_up_at = None
        source.update_lag()
        assert (source.caught_up_at is not None) == caught_up, answer


def test_a_member_that_did_not_run_past_its_session_timeout_moves_on_to_the_groups_commit() -> None:
    """A frozen member (stop 51, an outside drill) still believes it owns its partitions when it
    wakes, while another member filtered and committed past its position: the first poll after
    the freeze watch reports a pause reads the group's commits, and drops and skips what
    another member committed. A commit behind, none at all (never a restart at the log's start
    for a partition that did not come back), or no pause reported change nothing."""
    for frozen, group, got, seek in ((30.0, {P0: 500}, 0, (P0, 500)),  # another member moved on
                                     (30.0, {P0: 100}, 3, None),  # the commit is behind: stay
                                     (30.0, {}, 3, None),  # nobody committed: stay, no restart
                                     (0.0, {P0: 500}, 3, None)):  # no pause: not asked
        consumer = ScriptedConsumer([("assign", [P0]), _records(0, 100, 5), _records(0, 105, 3)])
        consumer.logs = {P0: (0, 600)}
        consumer.group = group
        pause = [0.0]
        source = Source(consumer, TOPIC, batch_size=100, linger_ms=0, metrics=Metrics(),
                        frozen_for=lambda: pause.pop() if len(pause) > 1 else 0.0)
        source.subscribe()
        source.next_batch()  # joined
        assert len(source.next_batch()) == 5
        seeks = list(consumer.seeks)
        pause.append(frozen)  # frozen here; the poll that returns the records read after it
        assert len(source.next_batch()) == got, (frozen, group)
        assert consumer.seeks[len(seeks):] == ([seek] if seek else []), (frozen, group)


def test_the_freeze_watch_tells_a_stopped_process_from_a_slow_loop() -> None:
    """A slow loop leaves the watch's thread ticking (nothing reported); a stopped process stops
    it too: the pause is reported once, whether the thread ticked after waking or not yet."""
    from depois_stream.filter.freeze import FreezeWatch

    now = [0.0]
    watch = FreezeWatch(threshold_s=9.0, clock=lambda: now[0], tick_s=1.0)
    for _ in range(30):  # ticking while the loop is slow: 30 s without a frozen_for() call
        now[0] += 1.0
        watch.tick(now[0])
    assert watch.frozen_for() == 0.0
    now[0] += 25.0  # stopped: no tick for 25 s; the loop asks before the thread ticks again
    assert watch.frozen_for() == 24.0 and watch.frozen_for() == 0.0
    now[0] += 20.0
    watch.tick(now[0])  # this time the thread ticks first
    now[0] += 0.5
    assert watch.frozen_for() == 19.0 and watch.frozen_for() == 0.0
    now[0] += 5.0  # a pause below the threshold
    watch.tick(now[0])
    assert watch.frozen_for() == 0.0
