"""The dashboard and the alerts, evaluated by a real Prometheus scraping a real consumer.

One scenario, end to end: the consumer filters a poisoned stream on the local broker, a real
Prometheus (loopback only, 1 s scrapes, the repository's alert rules) scrapes its /metrics, and
then every dashboard query and every alert expression goes through Prometheus' HTTP API. Unit
tests of PromQL strings cannot catch a query that parses but returns nothing because a label or a
metric name drifted; this can.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from depois_stream.filter.app import StreamFilter
from depois_stream.filter.metrics import Metrics
from depois_stream.sim.producer import SampleSet, attack_by_name, produce
from depois_stream.audit.report import PrometheusClient, Window, collect, load_dashboard, panel_queries
from tests.helpers.kafka_io import Topics, consumer_config, wait_for
from tests.helpers.prometheus import ALERT_RULES, PrometheusServer, prometheus_binary

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "depois.json"
POISON_RATE = 0.4
# The stream arrives in chunks, each seen by at least one scrape, so every labelled series (one
# per DLQ reason, per claimed label) exists before it grows, as in a long-running deployment;
# a series born with its final value shows no rate() at all. Each chunk carries one malformed
# record per DLQ reason the producer can make.
CHUNKS = 3
MALFORMED_PER_CHUNK = 6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(prometheus_binary() is None,
                       reason="prometheus is not installed (CI installs it: see .ci/run)"),
]


@pytest.fixture(scope="module")
def scraped(broker, centroid_model, digits_arrays, tmp_path_factory):
    """Stream a poisoned digits split through the consumer while Prometheus scrapes it.

    Yields (Prometheus client, manifests of the chunks sent, Prometheus server) once Prometheus
    has seen every record consumed.
    """
    _, _, xte, yte = digits_arrays
    unique = f"prom-it-{uuid.uuid4().hex[:8]}"  # module scope: the `unique` fixture is per test
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    cfg = consumer_config(broker.bootstrap, topics, unique, centroid_model, metrics_port=0,
                          exit_when_idle_s=None, breaker_max_rate=0.95, breaker_min_samples=1000)
    flt = StreamFilter(cfg, Metrics())
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: flt.http_address is not None)
        host, port = flt.http_address
        with PrometheusServer(tmp_path_factory.mktemp("prometheus"), [f"{host}:{port}"]) as prom:
            prom.wait_for_target_up()
            client = PrometheusClient(prom.url)
            sent = []
            for k, chunk in enumerate(np.array_split(np.arange(len(yte)), CHUNKS)):
                data = SampleSet(xte[chunk], yte[chunk], f"digits-test-{k}", 10)
                sent.append(produce(broker.bootstrap, topics.ingest, data, seed=k,
                                    attack=attack_by_name("random-flip", 10), rate=POISON_RATE,
                                    malformed=MALFORMED_PER_CHUNK))
                total = sum(m.sent for m in sent)
                wait_for(lambda n=total: flt.stats.consumed >= n, timeout_s=60)
                wait_for(lambda n=total: _scalar(client, "sum(depois_records_consumed_total)") >= n)
            yield client, sent, prom
    finally:
        stop.set()
        runner.join(timeout=30)


def _scalar(client: PrometheusClient, expr: str) -> float:
    series = client.query(expr)
    return series[0].values[0] if series else float("nan")


def _window() -> Window:
    # 1 m covers the whole scenario at 1 s scrapes, like $__rate_interval does in Grafana.
    import time

    return Window(end=time.time(), range_="5m", rate_interval="1m")


def test_every_dashboard_query_evaluates_and_core_panels_have_data(scraped) -> None:
    client, sent, _ = scraped
    board = load_dashboard(DASHBOARD)
    window = _window()
    results: dict[str, list] = {}
    for panel in board.panels:
        for target, expr in panel_queries(panel, window):
            # Raises PrometheusError (a failed test) on any PromQL or evaluation error.
            results[f"{panel.title}/{target.ref_id}"] = client.query(expr, at=window.end)

    def values(key: str) -> dict[str, float]:
        return {",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.values[0]
                for s in results[key]}

    fleet_poison = values("Poison rate over time/A")
    assert len(fleet_poison) == 1 and list(fleet_poison.values())[0] > 0.2
    assert list(values("Poison rate (window)/A").values())[0] > 0.2
    routed = values("Routed records per second/A")
    assert set(routed) == {"destination=clean", "destination=dlq", "destination=quarantine"}
    assert all(v > 0 for v in routed.values())
    dlq_reasons = {k for k, v in values("Dead-letter reasons/A").items() if v > 0}
    assert dlq_reasons == {f"reason={r}" for m in sent for r in m.malformed.values()}
    quarantined = values("Quarantine by claimed label/A")
    assert len(quarantined) >= 5 and sum(quarantined.values()) > 0
    assert len(results["Score distribution/A"]) == 23  # 22 score buckets + le="+Inf"
    assert all(math.isfinite(v) and v > 0 for v in values("Inference latency/B").values())
    (model,) = results["Model version and provider/A"]
    assert model.labels["provider"] == "CPUExecutionProvider"
    assert model.labels["version"] == "centroid-test-1"
    assert values("Consumers up/A") == {"": 1.0}
    assert results["Consumer lag/A"], "lag is exported per assigned partition"


def test_every_alert_expression_evaluates_and_the_poison_spike_is_pending(scraped) -> None:
    client, _, prom = scraped
    rules = yaml.safe_load(ALERT_RULES.read_text())["groups"][0]["rules"]
    fired = {r["alert"]: client.query(r["expr"]) for r in rules}
    assert set(fired) >= {"DepoisPoisonRateSpike", "DepoisDeadLetterRate", "DepoisConsumerDown"}
    # 40 % of the labels were flipped and 18 of ~560 records are malformed: both conditions hold.
    assert fired["DepoisPoisonRateSpike"] and fired["DepoisDeadLetterRate"]
    # A healthy consumer on CPU by request, breaker closed, lag drained, just committed: quiet.
    for quiet in ("DepoisConsumerDown", "DepoisConsumerStalled", "DepoisGpuFallback",
                  "DepoisCircuitOpen", "DepoisConsumerLagGrowing"):
        assert fired[quiet] == [], quiet

    def spike_state() -> str | None:
        groups = prom.api("/api/v1/rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == set(fired) and all(r["health"] == "ok" for r in loaded.values())
        return loaded["DepoisPoisonRateSpike"]["state"]

    # `for: 5m` holds it in pending: the alert is armed, and would page after five minutes.
    wait_for(lambda: spike_state() == "pending", timeout_s=10)


def test_report_command_renders_the_dashboard_to_png(scraped, tmp_path: Path) -> None:
    client, _, prom = scraped
    panels = collect(client, load_dashboard(DASHBOARD), _window())
    assert not [e for p in panels for e in p.errors]
    empty = {p.panel.title for p in panels if not p.series}
    assert not empty & {"Poison rate over time", "Routed records per second", "Score distribution",
                        "Quarantine by claimed label", "Dead-letter reasons", "Inference latency",
                        "Model version and provider", "Consumer lag"}

    out = tmp_path / "report" / "depois.png"
    result = subprocess.run(
        [sys.executable, "-m", "depois_stream", "report", "--prometheus-url", prom.url,
         "--dashboard", str(DASHBOARD), "--range", "5m", "--rate-interval", "1m", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"({len(panels)} panels" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000


def test_report_shows_a_broken_query_and_exits_1(scraped, tmp_path: Path) -> None:
    """A dashboard edit that breaks one query must not hide the others, nor pass silently."""
    _, _, prom = scraped
    board = json.loads(DASHBOARD.read_text())
    good, broken = board["panels"][5], dict(board["panels"][6])
    broken["targets"] = [{"refId": "A", "expr": "sum(rate(depois_records_routed_total[1m])"}]
    board["panels"] = [good, broken]
    dashboard = tmp_path / "edited.json"
    dashboard.write_text(json.dumps(board))
    out = tmp_path / "edited.png"
    result = subprocess.run(
        [sys.executable, "-m", "depois_stream", "report", "--prometheus-url", prom.url,
         "--dashboard", str(dashboard), "--range", "5m", "--rate-interval", "1m", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "query failed: A: bad_data" in result.stderr and "(2 panels, 0 without data)" in result.stdout
    assert out.exists()
