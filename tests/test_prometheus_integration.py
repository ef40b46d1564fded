"""The dashboard and the alerts, evaluated by a real Prometheus scraping a real consumer.

One scenario, end to end: the consumer filters a poisoned stream on the local broker, a real
Prometheus (loopback only, 1 s scrapes, the repository's rules) scrapes its /metrics and a real
Pushgateway to which `depois-stream replay` pushes, and then every query of every dashboard panel
and every alert expression goes through Prometheus' HTTP API. Unit tests of PromQL strings cannot
catch a query that parses but returns nothing because a label or a metric name drifted; this can.

Every panel query must return data, with the dashboard's `$job` and `$instance` set to the
scraped consumer (so a filter on a misspelt label empties the panel and fails the test).
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from depois_stream.audit.report import (
    PrometheusClient, Window, collect, load_dashboard, substitute_variables)
from depois_stream.filter.app import StreamFilter
from depois_stream.filter.metrics import Metrics
from depois_stream.sim.producer import SampleSet, attack_by_name, produce
from tests.helpers.kafka_io import Topics, consumer_config, wait_for
from tests.helpers.prometheus import (
    ALERT_RULES, PrometheusServer, PushgatewayServer, prometheus_binary, pushgateway_binary,
    resolve_dashboard_variables)

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "depois.json"
BOARD = json.loads(DASHBOARD.read_text())
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


class Scenario:
    def __init__(self, client: PrometheusClient, sent: list, prom: PrometheusServer,
                 instance: str, replay: subprocess.CompletedProcess[str] | None,
                 has_pushgateway: bool) -> None:
        self.client, self.sent, self.prom = client, sent, prom
        self.variables = {"job": "depois-consumer", "instance": instance}
        self.replay, self.has_pushgateway = replay, has_pushgateway
        # Queries are evaluated at this instant, right after the scenario, so that 1- and
        # 2-minute windows hold the stream however long the tests take.
        self.end = time.time()


@pytest.fixture(scope="module")
def scraped(broker, centroid_model, digits_arrays, tmp_path_factory):
    """Stream a poisoned digits split through the consumer while Prometheus scrapes it, then run
    `depois-stream replay list` with `--pushgateway`. Yields a Scenario once Prometheus has seen
    every record consumed."""
    _, _, xte, yte = digits_arrays
    unique = f"prom-it-{uuid.uuid4().hex[:8]}"  # module scope: the `unique` fixture is per test
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    cfg = consumer_config(broker.bootstrap, topics, unique, centroid_model, metrics_port=0,
                          exit_when_idle_s=None, breaker_max_rate=0.95, breaker_min_samples=1000)
    flt = StreamFilter(cfg, Metrics())
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,), daemon=True)
    runner.start()
    workdir = tmp_path_factory.mktemp("observability")
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    push_job = dict(next(j for j in scrape["scrape_configs"] if j["job_name"] == "pushgateway"))
    try:
        wait_for(lambda: flt.http_address is not None)
        host, port = flt.http_address
        with contextlib.ExitStack() as servers:
            # Without the Pushgateway package only the replay panels cannot be checked.
            pushgateway = (servers.enter_context(PushgatewayServer(workdir / "pushgateway"))
                           if pushgateway_binary() else None)
            if pushgateway is not None:
                push_job["static_configs"] = [{"targets": [f"127.0.0.1:{pushgateway.port}"]}]
            prom = servers.enter_context(PrometheusServer(
                workdir / "prometheus", [f"{host}:{port}"],
                extra_scrape_configs=[push_job] if pushgateway is not None else []))
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
            # The replay batch job pushes what it did; Prometheus scrapes it from the gateway.
            replay = None
            if pushgateway is not None:
                env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOIS_")}
                replay = subprocess.run(
                    [sys.executable, "-m", "depois_stream", "replay", "list",
                     "--bootstrap-servers", broker.bootstrap, "--topic", topics.quarantine,
                     "--pushgateway", pushgateway.url],
                    capture_output=True, text=True, timeout=120, env=env)
                if replay.returncode == 0:
                    wait_for(lambda: _scalar(
                        client, 'count(depois_replay_outcomes_total{job="depois-replay"})') > 0,
                        timeout_s=20)
            yield Scenario(client, sent, prom, f"{host}:{port}", replay,
                           has_pushgateway=replay is not None)
    finally:
        stop.set()
        runner.join(timeout=30)


def _scalar(client: PrometheusClient, expr: str) -> float:
    series = client.query(expr)
    return series[0].values[0] if series else float("nan")


def _window(s: Scenario) -> Window:
    # 1 m covers the whole scenario at 1 s scrapes, like $__rate_interval does in Grafana.
    return Window(end=s.end, range_="5m", rate_interval="1m")


def _query(s: Scenario, expr: str, window: Window) -> list:
    filled = resolve_dashboard_variables(expr, BOARD, s.variables)
    return s.client.query(substitute_variables(filled, rate_interval=window.rate_interval,
                                               range_=window.range_), at=window.end)


def _labels(series) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(series.labels.items()) if k != "__name__")


def _panel_targets():
    for panel in BOARD["panels"]:
        for target in panel["targets"]:
            yield pytest.param(panel["title"], target["refId"], target["expr"],
                               id=f"{panel['id']}-{panel['title']}-{target['refId']}")


# What some queries must show beyond "data": the stream is 40 % label-flipped digits with
# malformed records, filtered on CPU by a healthy, unsigned, caught-up consumer.
def _check(title: str, ref: str, s: Scenario, series: list) -> None:
    values = {_labels(x): x.values[0] for x in series}
    v = list(values.values())
    if (title, ref) == ("Poison rate over time", "A"):
        assert len(v) == 1 and v[0] > 0.2
    elif (title, ref) in {("Poison rate over time", "C"), ("Poison rate over time", "D")}:
        assert len(v) == 1 and 0 < v[0] < 1  # the target FPR's share, and twice it
    elif title == "Quarantined ÷ expected (30 min)":
        assert v[0] > 2, "a 40 % campaign is far above the alert level"
    elif (title, ref) == ("Routed records per second", "A"):
        assert set(values) == {"destination=clean", "destination=dlq", "destination=quarantine"}
        assert all(x > 0 for x in v)
    elif title == "Dead-letter reasons":
        reasons = {k for k, x in values.items() if x > 0}
        assert reasons == {f"reason={r}" for m in s.sent for r in m.malformed.values()}
    elif title == "Quarantine by claimed label":
        assert len(values) >= 5 and sum(v) > 0
    elif title == "Quarantine by reason":
        assert sum(v) > 0
    elif title == "Score distribution":
        assert len(series) == 23  # 22 score buckets + le="+Inf"
    elif title == "Inference latency":
        assert all(math.isfinite(x) and x > 0 for x in v)
    elif (title, ref) == ("Model version and provider", "A"):
        (model,) = series
        assert model.labels["provider"] == "CPUExecutionProvider"
        assert model.labels["version"] == "centroid-test-1"
    elif (title, ref) == ("Model version and provider", "C"):
        assert all(0 < x < 1 for x in v)
    elif (title, ref) == ("Model version and provider", "E"):
        (build,) = series
        assert build.labels["version"] and build.labels["client"] in {"kafka-python", "confluent-kafka"}
        # what a page's "(host ...)" names: the container id on compose, the pod on Kubernetes
        assert build.labels["hostname"] == socket.gethostname()
    elif title == "Consumers up":
        assert v == [1.0]
    elif title in {"Broker reachable", "Broker reachable and group membership"}:
        assert v and all(x == 1.0 for x in v)
    elif title == "Consumer lag (seconds)":
        assert v and all(x >= 0 for x in v)
    elif title == "Partitions restarted (last hour)":
        assert v and all(x == 0 for x in v)  # both exported from 0 at assignment; none restarted
    elif title in {"SLI: filtered within 30 s", "SLI: records delivered"}:
        assert v[0] > 0.9
    elif title == "Burst detector (2 min)" and ref == "A":
        assert v[0] >= 6, "the 40 % poisoned stream is a burst"
    elif title == "Replay outcomes (latest push)":
        assert any("action=list" in k for k in values), values


@pytest.mark.parametrize(("title", "ref", "expr"), list(_panel_targets()))
def test_every_dashboard_query_returns_data(scraped, title: str, ref: str, expr: str) -> None:
    window = _window(scraped)
    series = _query(scraped, expr, window)  # a PromQL error raises: a failed test
    if title.startswith(("Replay", "Since last replay")):
        if not scraped.has_pushgateway:
            pytest.skip("prometheus-pushgateway is not installed (CI installs it: see .ci/run)")
        if scraped.replay.returncode != 0:
            pytest.fail(f"replay --pushgateway failed: {scraped.replay.stderr[-500:]}")
    assert series, f"{title}/{ref} returned no series: {expr}"
    assert any(math.isfinite(v) for x in series for v in x.values), \
        f"{title}/{ref} returned only NaN/Inf: {expr}"
    _check(title, ref, scraped, series)


def test_dashboard_annotations_evaluate(scraped) -> None:
    """Reloads and trips do not happen in this scenario; the queries must still be valid PromQL
    on the real series (tests/test_alerts.py shows them data)."""
    window = _window(scraped)
    for annotation in BOARD["annotations"]["list"]:
        _query(scraped, annotation["expr"], window)


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]


# A healthy consumer on CPU by request, breaker closed, lag drained, just committed; 18 of ~560
# records malformed (3 % dead-lettered); 40 % of the labels flipped.
FIRING = {"DepoisDeadLetterRate", "DepoisPoisonBurst", "DepoisPoisonSustained"}


def _alert_params():
    for rule in _rules():
        if "alert" not in rule:
            continue
        name = rule["alert"]
        yield pytest.param(name, rule["expr"], id=name)


@pytest.mark.parametrize(("name", "expr"), list(_alert_params()))
def test_every_alert_expression_evaluates_to_the_expected_state(scraped, name: str, expr: str) -> None:
    result = scraped.client.query(expr, at=scraped.end)
    if name in FIRING:
        assert result, f"{name} should hold on a 40 % poisoned stream with malformed records"
    else:
        assert result == [], f"{name} fires on a healthy consumer: {[_labels(s) for s in result]}"


def test_every_rule_loads_and_the_burst_is_armed(scraped) -> None:
    groups = scraped.prom.api("/api/v1/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    expected = {r.get("alert") or r["record"] for r in _rules()}
    assert set(loaded) == expected
    assert all(r["health"] == "ok" for r in loaded.values()), \
        {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
    recorded = [r for r in _rules() if "record" in r]
    for rule in recorded:  # every recording rule's expression evaluates
        scraped.client.query(rule["expr"], at=scraped.end)


def test_the_poison_burst_is_pending_or_firing(scraped) -> None:
    def state() -> str | None:
        groups = scraped.prom.api("/api/v1/rules")["data"]["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}["DepoisPoisonBurst"]["state"]

    wait_for(lambda: state() in {"pending", "firing"}, timeout_s=10)


def test_report_command_renders_the_dashboard_to_png(scraped, tmp_path: Path) -> None:
    prom = scraped.prom
    client = scraped.client
    panels = collect(client, load_dashboard(DASHBOARD), _window(scraped))
    assert not [e for p in panels for e in p.errors]
    empty = {p.panel.title for p in panels if not p.series}
    assert not empty & {"Poison rate over time", "Routed records per second", "Score distribution",
                        "Quarantine by claimed label", "Dead-letter reasons", "Inference latency",
                        "Model version and provider", "Consumer lag (records)",
                        "Error budget burn rate"}

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
    board = json.loads(DASHBOARD.read_text())
    good = next(p for p in board["panels"] if p["title"] == "Routed records per second")
    broken = dict(next(p for p in board["panels"] if p["title"] == "Poison rate over time"))
    broken["targets"] = [{"refId": "A", "expr": 'sum(rate(depois_records_routed_total{job=~"$job"}[1m])'}]
    board["panels"] = [good, broken]
    dashboard = tmp_path / "edited.json"
    dashboard.write_text(json.dumps(board))
    out = tmp_path / "edited.png"
    result = subprocess.run(
        [sys.executable, "-m", "depois_stream", "report", "--prometheus-url", scraped.prom.url,
         "--dashboard", str(dashboard), "--range", "5m", "--rate-interval", "1m", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "query failed: A: bad_data" in result.stderr and "(2 panels, 0 without data)" in result.stdout
    assert out.exists()
