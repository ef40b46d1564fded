"""Replacing a broken producer: the real-broker restart test (test_lifecycle.py) proves the path
end to end; this pins down the order of the swap, which that test cannot force: a new producer
that cannot be made yet must not leave the filter holding a closed one."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from depois_stream.filter.clients import base
from depois_stream.filter.clients.base import ClientError, ProduceError
from depois_stream.filter.delivery import Delivery, DeliveryError
from depois_stream.filter.metrics import Metrics

pytestmark = pytest.mark.serial  # bounds how long a failing send or commit blocks


class _Producer:
    def __init__(self) -> None:
        self.closed = False

    def close(self, timeout_s: float) -> None:
        self.closed = True


def test_a_producer_that_cannot_be_replaced_yet_is_kept_open_and_replaced_later() -> None:
    made: list[_Producer] = []
    failing = [False]

    def make() -> _Producer:
        if failing[0]:
            raise ClientError("broker unreachable", True)
        made.append(_Producer())
        return made[-1]

    delivery = Delivery(make, None, None, Metrics(), ("c", "q", "d"), on_delivered=lambda r: None)
    first = delivery.producer
    failing[0] = True
    delivery._renew_producer()
    assert delivery.producer is first and not first.closed
    failing[0] = False
    delivery._renew_producer()
    assert delivery.producer is made[-1] is not first and first.closed


def test_a_transactional_call_that_never_returns_is_bounded_and_wedges_the_handle(monkeypatch) -> None:
    """librdkafka's send_offsets_to_transaction blocked for minutes past its timeout against a
    broker that had lost its transaction state (test_lifecycle.py reproduces it end to end). The
    confluent client bounds such a call, fails it as retriable, and refuses every later call on
    the handle (so the abort that follows does not block too), which makes the delivery layer
    replace the producer. No broker is needed: the handle is never connected."""
    confluent = pytest.importorskip("depois_stream.filter.clients.confluent")
    from depois_stream.filter.clients.base import ClientSettings

    monkeypatch.setattr(base, "TXN_GRACE_S", 0.2)
    producer = confluent.ConfluentProducer(ClientSettings(bootstrap_servers="127.0.0.1:9", client_id="t"))
    release = threading.Event()
    try:
        t0 = time.monotonic()
        with pytest.raises(ClientError, match="did not return within") as err:
            producer._txn(release.wait, "send_offsets_to_transaction", 0.1)
        assert err.value.retriable and time.monotonic() - t0 < 5
        with pytest.raises(ClientError, match="wedged"):
            producer._txn(lambda: pytest.fail("a wedged handle was called"), "abort_transaction", 0.1)
        producer.close(0.0)  # does not flush the wedged handle
    finally:
        release.set()


def test_a_transactional_call_that_returns_in_time_passes_its_error_through() -> None:
    confluent = pytest.importorskip("depois_stream.filter.clients.confluent")
    from confluent_kafka import KafkaError, KafkaException

    from depois_stream.filter.clients.base import ClientSettings

    producer = confluent.ConfluentProducer(ClientSettings(bootstrap_servers="127.0.0.1:9", client_id="t"))

    def fenced() -> None:
        raise KafkaException(KafkaError(KafkaError._FENCED))

    with pytest.raises(ClientError, match="commit_transaction"):
        producer._txn(fenced, "commit_transaction", 1.0)
    producer._txn(lambda: None, "commit_transaction", 1.0)  # not wedged: later calls go through


def test_call_bounded_returns_raises_or_gives_up_in_time() -> None:
    """The one helper behind every bounded librdkafka call (transactions, the final commit,
    leaving the group): what returns is reported, what raises is raised in the caller's thread,
    what blocks is abandoned after the bound."""
    from depois_stream.filter.clients.base import call_bounded

    assert call_bounded(lambda: None, 1.0, "t") is True
    with pytest.raises(ValueError, match="boom"):
        call_bounded(lambda: (_ for _ in ()).throw(ValueError("boom")), 1.0, "t")
    release = threading.Event()
    try:
        t0 = time.monotonic()
        assert call_bounded(release.wait, 0.2, "t") is False
        assert time.monotonic() - t0 < 2
    finally:
        release.set()


def _batch_and_routed(n: int, first: int = 100):
    import numpy as np

    from depois_stream.filter.clients.base import RecordBatch
    from depois_stream.filter.pipeline import Routed

    batch = RecordBatch("in", np.zeros(n, np.int32), np.arange(first, first + n, dtype=np.int64),
                        np.zeros(n, np.int64), [None] * n, [b"x"] * n, [[] for _ in range(n)])
    routed = Routed(np.zeros(n, np.int8), np.zeros(n, np.int64), [None] * n, [b"x"] * n,
                    [[] for _ in range(n)], np.zeros(n, np.int64), {"clean": n}, Counter(), Counter(),
                    np.zeros(0, np.int64), np.zeros(0, np.float32), 0)
    return batch, routed


class _Source:
    assigned = frozenset({("in", 0)})

    def __init__(self) -> None:
        self.rewinds: list[dict] = []

    def rewind(self, offsets, settled: bool = False) -> None:
        self.rewinds.append(dict(offsets))


class _TxnProducer:
    """A transactional producer that takes and acknowledges everything; tests override what
    their scenario needs."""

    def init_transactions(self, timeout_s: float) -> None: ...

    def begin_transaction(self) -> None: ...

    def send(self, topic, partition, key, value, headers, on_done) -> None:
        on_done(None)

    def poll(self, timeout_s: float) -> None: ...

    def flush(self, timeout_s: float) -> int:
        return 0

    def send_offsets_to_transaction(self, offsets, group_metadata, timeout_s: float) -> None: ...

    def commit_transaction(self, timeout_s: float) -> None: ...

    def abort_transaction(self, timeout_s: float) -> None: ...

    def close(self, timeout_s: float) -> None: ...


class _TxnConsumer:
    def group_metadata(self) -> None:
        return None


def _unconfirmed_commit(committed_by_coordinator: bool):
    """A transactional producer whose first commit_transaction fails after the coordinator
    did (or did not) commit, a consumer that reads the coordinator's offsets, and a Delivery
    on them that has just submitted a 4-record batch at offsets 100 to 103."""
    group: dict[tuple[str, int], int] = {("in", 0): 100}  # the coordinator's committed offsets

    class TxnProducer(_TxnProducer):
        made = 0

        def __init__(self) -> None:
            TxnProducer.made += 1
            self.first = TxnProducer.made == 1

        def send_offsets_to_transaction(self, offsets, group_metadata, timeout_s: float) -> None:
            self.offsets = dict(offsets)

        def commit_transaction(self, timeout_s: float) -> None:
            if committed_by_coordinator or not self.first:
                group.update(self.offsets)  # the coordinator commits ...
            if self.first:
                raise ClientError("commit_transaction: timed out", True)  # ... the reply is lost

        def abort_transaction(self, timeout_s: float) -> None:
            raise ClientError("abort_transaction: not in an abortable state", False)

    class Consumer(_TxnConsumer):
        def committed(self, tps, timeout_s: float) -> dict:
            return {tp: group.get(tp) for tp in tps}

    batch, routed = _batch_and_routed(4)
    now = [0.0]
    source = _Source()
    delivered: list = []
    delivery = Delivery(TxnProducer, Consumer(), source, Metrics(), ("c", "q", "d"),
                        on_delivered=delivered.append, exactly_once=True, clock=lambda: now[0])
    delivery.submit(batch, routed)
    return delivery, TxnProducer, group, source, routed, delivered, now


def test_a_transaction_whose_commit_was_not_confirmed_resumes_at_the_groups_committed_offsets() -> None:
    """Exactly-once: commit_transaction can fail (a timeout, or a call abandoned as wedged) after
    the coordinator received the commit, which then completes anyway. Rewinding to the batch's
    first offsets would write the batch twice for read_committed readers. The outcome is known
    once a new producer's init_transactions under the same transactional.id has settled the old
    transaction, so the filter replaces the producer and resumes at the group's committed
    offsets. No real broker can be made to lose that one reply on cue; these fakes play the
    coordinator that committed it."""
    delivery, TxnProducer, group, source, routed, delivered, now = _unconfirmed_commit(True)
    assert group[("in", 0)] == 104  # committed, though the filter was told otherwise
    assert delivered == []  # not known yet
    now[0] += 60.0  # past the backoff
    delivery.service(0.0)
    assert not delivery.backing_off
    assert TxnProducer.made == 2, "the producer was not replaced"
    assert source.rewinds[-1] == {("in", 0): 104}, f"resumed at {source.rewinds[-1]}: the batch would be written twice"
    # the committed offsets say the batch was delivered: it is counted (routed, scores, forged
    # headers) once, like any acknowledged batch
    assert delivered == [routed], "a committed batch was left out of the routed metrics"


def test_a_transaction_whose_unconfirmed_commit_did_not_happen_is_not_counted_and_is_sent_again() -> None:
    """The other outcome of the same race: the coordinator never got the commit, the new
    producer's init_transactions aborts it, the group's offsets still point at the batch, and it
    is read and sent again (counted then, once)."""
    delivery, _, _, source, _, delivered, now = _unconfirmed_commit(False)
    now[0] += 60.0
    delivery.service(0.0)
    assert source.rewinds[-1] == {("in", 0): 100}
    assert delivered == []


def test_once_stopping_a_transactional_call_waiting_on_the_broker_is_abandoned_sooner(
        monkeypatch) -> None:
    """A stop during a broker outage waited for the transactional call in flight to give up on
    its own (55 s with either library), past an orchestrator's 30 s grace period. Once the stop
    is asked for, the guard waits SHUTDOWN_STEP_S into the call and then abandons it, wedging
    the producer; without a stop the full bound applies."""
    monkeypatch.setattr(base, "SHUTDOWN_STEP_S", 0.3)
    stopping = threading.Event()
    guard = base.TransactionGuard("lib", stopping)
    release = threading.Event()
    try:
        threading.Timer(0.2, stopping.set).start()
        t0 = time.monotonic()
        with pytest.raises(ClientError, match="abandoned: stopping") as err:
            guard.call(release.wait, "commit_transaction", 30.0)
        assert err.value.retriable and 0.25 < time.monotonic() - t0 < 3
        with pytest.raises(ClientError, match="wedged"):
            guard.check("abort_transaction")
    finally:
        release.set()
    # a call that answers is not abandoned, stop or not
    done = base.TransactionGuard("lib", stopping)
    done.call(lambda: time.sleep(0.05), "commit_transaction", 30.0)
    assert done.wedged is None


@pytest.mark.parametrize("module", ["kafka_python", "confluent"])
def test_both_clients_transactional_calls_go_through_the_guard(monkeypatch, module: str) -> None:
    """kafka-python's commit_transaction and send_offsets_to_transaction take no timeout, so
    its adapter needs the guard as much as librdkafka's. No broker: librdkafka's handle never
    connects; kafka-python's producer bootstraps in its constructor, so that adapter is built
    around no producer (only its guard is made, as its constructor makes it). The end-to-end
    check is test_lifecycle.py's stop during an outage mid-transaction."""
    import importlib

    from depois_stream.filter.clients.base import ClientSettings

    pytest.importorskip({"kafka_python": "kafka", "confluent": "confluent_kafka"}[module])
    client = importlib.import_module(f"depois_stream.filter.clients.{module}")
    monkeypatch.setattr(base, "SHUTDOWN_STEP_S", 0.2)
    stopping = threading.Event()
    stopping.set()
    settings = ClientSettings(bootstrap_servers="127.0.0.1:9", client_id="t", stopping=stopping)
    if module == "kafka_python":
        producer = object.__new__(client.KafkaPythonProducer)
        producer._guard = base.TransactionGuard(client.NAME, settings.stopping)
    else:
        producer = client.ConfluentProducer(settings)
    release = threading.Event()
    try:
        with pytest.raises(ClientError, match="abandoned"):
            producer._txn(release.wait, "send_offsets_to_transaction", 30.0)
        with pytest.raises(ClientError, match="wedged"):
            producer._txn(lambda: pytest.fail("a wedged handle was called"), "begin_transaction")
    finally:
        release.set()


