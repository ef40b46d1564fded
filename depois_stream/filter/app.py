"""The stream filter: one consumer-group member, message -> decode -> score -> route -> produce
-> commit.

Read ``StreamFilter.run``: each pass of the loop takes the next batch from the ``Source``
(poll, linger, rebalances), runs the data path (``pipeline.score`` -> circuit breaker ->
``pipeline.route``) and hands the outputs to ``Delivery`` (produce, settle in order, commit,
retry). The guarantees live in those two classes and are stated in docs/consumer.md: every
record lands in exactly one output topic at least once, offsets never run ahead of an
acknowledgement, no wait is unbounded.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depois_stream import __version__
from depois_stream.filter import pipeline
from depois_stream.filter.breaker import BreakerSettings, CircuitBreaker
from depois_stream.filter.clients import make_client
from depois_stream.filter.clients.base import (
    SHUTDOWN_STEP_S, ClientError, ClientSettings, Consumer, MissingTopic, Probe, Producer, RecordBatch,
    abandoned_calls,
)
from depois_stream.filter.config import ConsumerConfig
from depois_stream.filter.delivery import Delivery, DeliveryError, commit_answered
from depois_stream.filter.detector import Detector, ModelLoadError
from depois_stream.filter.freeze import FreezeWatch
from depois_stream.filter.http import HealthServer
from depois_stream.filter.metrics import Metrics
from depois_stream.filter.reload import ModelWatcher
from depois_stream.filter.source import Source

log = logging.getLogger(__name__)

RESUME_FLAG = "resume"  # `touch <control_dir>/resume` closes an open circuit breaker
SHUTDOWN_DRAIN_S = 10.0  # SIGTERM: wait at most this for outputs in flight
ASSIGNED_LAG_DELAY_S = 1.0  # after an assignment: when to read the new partitions' lag
# Liveness fails once more client calls than this were abandoned inside the library and are
# still stuck there (each may hold a producer handle; a restart frees them). Against a broker
# that never answers, an exactly-once member abandons about one a minute, so this is a quarter
# of an hour of such an outage; a healthy broker abandons none.
MAX_ABANDONED_CALLS = 16

__all__ = ["DeliveryError", "RunStats", "StartupError", "StreamFilter"]


class StartupError(RuntimeError):
    """Kafka or the metrics port is unusable at start-up; the message says what to check."""


@dataclass
class RunStats:
    """What one ``run`` routed and the broker acknowledged (held-back batches not counted)."""

    consumed: int = 0
    clean: int = 0
    quarantined: int = 0
    dead_lettered: int = 0
    batches: int = 0
    breaker_trips: int = 0


GC_GEN0_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)


def _quiet_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the hot path.

    Every batch allocates a dozen header tuples per record, and CPython's collector, triggered
    every 700 allocations, re-traverses everything alive, including the hundreds of thousands of
    objects of onnxruntime, numpy and the Kafka client loaded at start-up: measured, that was
    half of the main thread's CPU per record. Those start-up objects are frozen out of every
    future collection, and young collections run less often; the filter's own data holds no
    reference cycles, so reference counting frees it as before.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gc.get_threshold()[0]), gen1, gen2)


class _BrokerProbe:
    """Asks the cluster for metadata every few seconds on its own thread and connection, so
    ``/readyz`` and ``depois_broker_up`` tell the truth even while the main loop waits."""

    def __init__(self, probe: Probe, interval_s: float, metrics: Metrics) -> None:
        self._probe, self._interval_s, self._metrics = probe, interval_s, metrics
        self._stop = threading.Event()
        self.up = False
        self.checked_at = 0.0
        self._thread = threading.Thread(target=self._loop, name="depois-probe", daemon=True)

    def check(self) -> bool:
        up = self._probe.check(timeout_s=max(1.0, min(5.0, self._interval_s)))
        if up != self.up:
            log.log(logging.INFO if up else logging.WARNING, "broker %s",
                    "reachable" if up else "NOT reachable (metadata request failed)")
        self.up, self.checked_at = up, time.monotonic()
        self._metrics.broker_up.set(1 if up else 0)
        return up

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.check()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        if not self._thread.is_alive():  # else a check against a silent broker is still in
            self._probe.close()          # flight: the daemon thread ends with the process


class StreamFilter:
    """One consumer-group member: scale out by starting more of them with the same group id."""

    def __init__(self, cfg: ConsumerConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.client = make_client(cfg.client)
        # Load (and verify) the model before touching Kafka: a bad model must refuse to start.
        self.detector = self._load_model(cfg.model_path)
        self._trusted_key_id = self.detector.signature_key_id  # see _load_model
        log.info("serving model %s version=%s sha256=%s provider=%s", cfg.model_path.name,
                 self.detector.metadata.model_version, self.detector.sha256[:12],
                 self.detector.provider)
        self._publish_model(self.detector)
        # hostname: on compose an alert names a replica by its container IP, which no docker
        # command takes; the host name is the container id there (the pod name on Kubernetes).
        self.metrics.build_info.info({"version": __version__, "client": self.client.name,
                                      "hostname": socket.gethostname()})
        self.metrics.client_calls_abandoned.set_function(abandoned_calls)
        self._tripped_by = ""  # sha256 of the model serving when the breaker last opened
        self._flag_complaint = ""  # the last resume-flag error logged (said once, not per loop)
        self.breaker = CircuitBreaker(BreakerSettings(
            window=cfg.breaker_window, max_rate=cfg.breaker_max_rate,
            min_samples=cfg.breaker_min_samples, cooldown_s=cfg.breaker_cooldown_s))
        self.stats = RunStats()
        self.http_address: tuple[str, int] | None = None
        self.max_record_bytes = self.client.max_record_bytes(cfg.kafka)
        self._check_record_limit()
        self._source: Source | None = None
        self._probe: _BrokerProbe | None = None
        self._stopping = threading.Event()  # run's stop event, once it runs
        self._check_model = threading.Event()  # set by SIGHUP: look at the model file now
        self._loop_at = time.monotonic()

    def request_model_check(self) -> None:
        """Look at the model file at the next loop turn (safe from a signal handler)."""
        self._check_model.set()

    @property
    def assignment(self) -> frozenset[tuple[str, int]]:
        """Ingest partitions this member currently owns (empty while joining or after stop)."""
        return self._source.assigned if self._source is not None else frozenset()

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event | None = None) -> RunStats:
        """Filter until ``stop`` is set (or the stream idles, with ``exit_when_idle_s``)."""
        stop = stop or threading.Event()
        self._stopping = stop  # the clients' transactional calls give up sooner once it is set
        try:
            with self._running() as (source, delivery):
                self._loop(stop, source, delivery)
        except StartupError:
            if not stop.is_set():
                raise
            # a stop asked for while starting (a rollout during an outage) is a stop, whatever
            # start-up step it interrupted
            log.info("stopped during start-up: nothing was read")
        return self.stats

    def _loop(self, stop: threading.Event, source: Source, delivery: Delivery) -> None:
        """The filter's loop: model reload, breaker, backoff, then one batch at a time."""
        _quiet_garbage_collector()
        watcher = self._model_watcher()
        idle_since = next_lag = lag_asked = time.monotonic()
        owned: frozenset = frozenset()  # the assignment the lag was last scheduled for
        rebalances = 0  # and the revocations seen then (each drops the lag series)
        while not stop.is_set():
            self._loop_at = now = time.monotonic()
            if (new := watcher.poll()) is not None:
                self.detector = new
                self._publish_model(new)
                if self.breaker.rearm():  # an acknowledgement was about the previous model
                    self.metrics.circuit_acknowledged.set(0)
                    log.warning("circuit breaker armed again: a new model is serving")
            self._maybe_close_breaker(source)
            if delivery.backing_off:  # the broker refused a batch: wait, stay in the group
                source.pause("backoff")
                source.idle(0.2)
                delivery.service(0.0)
                continue
            source.resume("backoff")
            if delivery.full:
                delivery.service(0.05)
                continue
            batch = source.next_batch(stop.is_set)
            if len(batch):
                self._filter(batch, source, delivery)
                idle_since = now
            elif (delivery.in_flight or not source.assigned or not self._probe_up()
                  or self.breaker.is_open or source.switching):
                # waiting for acknowledgements, a partition, the broker, a breaker holding a
                # batch or a replaced log's restart: not idle (an outage must not end a run
                # whose last offsets are still to be committed, nor an open breaker one whose
                # held batch is unfiltered, nor a log restart one with a stray commit left)
                idle_since = now
            del batch  # not held while the next one is gathered (MAX_HELD_BYTES)
            delivery.service(0.0)
            if source.assigned - owned or source.rebalances != rebalances:
                # new partitions, or partitions revoked and given back, have no lag series until
                # it is read: read it a second from now (a first fetch carries their end), not
                # up to --lag-interval-s later (an outside drill: 12 s without them after a
                # takeover, a sum of the lag read 0)
                next_lag = min(next_lag, now + ASSIGNED_LAG_DELAY_S)
            owned, rebalances = source.assigned, source.rebalances
            if now >= next_lag:
                next_lag, lag_asked = now + self.cfg.lag_interval_s, now
                source.update_lag()
            if (self.cfg.exit_when_idle_s is not None
                    and now - idle_since >= self.cfg.exit_when_idle_s):
                # only once the broker said, after the quiet began, that nothing is left: the
                # probe takes up to ~10 s to see a frozen broker, and an 8 s idle exit ended a
                # run in that window with the stream unread (exit 0)
                if (source.caught_up_at or float("-inf")) >= idle_since:
                    log.info("no records for %.1f s: exiting", self.cfg.exit_when_idle_s)
                    break
                if lag_asked < idle_since:
                    next_lag = now  # ask once now, then every --lag-interval-s
        if not delivery.drain(SHUTDOWN_DRAIN_S):
            log.warning("stopping with outputs unacknowledged; they were not committed and "
                        "will be filtered again")

    def _filter(self, batch: RecordBatch, source: Source, delivery: Delivery) -> None:
        """The data path of one batch: decode -> score -> breaker -> route -> produce."""
        m, det = self.metrics, self.detector
        m.batch_size.observe(len(batch))
        t0 = time.perf_counter()
        scored = pipeline.score(batch, det, self.max_record_bytes, delivery.rejected)
        m.inference_duration.labels(det.provider).observe(time.perf_counter() - t0)
        acknowledged = self.breaker.acknowledged
        if self.breaker.observe(scored.scored, scored.quarantined, time.monotonic()):
            self._trip(source, batch)  # not routed: handed back and held until resumed
            return
        if acknowledged and not self.breaker.acknowledged:
            m.circuit_acknowledged.set(0)
            log.warning("circuit breaker armed again: the quarantine rate is back under %.0f%%",
                        100 * self.cfg.breaker_max_rate)
        m.poison_rate.set(self.breaker.rate)
        routed = pipeline.route(batch, scored, det.metadata.model_version, det.sha256,
                                self._partition_counts, self.max_record_bytes)
        delivery.submit(batch, routed)

    def _delivered(self, routed: pipeline.Routed) -> None:
        """Count a batch once the broker acknowledged all of it."""
        m, s = self.metrics, self.stats
        counts = routed.counts
        for name, count in counts.items():
            m.records_routed.labels(name).inc(count)
        for reason, count in routed.dead_letter_reasons.items():
            m.dead_lettered.labels(reason).inc(count)
        for reason, count in routed.quarantine_reasons.items():
            m.quarantined_by_reason.labels(reason).inc(count)
        per_label = np.bincount(routed.quarantine_labels,
                                minlength=self.detector.metadata.num_classes)
        for label in np.flatnonzero(per_label).tolist():
            m.quarantined_by_label.labels(str(label)).inc(int(per_label[label]))
        m.score.observe_many(routed.scores)
        m.forged_headers.inc(routed.forged)
        m.end_to_end_latency.observe_many(pipeline.latency_seconds(time.time(), routed.timestamps_ms))
        s.consumed += len(routed)
        s.clean += counts["clean"]
        s.quarantined += counts["quarantine"]
        s.dead_lettered += counts["dlq"]
        s.batches += 1

    # ------------------------------------------------------------------ start-up and shutdown

    @contextmanager
    def _running(self) -> Iterator[tuple[Source, Delivery]]:
        """HTTP endpoint, broker probe and Kafka clients, all closed on the way out."""
        cfg = self.cfg
        with ExitStack() as stack:
            server = self._start_http()
            if server is not None:
                stack.callback(server.close)
            settings = self._client_settings()
            self._probe = _BrokerProbe(self.client.probe(settings), cfg.probe_interval_s,
                                       self.metrics)
            stack.callback(self._probe.close)
            self._wait_for_broker()
            self._probe.start()
            consumer = self._connect(settings)
            # a pause this long can let the session expire: the last heartbeat may have been
            # up to one interval before it
            freeze = FreezeWatch((cfg.session_timeout_ms - cfg.heartbeat_interval_ms) / 1000).start()
            stack.callback(freeze.stop)
            source = Source(consumer, cfg.ingest_topic, cfg.batch_size, cfg.linger_ms,
                            self.metrics, stall_restart_s=cfg.stall_restart_s,
                            reset_to=cfg.auto_offset_reset, frozen_for=freeze.frozen_for)
            self._source = source
            stack.callback(self._leave, consumer)
            try:
                delivery = Delivery(
                    lambda: self.client.producer(settings), consumer, source, self.metrics,
                    (cfg.clean_topic, cfg.quarantine_topic, cfg.dlq_topic),
                    on_delivered=self._delivered, max_in_flight=cfg.max_in_flight,
                    retries=cfg.produce_retries, retry_backoff_max_s=cfg.retry_backoff_max_s,
                    delivery_timeout_s=cfg.delivery_timeout_ms / 1000,
                    exactly_once=cfg.exactly_once, stopping=self._stopping,
                    broker_up=self._probe_up)
                source.quiet = lambda: (not delivery.in_flight and not delivery.backing_off
                                        and self._probe_up())
            except ClientError as exc:
                if cfg.exactly_once:
                    raise StartupError(f"cannot start transactions on {cfg.bootstrap_servers} "
                                       f"({exc}); check that the broker supports them") from None
                raise self._unreachable(exc) from None
            stack.callback(self._close_producer, delivery)
            source.on_revoked(delivery.revoked)
            source.on_log_restarted(delivery.log_restarted)
            self._partition_counts = self._output_partitions(delivery.producer)
            source.subscribe()
            yield source, delivery

    def _client_settings(self) -> ClientSettings:
        cfg = self.cfg
        return ClientSettings(
            bootstrap_servers=cfg.bootstrap_servers, client_id=f"depois-stream-{cfg.group_id}",
            group_id=cfg.group_id, auto_offset_reset=cfg.auto_offset_reset,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms, max_poll_records=cfg.batch_size,
            # Always: a record of an aborted upstream transaction was retracted by its producer and
            # must not reach training data (at-least-once read it uncommitted before stop 43)
            read_committed=True, delivery_timeout_ms=cfg.delivery_timeout_ms,
            transactional_id=cfg.effective_transactional_id() if cfg.exactly_once else None,
            options=dict(cfg.kafka), stopping=self._stopping)

    def _wait_for_broker(self) -> None:
        assert self._probe is not None
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not self._stopping.is_set() and not self._probe.check():
            # waiting is the loop turning, not a wedge: a member given a long --startup-timeout-s
            # to ride out an outage must not be killed by liveness mid-wait
            self._loop_at = time.monotonic()
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"cannot use Kafka at {self.cfg.bootstrap_servers} (no answer to a metadata "
                    f"request within --startup-timeout-s {self.cfg.startup_timeout_s:g}): check "
                    "--bootstrap-servers, that the broker is up and the --kafka security "
                    "options; for a local broker run `depois-stream broker`")
            log.info("waiting for the broker at %s", self.cfg.bootstrap_servers)
            self._stopping.wait(1.0)
        if self._stopping.is_set():
            raise StartupError("stopped while waiting for the broker")

    def _check_record_limit(self) -> None:
        """Refuse a producer size limit (``--kafka max_request_size`` / ``message.max.bytes``) that
        leaves no room for even the smallest sample of this model once the filter's framing and
        headers are reserved: every record would be dead-lettered as too large, and with
        kafka-python the dead letters themselves were refused, a stall (fuzz run, stop 43)."""
        from depois_stream.contract.wire import encode_sample
        from depois_stream.filter.config import ConfigError

        shape = tuple(self.detector.metadata.input_shape)
        smallest = len(encode_sample("id", np.zeros(shape, np.uint8), 0, encoding="binary", dtype="uint8")[0])
        room = self.max_record_bytes - pipeline.HEADER_ALLOWANCE
        if room < smallest:
            option = self.client.size_option
            reserved = pipeline.HEADER_ALLOWANCE - self.client.max_record_bytes({option: 0})  # headers + framing
            default = self.client.max_record_bytes({}) + reserved - pipeline.HEADER_ALLOWANCE
            raise ConfigError(
                f"--kafka {option}{'' if option == 'max_request_size' else ' (or max_request_size)'} leaves {room:,} bytes per record once the filter's "
                f"{reserved:,} for Kafka's framing and its own headers are reserved, less than one {list(shape)} "
                f"sample ({smallest:,} bytes): raise it to at least {reserved + smallest:,} (default {default:,})")

    def _connect(self, settings: ClientSettings) -> Consumer:
        def on_commit(error: BaseException | None) -> None:  # an asynchronous commit's answer
            commit_answered(self.metrics, error)

        try:
            return self.client.consumer(settings, on_commit)
        except ClientError as exc:
            raise self._unreachable(exc) from None

    def _output_partitions(self, producer: Producer) -> tuple[int, int, int]:
        cfg = self.cfg
        counts = []
        for topic in (cfg.clean_topic, cfg.quarantine_topic, cfg.dlq_topic):
            try:
                counts.append(producer.partition_count(topic))
            except MissingTopic as exc:
                raise StartupError(f"output topic {topic!r} is not usable ({exc}): create it "
                                   "(docs/operations.md lists the topics), fix the topic flags, "
                                   "or let the principal Describe it") from None
            except ClientError as exc:  # not an answer about the topic: connection, rights
                raise StartupError(f"cannot check output topic {topic!r} ({exc}): check "
                                   "--bootstrap-servers, the broker and the --kafka security "
                                   "options (the principal needs Describe and Write on it)") from None
        return counts[0], counts[1], counts[2]

    def _unreachable(self, exc: Exception) -> StartupError:
        return StartupError(
            f"cannot use Kafka at {self.cfg.bootstrap_servers} ({exc}): check --bootstrap-servers, "
            "that the broker is up and the --kafka security options; for a local broker run "
            "`depois-stream broker`")

    def _leave(self, consumer: Consumer) -> None:
        """Close the consumer, which leaves the group: the partitions move at once instead of
        after a session timeout."""
        self.metrics.partitions_assigned.set(0)
        self.metrics.group_joined.set(0)
        try:
            consumer.close()
        except Exception as exc:  # noqa: BLE001  (shutting down: report, do not mask the cause)
            log.warning("closing the consumer failed: %s", exc)
        if self._source is not None:
            self._source.assigned = frozenset()

    @staticmethod
    def _close_producer(delivery: Delivery) -> None:
        try:
            delivery.close(SHUTDOWN_STEP_S)
        except Exception as exc:  # noqa: BLE001
            log.warning("closing the producer failed: %s", exc)

    def _start_http(self) -> HealthServer | None:
        if self.cfg.metrics_port is None:
            return None
        try:
            server = HealthServer(self.metrics.registry, self._readiness, self._liveness,
                                  self.cfg.metrics_host, self.cfg.metrics_port,
                                  info=lambda: {"partitions_assigned": len(self.assignment)}
                                  ).start()
        except OSError as exc:
            import errno

            fix = ("pick another --metrics-port (0 = any free port)" if exc.errno in (errno.EADDRINUSE, errno.EACCES)
                   else "check --metrics-host: an address of this host (127.0.0.1, or 0.0.0.0 for all)")
            raise StartupError(
                f"cannot serve metrics on {self.cfg.metrics_host}:{self.cfg.metrics_port} "
                f"({exc.strerror or exc}): {fix}") from None
        self.http_address = server.address
        log.info("metrics and probes on http://%s:%d/metrics", *server.address)
        return server

    def _probe_up(self) -> bool:
        return self._probe is None or self._probe.up

    def _stall_limit_s(self) -> float:
        """The loop never waits longer than a delivery timeout in one step; three of those
        without a pass means it is wedged."""
        return max(60.0, 3 * self.cfg.delivery_timeout_ms / 1000)

    def _liveness(self) -> dict[str, bool]:
        return {"loop_running": time.monotonic() - self._loop_at < self._stall_limit_s(),
                "abandoned_calls_below_cap": abandoned_calls() <= MAX_ABANDONED_CALLS}

    def _readiness(self) -> dict[str, bool]:
        probe, source = self._probe, self._source
        return {
            "model_loaded": self.detector is not None,
            "broker_reachable": probe is not None and probe.up,
            "group_joined": source is not None and source.joined,
            **self._liveness(),
        }

    # ------------------------------------------------------------------ breaker and model

    def _resume_flag(self) -> Path | None:
        return Path(self.cfg.control_dir) / RESUME_FLAG if self.cfg.control_dir else None

    def _take_resume_flag(self, why: str) -> bool:
        """Whether an operator's resume flag is there, removing it (it acts once). A flag that
        cannot be removed (a folder, a read-only mount) is ignored, loudly: honoured, it would
        resume every later trip by itself; raised, it stopped the filter (exit 3) on every
        restart (stop 40's chaos run)."""
        flag = self._resume_flag()
        if flag is None:
            return False
        try:
            flag.unlink()  # no exists() first: one call, no gap, the same on every Python
        except FileNotFoundError:
            self._flag_complaint = ""  # a later unremovable flag is news again
            return False
        except OSError as exc:
            if self._flag_complaint != str(exc):
                self._flag_complaint = str(exc)
                log.error("cannot remove the resume flag %s (%s), so it is ignored %s: remove "
                          "it and create a plain file there to resume", flag, exc, why,
                          extra={"always": True})
            return False
        self._flag_complaint = ""
        return True

    def _trip(self, source: Source, batch: RecordBatch) -> None:
        self._tripped_by = self.detector.sha256  # a resume under this model acknowledges the burst
        # Only a resume made after this trip decides about it: a flag left from earlier (touched
        # after a cooldown had already closed the breaker, or "just in case") would acknowledge a
        # burst nobody has looked at, and let a broken model quarantine the whole stream.
        if self._take_resume_flag("for this trip"):
            log.warning("removed a resume flag made before this trip: create it again to resume")
        source.rewind(batch.first_offsets())
        source.pause("breaker")
        self.stats.breaker_trips += 1
        self.metrics.circuit_trips.inc()
        self.metrics.circuit_open.set(1)
        self.metrics.poison_rate.set(self.breaker.rate)
        log.error(
            "circuit breaker OPEN: %.0f%% of the last %d scored samples would be quarantined "
            "(limit %.0f%%); consumption paused, the batch was not routed. Check the model, then "
            "resume with `touch %s` or wait %.0f s", 100 * self.breaker.rate,
            self.breaker.samples, 100 * self.cfg.breaker_max_rate,
            Path(self.cfg.control_dir or "<control_dir>") / RESUME_FLAG,
            self.cfg.breaker_cooldown_s)

    def _maybe_close_breaker(self, source: Source) -> None:
        if not self.breaker.is_open:
            return
        operator = self._take_resume_flag("while the breaker is open")
        if not self.breaker.should_close(time.monotonic(), operator_resume=operator):
            return
        acknowledge = operator and self.detector.sha256 == self._tripped_by
        self.breaker.close(acknowledge=acknowledge)
        source.resume("breaker")
        self.metrics.circuit_open.set(0)
        self.metrics.circuit_acknowledged.set(int(acknowledge))
        if operator and not acknowledge:
            log.warning("circuit breaker closed (operator, after a model change); consumption "
                        "resumed (a probe of the new model: the next window over the limit "
                        "trips it again)")
        elif operator:
            log.warning("circuit breaker closed (operator); consumption resumed, and the breaker "
                        "stays closed until the quarantine rate is back under %.0f%% (the burst "
                        "is quarantined, not held)", 100 * self.cfg.breaker_max_rate)
        else:
            log.warning("circuit breaker closed (cooldown elapsed); consumption resumed (a "
                        "probe: the next window over the limit trips it again)")

    def _load_model(self, path: Path) -> Detector:
        """Start-up and every hot reload. A reload must be signed by the key the filter started
        with: the key file is read again at each verification, and whoever could replace it
        must not get their own model hot-loaded; rotating keys is a restart."""
        try:
            det = Detector.load(path, device=self.cfg.device, require_gpu=self.cfg.require_gpu,
                                verify_card=self.cfg.verify_card,
                                public_key=self.cfg.verify_signature,
                                threads=self.cfg.scorer_threads)
            trusted = getattr(self, "_trusted_key_id", None)  # None at start-up or unsigned
            if trusted is not None and det.signature_key_id != trusted:
                raise ModelLoadError(
                    f"{path.name} is signed by key id {str(det.signature_key_id)[:12]}…, not by "
                    f"the key this filter started with ({trusted[:12]}…): the public key file "
                    f"{self.cfg.verify_signature} changed since start-up; rotating keys is a "
                    "restart (docs/operations.md)", "signature")
            return det
        except ModelLoadError as exc:
            self.metrics.model_rejections.labels(exc.reason).inc()
            raise

    def _model_watcher(self) -> ModelWatcher:
        """Hot reload of the serving model, every outcome counted (``depois_model_reloads_total``
        and, for a rejection, ``depois_model_rejections_total{reason}``)."""
        return ModelWatcher(self.detector, self._load_model, self.cfg.reload_interval_s,
                            on_outcome=self._reload_outcome, now=self._check_model,
                            on_refused=self._count_refusal,
                            on_file_state=lambda refused: self.metrics.model_file_refused.set(int(refused)))

    def _reload_outcome(self, outcome: str) -> None:
        self.metrics.model_reloads.labels(outcome).inc()

    def _count_refusal(self, reason: str) -> None:
        self.metrics.model_rejections.labels(reason).inc()

    def _publish_model(self, det: Detector) -> None:
        meta, m = det.metadata, self.metrics
        m.model_info.info({
            "version": meta.model_version, "sha256": det.sha256, "provider": det.provider,
            "score_kind": meta.score_kind, "dataset": meta.dataset,
        })
        m.provider_fallback.set(1 if det.provider_fallback else 0)
        m.detection_boundary.set(meta.boundary.global_)
        m.target_fpr.set(meta.target_fpr)
        m.model_signature_verified.set(1 if det.signature_key_id is not None else 0)
        # Export zeros for every series a dashboard or alert divides by, so that rate() and the
        # per-class panels have a baseline before the first record of each kind arrives.
        m.records_consumed.labels(topic=self.cfg.ingest_topic)
        m.inference_duration.labels(provider=det.provider)
        for label in range(meta.num_classes):
            m.quarantined_by_label.labels(label=str(label))
        for reason in det.reason_names:
            m.quarantined_by_reason.labels(reason=reason)
