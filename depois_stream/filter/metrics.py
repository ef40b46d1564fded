"""Prometheus metrics of the stream filter (the replay tool has its own: audit.metrics).

Every metric lives on an explicit ``CollectorRegistry`` owned by a ``Metrics`` object, so two
consumers in one test process (or a consumer and a replay run) never collide on the global
registry. Label values are bounded sets: topics, partitions, destinations, reason codes, class
labels; never a sample id.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

from depois_stream.contract.wire import DLQ_REASONS

if TYPE_CHECKING:
    import numpy as np

NAMESPACE = "depois"

DESTINATIONS = ("clean", "quarantine", "dlq")

# Scores are z-scale for the fused score (standardised on the calibration split) and roughly so
# for the critic; the buckets are dense around the usual boundaries (-3..0) and wide at the tails.
SCORE_BUCKETS = (
    -50.0, -20.0, -10.0, -8.0, -6.0, -5.0, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5,
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Up to an hour: a backlog after an outage must not read as a flat 60 s at every quantile.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0, 3600.0)
DELIVERY_FAILURE_KINDS = ("retriable", "rejected")
MODEL_REJECTION_REASONS = ("signature", "card", "contract", "load")


class Metrics:
    """All depois metrics on one registry (pass ``registry=None`` for a fresh private one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            # memory, CPU and file descriptors (process_*): what an out-of-memory exit or a
            # descriptor leak is read from; a shared registry brings its own
            ProcessCollector(registry=registry)
        self.registry = registry
        r, ns = self.registry, NAMESPACE

        self.records_consumed = Counter(
            "records_consumed", "Records read from the ingest topic, each offset once per "
            "process (a record handed back and read again is not counted again).", ["topic"],
            namespace=ns, registry=r)
        self.records_routed = Counter(
            "records_routed", "Records produced to an output topic, by destination.",
            ["destination"], namespace=ns, registry=r)
        self.dead_lettered = Counter(
            "dead_lettered", "Records sent to the dead-letter topic, by bounded reason code.",
            ["reason"], namespace=ns, registry=r)
        self.quarantined_by_reason = Counter(
            "quarantined_by_reason", "Quarantined records by the evidence column that fired: a member "
            "or an agreement of a family's members (below_boundary when the model names no columns).", ["reason"],
            namespace=ns, registry=r)
        self.quarantined_by_label = Counter(
            "quarantined_by_label", "Quarantined records by their claimed class label.",
            ["label"], namespace=ns, registry=r)
        self.score = BatchHistogram(
            "score", "Detector score of every scored record, counted once when it is routed "
            "(higher = more trustworthy).",
            SCORE_BUCKETS, namespace=ns, registry=r)
        self.poison_rate = Gauge(
            "poison_rate", "Quarantined fraction of scored records over the sliding window.",
            namespace=ns, registry=r)
        self.batch_size = Histogram(
            "batch_size", "Records per scored batch.", buckets=BATCH_BUCKETS,
            namespace=ns, registry=r)
        self.inference_duration = Histogram(
            "inference_duration_seconds", "Wall time of one onnxruntime batch run.",
            ["provider"], buckets=INFERENCE_BUCKETS, namespace=ns, registry=r)
        self.end_to_end_latency = BatchHistogram(
            "end_to_end_latency_seconds",
            "Record timestamp to output produced (acknowledged), per record.",
            LATENCY_BUCKETS, namespace=ns, registry=r)
        self.consumer_lag = Gauge(
            "consumer_lag", "Records between this member's position (the next record it will "
            "read) and the partition end (only partitions this member owns; removed on "
            "revocation).",
            ["topic", "partition"], namespace=ns, registry=r)
        self.consumer_lag_seconds = Gauge(
            "consumer_lag_seconds", "Age of the oldest record of the partition not yet filtered "
            "(0 when caught up; only partitions this member owns).",
            ["topic", "partition"], namespace=ns, registry=r)
        self.partition_restarts = Counter(
            "partition_restarts", "Owned partitions restarted (resumed and sought to the first "
            "record not yet filtered) because they had records to give and gave none for "
            "--stall-restart-s while the filter kept asking: the client library had stopped "
            "fetching them.", ["topic", "partition"], namespace=ns, registry=r)
        self.partition_log_resets = Counter(
            "partition_log_resets", "Owned partitions restarted at the start of a new log "
            "(or its end under auto_offset_reset=latest) because the broker lost the old one "
            "(it came back empty, or the topic was deleted and re-created): the topic came "
            "back under a new id, the partition came back with no commit of the "
            "group, or its position lay past the log's end with no commit for 10 s while idle "
            "(Tansu, unlike Kafka, answers a fetch past the end with nothing). cause: new_id, "
            "no_commit or past_end; no_commit is also what a new group's first commit lost to a "
            "rebalance looks like (records filtered twice, nothing lost at the broker).",
            ["topic", "partition", "cause"],
            namespace=ns, registry=r)
        self.broker_up = Gauge(
            "broker_up", "1 when the last direct broker probe (a metadata request) succeeded.",
            namespace=ns, registry=r)
        self.client_calls_abandoned = Gauge(
            "client_calls_abandoned", "Kafka client calls given up on (no answer within their "
            "bound) that are still inside the library, each possibly holding a producer handle; "
            "/healthz fails above a cap, so that a restart frees them.", namespace=ns, registry=r)
        self.group_joined = Gauge(
            "group_joined", "1 while this member is in its consumer group (with or without "
            "partitions); 0 from a revocation (every rebalance starts with one) to the next "
            "assignment.", namespace=ns, registry=r)
        self.partitions_assigned = Gauge(
            "partitions_assigned", "Ingest partitions currently assigned to this member.",
            namespace=ns, registry=r)
        self.commits = Counter(
            "commits", "Offset commits the broker confirmed.", namespace=ns, registry=r)
        self.commit_failures = Counter(
            "commit_failures", "Offset commits the broker refused or did not answer (the batch will be re-delivered).",
            namespace=ns, registry=r)
        self.produce_retries = Counter(
            "produce_retries", "Batch produce attempts that failed and were retried.",
            namespace=ns, registry=r)
        self.delivery_failures = Counter(
            "delivery_failures", "Output records the broker did not acknowledge, by kind: "
            "retriable (the batch is sent again) or rejected (the record is dead-lettered).",
            ["kind"], namespace=ns, registry=r)
        self.forged_headers = Counter(
            "forged_headers", "Ingest records that carried depois.* headers (removed before "
            "forwarding: only the filter writes them), counted once when routed.", namespace=ns, registry=r)
        self.detection_boundary = Gauge(
            "detection_boundary", "Global detection boundary of the loaded model.",
            namespace=ns, registry=r)
        self.target_fpr = Gauge(
            "target_fpr", "Clean false-positive rate the loaded model was calibrated for: the "
            "quarantine share expected from clean traffic.", namespace=ns, registry=r)
        self.circuit_open = Gauge(
            "circuit_breaker_open", "1 while the poison-rate circuit breaker pauses consumption.",
            namespace=ns, registry=r)
        self.circuit_acknowledged = Gauge(
            "circuit_breaker_acknowledged", "1 while an operator's resume holds the breaker "
            "closed through the burst that tripped it; 0 again (armed) once the quarantine rate "
            "is back under the limit or another model is loaded.", namespace=ns, registry=r)
        self.circuit_trips = Counter(
            "circuit_breaker_trips", "Times the poison-rate circuit breaker opened.",
            namespace=ns, registry=r)
        self.model_info = Info(
            "model", "Loaded model: version, sha256, provider actually used, score kind, data set.",
            namespace=ns, registry=r)
        self.provider_fallback = Gauge(
            "provider_fallback",
            "1 when --device cuda was requested but the session runs on CPU (auto never sets it).",
            namespace=ns, registry=r)
        self.model_reloads = Counter(
            "model_reloads", "Hot-reload attempts, by outcome (loaded|rejected).", ["outcome"],
            namespace=ns, registry=r)
        self.model_rejections = Counter(
            "model_rejections", "Model files refused (start-up or hot reload), by reason "
            "(signature|card|contract|load).", ["reason"], namespace=ns, registry=r)
        self.model_file_refused = Gauge(
            "model_file_refused", "1 while the file at --model-path is not the serving model "
            "because it was refused or is missing (a restart would refuse it too); 0 once the "
            "file is the serving model again or a new one loaded.", namespace=ns, registry=r)
        self.model_signature_verified = Gauge(
            "model_signature_verified", "1 when the serving model's signature was verified "
            "against the configured public key, 0 when it runs unsigned.",
            namespace=ns, registry=r)
        self.build_info = Info(
            "build", "depois-stream version and the Kafka client library in use.",
            namespace=ns, registry=r)
        self.last_batch_timestamp = Gauge(
            "last_batch_timestamp_seconds", "Unix time the broker last confirmed an offset commit.",
            namespace=ns, registry=r)

        for d in DESTINATIONS:  # export zeros so rate() works before the first record of a kind
            self.records_routed.labels(destination=d)
        self.model_reloads.labels(outcome="loaded")
        self.model_reloads.labels(outcome="rejected")
        for reason in DLQ_REASONS:  # same reason: a first burst of one kind must show in rate()
            self.dead_lettered.labels(reason=reason)
        for kind in DELIVERY_FAILURE_KINDS:
            self.delivery_failures.labels(kind=kind)
        for reason in MODEL_REJECTION_REASONS:
            self.model_rejections.labels(reason=reason)


class BatchHistogram:
    """A label-less histogram that takes a whole batch of observations in one numpy pass.

    ``prometheus_client.Histogram.observe`` costs a Python loop over the buckets per value, a
    noticeable share of the hot path at stream rates, and the library has no batch API; this
    collector keeps its own bucket counts and exposes them through the public custom-collector
    interface, with the same series (``_bucket{le=...}``, ``_sum``, ``_count``) a Histogram has.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], *,
                 namespace: str, registry: CollectorRegistry) -> None:
        import threading

        import numpy as np

        self._name = f"{namespace}_{name}"
        self._doc = documentation
        self._bounds = np.asarray([*buckets, float("inf")], dtype=np.float64)
        self._counts = np.zeros(len(self._bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        """One value (prometheus-client's Histogram interface)."""
        self.observe_many([value])

    def observe_many(self, values: np.ndarray | list[float]) -> None:
        import numpy as np

        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[~np.isnan(values)]
        if values.size == 0:
            return
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"),
                             minlength=len(self._bounds))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = self._counts.cumsum().tolist()
            total = self._sum
        # Exactly Histogram's exposition: _count always, _sum only when no bucket bound is
        # negative (OpenMetrics; the score's are). HistogramMetricFamily would drop _count too.
        family = Metric(self._name, self._doc, "histogram")
        for bound, count in zip(self._bounds.tolist(), cumulative):
            family.add_sample(f"{self._name}_bucket", {"le": floatToGoString(bound)}, count)
        family.add_sample(f"{self._name}_count", {}, cumulative[-1])
        if self._bounds[0] >= 0:
            family.add_sample(f"{self._name}_sum", {}, total)
        yield family

    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._doc, "histogram")]