def test_calls_given_up_on_are_counted_until_they_return() -> None:
    from depois_stream.filter.clients.base import abandoned_calls, call_bounded

    before = abandoned_calls()
    release = threading.Event()
    try:
        assert call_bounded(release.wait, 0.05, "t") is False
        assert abandoned_calls() == before + 1
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while abandoned_calls() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert abandoned_calls() == before


def test_a_producer_whose_init_transactions_failed_is_freed_at_once() -> None:
    """During an outage the exactly-once filter retries making a producer every backoff, and
    each failed init_transactions left its librdkafka handle (4 threads, sockets) alive: the
    error raised through call_bounded formed reference cycles with its frames, and the filter's
    tuned garbage collector (generation 2 frozen, rare full passes) did not free them: 4 more
    threads every 30 s while the broker was frozen. Real librdkafka, no broker (nothing
    listens on port 1); the collector is off so that only reference counting can free it."""
    import gc
    import weakref

    confluent = pytest.importorskip("depois_stream.filter.clients.confluent")
    from depois_stream.filter.clients.base import ClientSettings

    gc.collect()
    gc.disable()
    try:
        producer = confluent.ConfluentProducer(ClientSettings(
            bootstrap_servers="127.0.0.1:1", client_id="t", transactional_id="leak"))
        with pytest.raises(ClientError):
            producer.init_transactions(0.5)
        gone = weakref.ref(producer)
        del producer
        assert gone() is None, "the failed producer is still referenced"
    finally:
        gc.enable()


