"""The stream filter: message -> decode -> score -> route -> produce -> commit, one batch at a time.

Read ``StreamFilter._process`` top to bottom for the whole data path. The delivery rule is the
one thing never to break: a batch's offsets are committed only after every record of it was
acknowledged by the broker (``acks=all``, idempotent producer), so a crash at any point re-delivers
the batch (at-least-once) and never skips it. With ``exactly_once`` the outputs and the offsets go
in one transaction instead.

Kafka only rebalances inside ``poll()``, and a batch is finished (produced and committed) before
the consumer polls for the next one, so revocation never interrupts a scored batch. Records still
*lingering* in the batch buffer when their partition is revoked were never produced or committed:
they are dropped from the buffer and the partition's new owner reads them again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from depois_stream.contract import headers as H
from depois_stream.filter import router
from depois_stream.filter.breaker import BreakerSettings, CircuitBreaker
from depois_stream.filter.config import ConsumerConfig
from depois_stream.filter.http import HealthServer
from depois_stream.filter.kafka_options import options_for
from depois_stream.filter.metrics import Metrics, observe_many
from depois_stream.filter.reload import ModelWatcher
from depois_stream.contract.wire import decode_batch
from depois_stream.filter.detector import Scorer, ScoreResult

log = logging.getLogger(__name__)

RESUME_FLAG = "resume"  # `touch <control_dir>/resume` closes an open circuit breaker
_HEADER_ROOM = 64 * 1024  # produce-request bytes kept free for headers and batch framing


class DeliveryError(RuntimeError):
    """Outputs could not be produced after all retries; nothing of their batch was committed."""


class StartupError(RuntimeError):
    """Kafka or the metrics port is unusable at start-up; the message says what to check."""


@dataclass
class RunStats:
    """What one ``run`` routed (held-back breaker batches are not counted)."""

    consumed: int = 0
    clean: int = 0
    quarantined: int = 0
    dead_lettered: int = 0
    batches: int = 0
    breaker_trips: int = 0


class _Rebalance(ConsumerRebalanceListener):
    """Notes revocations for the main thread (the callback runs on kafka-python's IO thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._revoked: set[TopicPartition] = set()
        self.assigned: frozenset[TopicPartition] = frozenset()

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = set(revoked)
        with self._lock:
            self._revoked |= revoked
        self.assigned = self.assigned - revoked
        self._metrics.partitions_assigned.set(len(self.assigned))
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.assigned = frozenset(assigned)
        self._metrics.partitions_assigned.set(len(self.assigned))
        log.info("partitions assigned: %s", sorted(tp.partition for tp in self.assigned))

    def take_revoked(self) -> set[TopicPartition]:
        with self._lock:
            revoked, self._revoked = self._revoked, set()
        return revoked


class StreamFilter:
    """One consumer-group member: scale out by starting more of them with the same group id."""

    def __init__(self, cfg: ConsumerConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        # Load (and verify) the model before touching Kafka: a bad model must refuse to start.
        self.scorer = self._load_model(cfg.model_path)
        self._publish_model(self.scorer)
        self.breaker = CircuitBreaker(BreakerSettings(
            window=cfg.breaker_window, max_rate=cfg.breaker_max_rate,
            min_samples=cfg.breaker_min_samples, cooldown_s=cfg.breaker_cooldown_s))
        self.stats = RunStats()
        self.http_address: tuple[str, int] | None = None
        self._rebalance = _Rebalance(self.metrics)
        self._broker_ok_at = 0.0
        self._next_lag_check = 0.0
        # A record the producer cannot forward would fail its batch forever (a poison pill), so
        # anything above this goes to the DLQ as too_large, without its payload.
        max_request = cfg.kafka.get("max_request_size",
                                    KafkaProducer.DEFAULT_CONFIG["max_request_size"])
        self._max_value_bytes = int(max_request) - _HEADER_ROOM

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """Ingest partitions this member currently owns (empty while joining or after stop)."""
        return self._rebalance.assigned

    # ------------------------------------------------------------------ lifecycle

    def run(self, stop: threading.Event | None = None) -> RunStats:
        """Consume until ``stop`` is set (or the stream idles, with ``exit_when_idle_s``)."""
        stop = stop or threading.Event()
        with self._clients() as (consumer, producer):
            watcher = ModelWatcher(self.scorer, self._load_model, self.cfg.reload_interval_s,
                                   on_outcome=lambda o: self.metrics.model_reloads.labels(o).inc())
            idle_since = time.monotonic()
            while not stop.is_set():
                if (new := watcher.poll()) is not None:
                    self.scorer = new
                    self._publish_model(new)
                self._maybe_close_breaker(consumer)
                records = self._collect(consumer, stop)
                if records:
                    self._process(records, consumer, producer)
                    idle_since = time.monotonic()
                elif not self._rebalance.assigned:
                    idle_since = time.monotonic()  # still joining: not idle yet
                self._maybe_update_lag(consumer)
                if (self.cfg.exit_when_idle_s is not None
                        and time.monotonic() - idle_since >= self.cfg.exit_when_idle_s):
                    log.info("no records for %.1f s: exiting", self.cfg.exit_when_idle_s)
                    break
        return self.stats

    @contextmanager
    def _clients(self) -> Iterator[tuple[KafkaConsumer, KafkaProducer]]:
        """The HTTP endpoint and both Kafka clients, all closed on the way out, whatever happens."""
        with ExitStack() as stack:
            server = self._start_http()
            if server is not None:
                stack.callback(server.close)
            consumer, producer = self._connect()
            stack.callback(self.metrics.partitions_assigned.set, 0)
            stack.callback(consumer.close, autocommit=False)
            stack.callback(producer.close, timeout=10)
            yield consumer, producer

    def _connect(self) -> tuple[KafkaConsumer, KafkaProducer]:
        try:
            consumer = self._make_consumer()
        except KafkaError as exc:
            raise self._unreachable(exc) from exc
        try:
            return consumer, self._make_producer()
        except KafkaError as exc:
            consumer.close(autocommit=False)
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: KafkaError) -> StartupError:
        return StartupError(
            f"cannot use Kafka at {self.cfg.bootstrap_servers} ({exc}): check --bootstrap-servers, "
            "that the broker is up and the --kafka security options; for a local broker run "
            "`depois-stream broker`")

    def _make_consumer(self) -> KafkaConsumer:
        cfg = self.cfg
        consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, group_id=cfg.group_id,
            client_id=f"depois-stream-{cfg.group_id}", enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset, max_poll_records=cfg.batch_size,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            isolation_level="read_committed" if cfg.exactly_once else "read_uncommitted",
            **options_for(KafkaConsumer, cfg.kafka))
        consumer.subscribe([cfg.ingest_topic], listener=self._rebalance)
        return consumer

    def _make_producer(self) -> KafkaProducer:
        cfg = self.cfg
        options: dict[str, Any] = dict(
            bootstrap_servers=cfg.bootstrap_servers, client_id=f"depois-stream-{cfg.group_id}",
            acks="all", enable_idempotence=True, linger_ms=1000, batch_size=1024 * 1024,
            **options_for(KafkaProducer, cfg.kafka))
        if cfg.exactly_once:
            options["transactional_id"] = cfg.effective_transactional_id()
        producer = KafkaProducer(**options)
        if cfg.exactly_once:
            producer.init_transactions()
        return producer

    def _start_http(self) -> HealthServer | None:
        if self.cfg.metrics_port is None:
            return None
        try:
            server = HealthServer(self.metrics.registry, self._readiness,
                                  self.cfg.metrics_host, self.cfg.metrics_port).start()
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {self.cfg.metrics_host}:{self.cfg.metrics_port} "
                f"({exc.strerror}): pick another --metrics-port (0 = any free port)") from exc
        self.http_address = server.address
        log.info("metrics and probes on http://%s:%d/metrics", *server.address)
        return server

    def _readiness(self) -> dict[str, bool]:
        reachable_for = max(30.0, 3 * self.cfg.lag_interval_s)
        return {
            "model_loaded": self.scorer is not None,
            "broker_reachable": time.monotonic() - self._broker_ok_at < reachable_for,
            "partitions_assigned": bool(self._rebalance.assigned),
        }

    # ------------------------------------------------------------------ the data path

    def _collect(self, consumer: KafkaConsumer, stop: threading.Event) -> list[ConsumerRecord]:
        """Poll until ``batch_size`` records or ``linger_ms`` after the first one arrived."""
        batch: list[ConsumerRecord] = []
        deadline: float | None = None
        while len(batch) < self.cfg.batch_size:
            wait_ms = 200 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            polled = consumer.poll(timeout_ms=wait_ms, max_records=self.cfg.batch_size - len(batch))
            revoked = self._rebalance.take_revoked()
            if revoked:  # never produced nor committed: the new owner reads them again
                batch = [r for r in batch if TopicPartition(r.topic, r.partition) not in revoked]
            if self.breaker.is_open and polled:
                self._hand_back(consumer, [r for rs in polled.values() for r in rs])
                self._pause(consumer)
                polled = {}
            for records in polled.values():
                batch.extend(records)
            if deadline is None:
                if not batch:
                    return batch
                deadline = time.monotonic() + self.cfg.linger_ms / 1000
            if time.monotonic() >= deadline or stop.is_set():
                break
        return batch

    def _process(self, records: list[ConsumerRecord], consumer: KafkaConsumer,
                 producer: KafkaProducer) -> None:
        scorer, m = self.scorer, self.metrics
        meta = scorer.metadata
        n = len(records)
        m.batch_size.observe(n)

        # 1. decode: never raises; failures become dead letters
        decoded = decode_batch([r.value for r in records],
                               [_content_type(r.headers) for r in records],
                               input_shape=meta.input_shape, num_classes=meta.num_classes,
                               max_bytes=self._max_value_bytes)
        # 2. score the decodable samples in one onnxruntime run
        t0 = time.perf_counter()
        result = scorer.score(decoded.images, decoded.labels)
        m.inference_duration.labels(scorer.provider).observe(time.perf_counter() - t0)
        n_quarantined = int(result.poisoned.sum())

        # 3. circuit breaker: a batch that trips it is handed back, not quarantined
        if self.breaker.observe(len(decoded.labels), n_quarantined, time.monotonic()):
            self._trip(consumer, records)
            return
        m.poison_rate.set(self.breaker.rate)

        # 4. route: destinations and headers for the whole batch
        plan = router.plan(
            router.Verdicts(n=n, index=decoded.index, labels=decoded.labels, score=result.score,
                            poisoned=result.poisoned, threshold=result.threshold,
                            p_value=result.p_value,
                            failures=[(f.index, f.reason, f.message) for f in decoded.failures]),
            router.Provenance(
                topics=[r.topic for r in records],
                partitions=np.fromiter((r.partition for r in records), np.int64, n),
                offsets=np.fromiter((r.offset for r in records), np.int64, n),
                timestamps_ms=np.fromiter((r.timestamp for r in records), np.int64, n)),
            meta.model_version, scorer.sha256)

        # 5. produce every record, then 6. commit the batch's offsets (or both in one transaction)
        offsets = _next_offsets(records)
        if self.cfg.exactly_once:
            self._deliver_transaction(producer, consumer, records, plan, offsets)
        else:
            self._deliver(producer, records, plan)
            self._commit(consumer, offsets)
        self._account(records, decoded.failures, decoded.labels, result, plan)

    def _send_all(self, producer: KafkaProducer, records: list[ConsumerRecord],
                  plan: router.RoutePlan, which: Iterable[int]) -> list[tuple[int, Any]]:
        """Send records ``which`` of the batch; each output keeps its source partition (modulo
        the output topic's count), which preserves per-key order and skips per-record hashing."""
        topics = (self.cfg.clean_topic, self.cfg.quarantine_topic, self.cfg.dlq_topic)
        n_parts = [len(producer.partitions_for(t)) for t in topics]
        dest = plan.destination.tolist()
        futures = []
        for i in which:
            r, d = records[i], dest[i]
            value = r.value
            if (value is None and r.key is None) or (value is not None
                                                     and len(value) > self._max_value_bytes):
                value = b""  # a keyless tombstone cannot be sent; an oversize value cannot either
            futures.append((i, producer.send(topics[d], value=value, key=r.key,
                                             headers=list(r.headers or ()) + plan.headers[i],
                                             partition=r.partition % n_parts[d])))
        return futures

    def _deliver(self, producer: KafkaProducer, records: list[ConsumerRecord],
                 plan: router.RoutePlan) -> None:
        """Produce the batch and wait for every ack; retry the failed records with backoff."""
        pending: list[int] = list(range(len(records)))
        for attempt in range(self.cfg.produce_retries + 1):
            futures = self._send_all(producer, records, plan, pending)
            producer.flush()
            failed = [(i, f.exception) for i, f in futures if f.failed()]
            if not failed:
                return
            pending = [i for i, _ in failed]
            self.metrics.produce_retries.inc()
            log.warning("%d of %d records not acknowledged (%s); retry %d", len(failed),
                        len(records), failed[0][1], attempt + 1)
            time.sleep(min(5.0, 0.1 * 2 ** attempt))
        raise DeliveryError(f"{len(pending)} records could not be produced after "
                            f"{self.cfg.produce_retries} retries; their batch was not committed")

    def _deliver_transaction(self, producer: KafkaProducer, consumer: KafkaConsumer,
                             records: list[ConsumerRecord], plan: router.RoutePlan,
                             offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Outputs and input offsets in one transaction; a failed one is aborted and redone."""
        for attempt in range(self.cfg.produce_retries + 1):
            producer.begin_transaction()
            try:
                self._send_all(producer, records, plan, range(len(records)))
                producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
                producer.commit_transaction()
            except KafkaError as exc:
                producer.abort_transaction()
                self.metrics.commit_failures.inc()
                log.warning("transaction aborted (%s); retry %d", exc, attempt + 1)
                time.sleep(min(5.0, 0.1 * 2 ** attempt))
                continue
            self._committed(offsets)
            return
        raise DeliveryError(f"transaction failed {self.cfg.produce_retries + 1} times; "
                            "its batch was not committed")

    def _commit(self, consumer: KafkaConsumer,
                offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        try:
            consumer.commit(offsets)
        except KafkaError as exc:
            # Typically a rebalance took the partitions: the new owner re-reads this batch.
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); the batch will be delivered again", exc)
            return
        self._committed(offsets)

    def _committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.metrics.commits.inc()
        self.metrics.last_batch_timestamp.set_to_current_time()
        self._broker_ok_at = time.monotonic()

    def _account(self, records: list[ConsumerRecord], failures: list[Any], labels: np.ndarray,
                 result: ScoreResult, plan: router.RoutePlan) -> None:
        m, counts = self.metrics, plan.counts()
        m.records_consumed.labels(self.cfg.ingest_topic).inc(len(records))
        now_ms = time.time() * 1000
        observe_many(m.end_to_end_latency,
                     (now_ms - np.fromiter((r.timestamp for r in records), np.float64,
                                           len(records))) / 1000)
        observe_many(m.score, result.score)
        for name, count in counts.items():
            m.records_routed.labels(name).inc(count)
        for reason, count in Counter(f.reason for f in failures).items():
            m.dead_lettered.labels(reason).inc(count)
        per_label = np.bincount(labels[result.poisoned], minlength=self.scorer.metadata.num_classes)
        for label in np.flatnonzero(per_label).tolist():
            m.quarantined_by_label.labels(str(label)).inc(int(per_label[label]))
        self.stats.consumed += len(records)
        self.stats.clean += counts["clean"]
        self.stats.quarantined += counts["quarantine"]
        self.stats.dead_lettered += counts["dlq"]
        self.stats.batches += 1

    # ------------------------------------------------------------------ breaker, lag, model

    def _trip(self, consumer: KafkaConsumer, records: list[ConsumerRecord]) -> None:
        self._hand_back(consumer, records)
        self._pause(consumer)
        self.stats.breaker_trips += 1
        self.metrics.circuit_trips.inc()
        self.metrics.circuit_open.set(1)
        self.metrics.poison_rate.set(self.breaker.rate)
        log.error(
            "circuit breaker OPEN: %.0f%% of the last %d scored samples would be quarantined "
            "(limit %.0f%%); consumption paused, the batch was not routed. Check the model, then "
            "resume with `touch %s` or wait %.0f s", 100 * self.breaker.rate,
            self.cfg.breaker_window, 100 * self.cfg.breaker_max_rate,
            Path(self.cfg.control_dir or "<control_dir>") / RESUME_FLAG,
            self.cfg.breaker_cooldown_s)

    def _maybe_close_breaker(self, consumer: KafkaConsumer) -> None:
        if not self.breaker.is_open:
            return
        flag = Path(self.cfg.control_dir) / RESUME_FLAG if self.cfg.control_dir else None
        operator = flag is not None and flag.exists()
        if not self.breaker.should_close(time.monotonic(), operator_resume=operator):
            return
        if flag is not None:
            flag.unlink(missing_ok=True)
        self.breaker.close()
        consumer.resume(*consumer.paused())
        self.metrics.circuit_open.set(0)
        log.warning("circuit breaker closed (%s); consumption resumed",
                    "operator" if operator else "cooldown elapsed")

    @staticmethod
    def _hand_back(consumer: KafkaConsumer, records: list[ConsumerRecord]) -> None:
        """Rewind each partition to the first record of the batch so it is consumed again."""
        first: dict[TopicPartition, int] = {}
        for r in records:
            first.setdefault(TopicPartition(r.topic, r.partition), r.offset)
        for tp, offset in first.items():
            consumer.seek(tp, offset)

    @staticmethod
    def _pause(consumer: KafkaConsumer) -> None:
        consumer.pause(*consumer.assignment())

    def _maybe_update_lag(self, consumer: KafkaConsumer) -> None:
        now = time.monotonic()
        assigned = consumer.assignment()
        if now < self._next_lag_check or not assigned:
            return
        self._next_lag_check = now + self.cfg.lag_interval_s
        try:
            ends = consumer.end_offsets(list(assigned), timeout_ms=2000)  # also the broker probe
            # Fetch responses carry the high watermark too; Tansu's ListOffsets answer lags
            # behind it, so take whichever is further.
            lags = {tp: max(0, max(end, consumer.highwater(tp) or 0)
                            - consumer.position(tp, timeout_ms=2000))
                    for tp, end in ends.items()}
        except KafkaError as exc:
            log.warning("could not read end offsets for the lag metric: %s", exc)
            return
        self.metrics.consumer_lag.clear()  # drops partitions this member no longer owns
        for tp, lag in lags.items():
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
        self._broker_ok_at = now

    def _load_model(self, path: Path) -> Scorer:
        return Scorer.load(path, device=self.cfg.device, require_gpu=self.cfg.require_gpu,
                           verify_card=self.cfg.verify_card)

    def _publish_model(self, scorer: Scorer) -> None:
        meta, m = scorer.metadata, self.metrics
        m.model_info.info({
            "version": meta.model_version, "sha256": scorer.sha256, "provider": scorer.provider,
            "score_kind": meta.score_kind, "dataset": meta.dataset,
        })
        m.provider_fallback.set(1 if scorer.provider_fallback else 0)
        m.detection_boundary.set(meta.boundary.global_)
        # Export zeros for every series a dashboard or alert divides by, so that rate() and the
        # per-class panels have a baseline before the first record of each kind arrives.
        m.records_consumed.labels(topic=self.cfg.ingest_topic)
        m.inference_duration.labels(provider=scorer.provider)
        for label in range(meta.num_classes):
            m.quarantined_by_label.labels(label=str(label))


def _content_type(headers: list[tuple[str, bytes]] | None) -> bytes | None:
    for key, value in headers or ():
        if key == H.CONTENT_TYPE:
            return value
    return None


def _next_offsets(records: list[ConsumerRecord]) -> dict[TopicPartition, OffsetAndMetadata]:
    """Offset to commit per partition: one past the last record of the batch."""
    last: dict[TopicPartition, int] = {}
    for r in records:
        last[TopicPartition(r.topic, r.partition)] = r.offset
    return {tp: OffsetAndMetadata(off + 1, "", -1) for tp, off in last.items()}
