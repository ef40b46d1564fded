"""The replay tool's own metrics: outcomes of one run, pushed or written as a textfile.

A replay run is a batch job, over before any scrape, so its series go to a Prometheus
Pushgateway (``--pushgateway URL``, job ``depois-replay``, one group per action, each push
replacing that group: the Pushgateway holds the latest run of each action) or to a node-exporter
textfile (``--metrics-textfile``). Either way only these series are written, from a registry of
their own, never the consumer's: a stale copy of the consumer's gauges would read as a second,
idle consumer on every dashboard.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, write_to_textfile

from depois_stream.filter.metrics import NAMESPACE

JOB = "depois-replay"


class ReplayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.replay_outcomes = Counter(
            "replay_outcomes",
            "Replay tool outcomes by action (list|export|rescore|release) and outcome.",
            ["action", "outcome"], namespace=NAMESPACE, registry=self.registry)
        self.last_run = Gauge(
            "replay_last_run_timestamp_seconds", "Unix time the replay run finished, by action.",
            ["action"], namespace=NAMESPACE, registry=self.registry)

    def publish(self, action: str, pushgateway: str | None, textfile: str | None) -> None:
        """Stamp the run and send the series where the operator asked (nowhere by default)."""
        self.last_run.labels(action).set_to_current_time()
        if textfile is not None:
            write_to_textfile(textfile, self.registry)
        if pushgateway is not None:
            push_to_gateway(pushgateway, job=JOB, registry=self.registry,
                            grouping_key={"action": action}, timeout=10)