def test_no_producer_is_made_on_the_way_out() -> None:
    """Making a producer waits on the broker (kafka-python's bootstrap took 30 s during an
    outage, past a stop's grace period), and nothing more will be sent once stopping."""
    made: list[_Producer] = []

    def make() -> _Producer:
        made.append(_Producer())
        return made[-1]

    stopping = threading.Event()
    delivery = Delivery(make, None, None, Metrics(), ("c", "q", "d"), on_delivered=lambda r: None,
                        stopping=stopping)
    delivery._renew = True
    stopping.set()
    delivery._renew_when_due()
    assert len(made) == 1 and delivery._renew
    stopping.clear()
    delivery._renew_when_due()
    assert len(made) == 2 and not delivery._renew


def test_kafka_pythons_transactional_calls_are_bounded_and_abandoned_on_stop(monkeypatch) -> None:
    """kafka-python's commit_transaction and send_offsets_to_transaction take no timeout: its
    adapter, built by its own constructor around a stand-in KafkaProducer whose calls block
    like a frozen broker's, must give them up 3 s (here 0.2 s) into a stop and refuse every
    later call on the wedged producer."""
    kp = pytest.importorskip("depois_stream.filter.clients.kafka_python")
    from depois_stream.filter.clients.base import ClientSettings

    release = threading.Event()
    calls: list[str] = []

    class FrozenBroker:
        def __init__(self, **config) -> None:
            self.config = config

        def _blocks(self, name: str):
            def call(*args) -> None:
                calls.append(name)
                release.wait()
            return call

        def __getattr__(self, name: str):
            if name.endswith("transaction") or name.endswith("transactions") \
                    or name == "send_offsets_to_transaction":
                return self._blocks(name)
            raise AttributeError(name)

    monkeypatch.setattr(kp, "KafkaProducer", FrozenBroker)
    monkeypatch.setattr(base, "SHUTDOWN_STEP_S", 0.2)
    stopping = threading.Event()
    producer = kp.KafkaPythonProducer(ClientSettings(
        bootstrap_servers="127.0.0.1:9", client_id="t", transactional_id="x", stopping=stopping))
    try:
        threading.Timer(0.1, stopping.set).start()
        t0 = time.monotonic()
        with pytest.raises(ClientError, match="abandoned"):
            producer.commit_transaction(30.0)
        assert time.monotonic() - t0 < 3 and calls == ["commit_transaction"]
        for attempt in (lambda: producer.abort_transaction(30.0), producer.begin_transaction,
                        lambda: producer.send_offsets_to_transaction({("t", 0): 1}, "g", 30.0)):
            with pytest.raises(ClientError, match="wedged"):
                attempt()
        assert calls == ["commit_transaction"], "a wedged producer was called"
    finally:
        release.set()


def test_an_abandoned_call_that_fails_later_does_not_keep_its_handle() -> None:
    """A call given up on (a wedged librdkafka commit) usually fails once the broker answers;
    its error, kept in call_bounded's outcome list, formed a cycle through the worker's frame
    that held the call, and so the producer handle, until a full garbage collection."""
    import gc
    import weakref

    from depois_stream.filter.clients.base import call_bounded

    class Handle:
        pass

    release = threading.Event()
    gc.collect()
    gc.disable()
    try:
        handle = Handle()
        gone = weakref.ref(handle)

        def stuck(h: Handle = handle) -> None:
            release.wait()
            raise RuntimeError(f"failed late: {h}")

        assert call_bounded(stuck, 0.05, "t") is False
        del handle, stuck
        release.set()
        deadline = time.monotonic() + 5
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone() is None, "the abandoned call's handle is still referenced"
    finally:
        gc.enable()


def test_a_wedged_kafka_python_producer_is_force_closed_only_on_the_way_out(monkeypatch) -> None:
    """Force-closing the sender stops it re-sending the stuck call's request, which then never
    returns: right when exiting (close() would flush the abandoned transaction for its whole
    timeout), wrong during the run, when a running sender lets the call end once the broker
    answers."""
    kp = pytest.importorskip("depois_stream.filter.clients.kafka_python")
    from depois_stream.filter.clients.base import ClientSettings

    seen: list[str] = []

    class Stand:
        def __init__(self, **config) -> None:
            self._sender = self

        def force_close(self) -> None:
            seen.append("force_close")

        def close(self, timeout=None) -> None:
            seen.append("close")

    monkeypatch.setattr(kp, "KafkaProducer", Stand)
    stopping = threading.Event()
    producer = kp.KafkaPythonProducer(ClientSettings(
        bootstrap_servers="127.0.0.1:9", client_id="t", transactional_id="x", stopping=stopping))
    producer._guard.wedged = "commit_transaction did not return within 50 s"
    producer.close(0.0)
    assert seen == ["close"]
    stopping.set()
    producer.close(3.0)
    assert seen == ["close", "force_close"]


def test_a_transaction_with_an_output_the_client_would_not_take_is_aborted_not_committed() -> None:
    """Exactly-once: ``send`` raising for one output (librdkafka's local queue full for 10 s,
    say) only stopped the sending; the offsets then went into the transaction and were committed
    with the rest of the batch's outputs never written. No broker is made to fill a producer's
    local queue on cue; these fakes play the client."""
    from depois_stream.filter.clients.base import ProduceError

    calls: list[str] = []

    class TxnProducer(_TxnProducer):
        def begin_transaction(self) -> None:
            calls.append("begin")

        def send(self, topic, partition, key, value, headers, on_done) -> None:
            if len(calls) == 3:  # the third output of the batch
                raise ProduceError("local queue full for 10 s", retriable=True)
            calls.append("send")
            on_done(None)

        def send_offsets_to_transaction(self, offsets, group_metadata, timeout_s: float) -> None:
            calls.append("offsets")

        def commit_transaction(self, timeout_s: float) -> None:
            calls.append("commit")

        def abort_transaction(self, timeout_s: float) -> None:
            calls.append("abort")

    delivered: list = []
    source = _Source()
    delivery = Delivery(TxnProducer, _TxnConsumer(), source, Metrics(), ("c", "q", "d"),
                        on_delivered=delivered.append, exactly_once=True, clock=lambda: 0.0)
    batch, routed = _batch_and_routed(5)
    delivery.submit(batch, routed)
    assert "offsets" not in calls and "commit" not in calls and calls[-1] == "abort"
    assert source.rewinds == [{("in", 0): 100}] and delivery.backing_off and not delivered


def test_a_record_refused_again_goes_bare_and_one_refused_bare_backs_off() -> None:
    """A refused record is re-sent without its value, then (refused again) bare; refused even
    bare, nothing the filter can change will be taken: it was re-sent at once for ever, a hot
    loop re-producing the batch's other outputs each time. Now that is a retriable failure with
    backoff (and, with --produce-retries, an exit)."""
    from depois_stream.filter.clients.base import ProduceError
    from depois_stream.filter.pipeline import BARE_AFTER

    class Refusing:
        def send(self, topic, partition, key, value, headers, on_done) -> None:
            on_done(ProduceError("MSG_SIZE_TOO_LARGE", False, rejected=True) if value == b"x0"
                    else None)

        def poll(self, timeout_s: float) -> None: ...

        def close(self, timeout_s: float) -> None: ...

    class Consumer:
        def commit(self, offsets, asynchronous) -> None: ...

    source = _Source()
    delivery = Delivery(Refusing, Consumer(), source, Metrics(), ("c", "q", "d"),
                        on_delivered=lambda r: None, clock=lambda: 0.0)
    batch, routed = _batch_and_routed(3)
    routed.values[0] = b"x0"
    seen = []
    for _ in range(BARE_AFTER + 1):
        delivery.submit(batch, routed)
        seen.append((delivery.rejected[(0, 100)].times, delivery.backing_off))
    assert seen == [(1, False), (BARE_AFTER, False), (BARE_AFTER + 1, True)]
    assert len(source.rewinds) == BARE_AFTER + 1


def test_a_refused_output_in_a_transaction_is_dead_lettered_at_once_not_backed_off() -> None:
    """Exactly-once: the abort that follows a refused output purges the batch's other outputs,
    whose reports come back as non-retriable errors. Read as failures, they turned one refused
    record into a backoff (and, with --produce-retries 0, an exit) instead of a dead letter on
    the immediate retry."""
    from depois_stream.filter.clients.base import ProduceError

    pending: list = []

    class TxnProducer(_TxnProducer):
        def send(self, topic, partition, key, value, headers, on_done) -> None:
            if value == b"big":
                raise ProduceError("MSG_SIZE_TOO_LARGE", False, rejected=True)
            pending.append(on_done)  # queued, not yet acknowledged

        def send_offsets_to_transaction(self, offsets, group_metadata, timeout_s: float) -> None:
            raise AssertionError("offsets sent with a refused output")

        def abort_transaction(self, timeout_s: float) -> None:
            for on_done in pending:
                on_done(ProduceError("purged by the abort", False))
            pending.clear()

    metrics = Metrics()
    source = _Source()
    delivery = Delivery(TxnProducer, _TxnConsumer(), source, metrics, ("c", "q", "d"),
                        on_delivered=lambda r: None, exactly_once=True, retries=0, clock=lambda: 0.0)
    batch, routed = _batch_and_routed(4)
    routed.values[2] = b"big"
    delivery.submit(batch, routed)  # retries=0 would raise DeliveryError on a backoff
    assert not delivery.backing_off
    assert delivery.rejected[(0, 102)].times == 1 and source.rewinds == [{("in", 0): 100}]
    assert metrics.registry.get_sample_value(
        "depois_delivery_failures_total", {"kind": "retriable"}) == 0


def test_a_fatal_error_raised_by_poll_resends_the_batch_on_a_new_producer() -> None:
    """SRE walkthrough (stop 43): after a broker restart librdkafka raised
    OUT_OF_ORDER_SEQUENCE_NUMBER (fatal) from Producer.poll, not in a delivery report; it left
    the filter as an unexpected exception (exit 3, "a bug"). It is the producer's failure: the
    batch is sent again, on a new producer, and nothing is committed past it meanwhile."""
    from depois_stream.filter.clients.base import ProduceError

    made: list = []

    class Producer:
        def __init__(self) -> None:
            self.fail_next_poll = not made  # only the first producer fails
            self.sent: list = []
            self.closed = False
            made.append(self)

        def send(self, topic, partition, key, value, headers, on_done) -> None:
            self.sent.append(on_done)

        def poll(self, timeout_s: float) -> None:
            if self.fail_next_poll:
                self.fail_next_poll = False
                raise ProduceError("poll: OUT_OF_ORDER_SEQUENCE_NUMBER", retriable=False)
            while self.sent:
                self.sent.pop(0)(None)

        def close(self, timeout_s: float) -> None:
            self.closed = True

    class Consumer:
        def __init__(self) -> None:
            self.commits: list = []

        def commit(self, offsets, asynchronous) -> None:
            self.commits.append(dict(offsets))

    now = [0.0]
    source, consumer = _Source(), Consumer()
    delivery = Delivery(Producer, consumer, source, Metrics(), ("c", "q", "d"),
                        on_delivered=lambda r: None, clock=lambda: now[0])
    batch, routed = _batch_and_routed(3)
    delivery.submit(batch, routed)  # its poll fails: the batch is abandoned and rewound
    assert source.rewinds == [{("in", 0): 100}] and not consumer.commits
    now[0] += 60.0  # past the backoff
    delivery.service(0.0)  # nothing in flight: the failed producer is replaced
    assert len(made) == 2 and made[0].closed and delivery.producer is made[1]
    delivery.submit(batch, routed)  # what the source reads again after the rewind
    assert consumer.commits == [{("in", 0): 103}]


def test_librdkafkas_fatal_error_from_poll_and_flush_is_a_fatal_produce_error() -> None:
    pytest.importorskip("confluent_kafka")
    from confluent_kafka import KafkaError, KafkaException

    from depois_stream.filter.clients.base import ProduceError
    from depois_stream.filter.clients.confluent import ConfluentProducer

    class Raising:
        def poll(self, timeout_s: float) -> None:
            raise KafkaException(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence desync", fatal=True))

        flush = poll

    producer = ConfluentProducer.__new__(ConfluentProducer)
    producer._p = Raising()
    for call in (producer.poll, producer.flush):
        with pytest.raises(ProduceError) as info:
            call(0.0)
        assert info.value.fatal and "OUT_OF_ORDER_SEQUENCE_NUMBER" in str(info.value)


def test_confluent_producer_asks_the_broker_not_to_create_topics(monkeypatch) -> None:
    """Review (stop 43): librdkafka's producer defaults allow.auto.create.topics to true, so an
    output topic deleted under a running filter would be re-created with broker defaults."""
    pytest.importorskip("confluent_kafka")
    from depois_stream.filter.clients import confluent
    from depois_stream.filter.clients.base import ClientSettings

    seen: dict = {}

    class Recording:
        def __init__(self, conf: dict) -> None:
            seen.update(conf)

    monkeypatch.setattr(confluent, "Producer", Recording)
    confluent.ConfluentProducer(ClientSettings(bootstrap_servers="127.0.0.1:1", client_id="c"))
    assert seen["allow.auto.create.topics"] is False


def test_a_fatal_error_raised_while_a_full_queue_drains_is_a_fatal_produce_error() -> None:
    """Re-read (stop 43): send's wait for a full local queue called librdkafka's poll directly, so
    the fatal error the previous test pins for poll escaped there as a bare KafkaException."""
    pytest.importorskip("confluent_kafka")
    from confluent_kafka import KafkaError, KafkaException

    from depois_stream.filter.clients.base import ProduceError
    from depois_stream.filter.clients.confluent import ConfluentProducer

    class FullAndBroken:
        def produce(self, *args, **kwargs) -> None:
            raise BufferError("queue full")

        def poll(self, timeout_s: float) -> None:
            raise KafkaException(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence desync", fatal=True))

    producer = ConfluentProducer.__new__(ConfluentProducer)
    producer._p = FullAndBroken()
    with pytest.raises(ProduceError) as info:
        producer.send("t", 0, None, b"v", [], lambda error: None)
    assert info.value.fatal


def test_an_ownership_that_ended_commits_nothing_for_its_partition() -> None:
    """At-least-once: an acknowledgement recorded before a revocation belongs to an ownership
    that ended. Kept, it was committed with the next batch of another partition once the
    revoked partition came back, moving the group's commit for it backwards (behind what the
    other member had committed meanwhile): everything between was filtered again after the next
    rebalance or crash."""
    held: list = []

    class Producer(_TxnProducer):
        def send(self, topic, partition, key, value, headers, on_done) -> None:
            held.append(on_done)

    class Consumer:
        commits: list[dict] = []

        def commit(self, offsets, asynchronous: bool) -> None:
            self.commits.append(dict(offsets))

    class Source(_Source):
        assigned = frozenset({("in", 0), ("in", 1)})

    def on(partition: int, first: int):
        batch, routed = _batch_and_routed(4, first)
        batch.partitions[:] = partition
        return batch, routed

    def acknowledge() -> None:
        for done in held:
            done(None)
        held.clear()
        delivery.service(0.0)

    consumer = Consumer()
    delivery = Delivery(Producer, consumer, Source(), Metrics(), ("c", "q", "d"),
                        on_delivered=lambda r: None)
    delivery.submit(*on(0, 100))
    delivery.submit(*on(1, 3))
    for done in held[:4]:  # partition 0's batch acknowledged, partition 1's not yet
        done(None)
    del held[:4]
    delivery.service(0.0)
    assert consumer.commits[-1] == {("in", 0): 104}
    consumer.commits.clear()
    delivery.revoked({("in", 0)})  # ... and it comes back (another member committed 900)
    acknowledge()
    assert consumer.commits == [{("in", 1): 7}]


def test_a_kafka_python_producer_is_made_or_given_up_on_within_ten_seconds(monkeypatch) -> None:
    """kafka-python's producer waits up to 30 s for a first broker while it is made. The filter
    makes a new one during an outage (after a fatal error or three failed attempts): a SIGTERM
    that landed in that wait took 30 s to exit, past the documented 20 s and at docker
    compose's 30 s grace period. The wait is now the shorter of 10 s and the delivery
    timeout; a failed renewal is tried again later."""
    import depois_stream.filter.clients.kafka_python as kp
    from depois_stream.filter.clients.base import ClientSettings

    seen: dict = {}

    class Producer:
        DEFAULT_CONFIG = kp.KafkaProducer.DEFAULT_CONFIG

        def __init__(self, **kwargs) -> None:
            seen.update(kwargs)

    monkeypatch.setattr(kp, "KafkaProducer", Producer)
    for delivery_ms, bound in ((120_000, 10_000), (4_000, 4_000)):
        kp.KafkaPythonProducer(ClientSettings(bootstrap_servers="127.0.0.1:1", client_id="t",
                                              delivery_timeout_ms=delivery_ms))
        assert seen["bootstrap_timeout_ms"] == bound
    kp.KafkaPythonProducer(ClientSettings(bootstrap_servers="127.0.0.1:1", client_id="t",
                                          options={"bootstrap_timeout_ms": 30_000}))
    assert seen["bootstrap_timeout_ms"] == 30_000  # DEPOIS_KAFKA still decides


def _retrying(exactly_once: bool = False, committed_at: int | None = None,
              broker_up: bool = True):
    """A Delivery with --produce-retries 3, a fake clock, a producer whose sends are held (or, for
    exactly-once, whose commit_transaction fails without saying whether it committed), a
    source whose assignment a test changes and a broker probe that says ``broker_up``."""
    held: list = []
    now = [0.0]

    class Producer(_TxnProducer):
        def send(self, topic, partition, key, value, headers, on_done) -> None:
            if exactly_once:
                on_done(None)
            else:
                held.append(on_done)

        def commit_transaction(self, timeout_s: float) -> None:
            raise ClientError("commit_transaction: timed out", True)

    class Consumer(_TxnConsumer):
        def commit(self, offsets, asynchronous: bool) -> None: ...

        def committed(self, tps, timeout_s: float) -> dict:
            return {tp: committed_at for tp in tps}

    class Source(_Source):
        paused = False

    source = Source()
    delivery = Delivery(Producer, Consumer(), source, Metrics(), ("c", "q", "d"),
                        on_delivered=lambda r: None, retries=3, exactly_once=exactly_once,
                        clock=lambda: now[0], broker_up=lambda: broker_up)
    return delivery, source, held, now


def _idle(delivery, now, seconds: int) -> None:
    for _ in range(seconds):
        now[0] += 1.0
        delivery.service(0.0)


def test_a_retry_owed_for_a_partition_that_moved_away_never_ends_the_run() -> None:
    """Review of the --produce-retries fix: a batch in flight when its partition went to
    another member failed afterwards; its partition was owed a retry this member can never
    make, and every delivery timeout counted one more failure until exit 1."""
    delivery, source, held, now = _retrying()
    delivery.submit(*_batch_and_routed(4))
    source.assigned = frozenset()
    delivery.revoked({("in", 0)})
    for done in held:
        done(ProduceError("timed out", retriable=True))
    held.clear()
    delivery.service(0.0)
    _idle(delivery, now, 400)  # no DeliveryError


def test_a_transaction_that_did_commit_is_owed_no_retry() -> None:
    """Review of the --produce-retries fix: commit_transaction failed without saying whether
    it committed; the group's commit showed it had, the filter resumed past it, and yet every
    delivery timeout of an idle stream counted one more failure until exit 1 ("4 output
    records were not acknowledged")."""
    delivery, source, _, now = _retrying(exactly_once=True, committed_at=104)
    delivery.submit(*_batch_and_routed(4))
    _idle(delivery, now, 400)  # no DeliveryError
    assert source.rewinds[-1] == {("in", 0): 104}


def test_a_retry_that_cannot_start_while_the_broker_is_unreachable_counts() -> None:
    """The property the fix is for, without a broker: the failed batch is never read back, and
    the third retry that cannot start ends the run, though the partition was lost meanwhile (a
    session timeout during the outage took it before the probe noticed: a real-broker run)."""
    delivery, source, held, now = _retrying(broker_up=False)
    delivery.submit(*_batch_and_routed(4))
    for done in held:
        done(ProduceError("timed out", retriable=True))
    held.clear()
    delivery.service(0.0)
    source.assigned = frozenset()
    delivery.revoked({("in", 0)})
    with pytest.raises(DeliveryError, match="not acknowledged after 3 retries"):
        _idle(delivery, now, 400)


def test_a_log_restart_forgets_what_was_remembered_by_offset_in_the_old_log() -> None:
    """The broker lost a partition's log and the source restarted it in the new one. A refusal
    remembered for offset 5 of the old log dead-lettered the new log's record at offset 5 as
    refused, without sending it; an acknowledgement of the old log committed its offset into the
    new one (a diff review, stop 46). The other partition's memory stays."""
    from depois_stream.filter.pipeline import Refusal

    delivery = Delivery(_Producer, None, None, Metrics(), ("c", "q", "d"), on_delivered=lambda r: None)
    delivery.rejected[(0, 5)] = Refusal("too large")
    delivery.rejected[(1, 5)] = Refusal("too large")
    delivery._acked.update({("in", 0): 712, ("in", 1): 40})
    delivery.log_restarted({("in", 0)})
    assert list(delivery.rejected) == [(1, 5)] and delivery._acked == {("in", 1): 40}


def test_a_batch_whose_delivery_reports_never_come_is_sent_again_on_a_new_producer() -> None:
    """Outage drill (stop 47): after a 45 s broker freeze, a kafka-python producer's resent
    batch was neither acknowledged nor timed out for the 3 minutes until SIGTERM (its close then
    timed out too): nothing was consumed, committed or counted, and /readyz stayed green. The
    client's delivery timeout bounds its reports; one that still never comes means the handle
    is wedged: the batch is retried from its first record on a new producer."""
    delivery, source, held, now = _retrying()
    first = delivery.producer
    delivery.submit(*_batch_and_routed(4))
    _idle(delivery, now, 59)
    assert delivery.in_flight == 1 and not source.rewinds  # within twice the delivery timeout
    _idle(delivery, now, 2)
    assert delivery.in_flight == 0 and source.rewinds == [{("in", 0): 100}]
    assert delivery._metrics.produce_retries._value.get() == 1
    _idle(delivery, now, 2)  # the back-off over: the new producer is made
    assert delivery.producer is not first
