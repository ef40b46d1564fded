"""The deployment files are checked by the tools that will run them, not by eye.

docker-compose validates the compose file, promtool the Prometheus config, the alert rules and
their unit tests; the dashboard is linted against the metrics the code actually exports, so a
renamed metric fails here instead of leaving an empty Grafana panel in production.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from depois_stream.filter.metrics import Metrics
from depois_stream.audit.report import load_dashboard, substitute_variables

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "depois.json"
TOPICS = ("depois.ingest", "depois.clean", "depois.quarantine", "depois.dlq", "depois.audit")
REQUIRED_ALERTS = {"DepoisPoisonRateSpike", "DepoisConsumerDown", "DepoisConsumerLagGrowing",
                   "DepoisGpuFallback", "DepoisDeadLetterRate", "DepoisCircuitOpen"}
PROMETHEUS_BUILTINS = {"up"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (CI installs it: see .ci/run)")
    return path


def _run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def exposed_names() -> set[str]:
    """Every series name the Metrics registry can expose, including label-less families."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""], "info": ["_info"]}
    return {f.name + s for f in Metrics().registry.collect() for s in suffixes[f.type]}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bdepois_[a-z0-9_]+", expr)) | (
        set(re.findall(r"\b[a-z_]+(?=\{)", expr)) & PROMETHEUS_BUILTINS)


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from the short or long volume syntax compose prints."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = (source, mode == ["ro"])
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
    return out


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


# --- docker-compose ---------------------------------------------------------------------------

@pytest.fixture
def compose_env(tmp_path: Path) -> dict[str, str]:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"placeholder: compose config does not read it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPOIS_", "GRAFANA_"))}
    env.update(DEPOIS_MODEL_DIR=str(model_dir), GRAFANA_ADMIN_PASSWORD="test-only")
    return env


def test_compose_file_is_valid_and_wires_the_stack(compose_env: dict[str, str]) -> None:
    compose = _tool("docker-compose")
    result = _run(compose, "-f", "docker-compose.yml", "--profile", "demo", "config", env=compose_env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"kafka", "kafka-init", "depois-consumer", "demo-producer",
                             "prometheus", "grafana"}

    kafka_env = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    init_script = " ".join(services["kafka-init"]["entrypoint"] + services["kafka-init"]["command"])
    assert all(t in init_script for t in TOPICS)

    consumer = services["depois-consumer"]
    assert "container_name" not in consumer and "ports" not in consumer, \
        "a fixed name or host port would break `--scale depois-consumer=N`"
    assert mounts(consumer)["/models"] == (compose_env["DEPOIS_MODEL_DIR"], True)
    assert consumer["environment"]["DEPOIS_MODEL_PATH"] == "/models/model.onnx"
    assert consumer["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"

    scrape = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"]
    dns = next(j for j in scrape if j["job_name"] == "depois-consumer")["dns_sd_configs"][0]
    assert dns["names"] == ["depois-consumer"]
    assert str(dns["port"]) == str(consumer["environment"]["DEPOIS_METRICS_PORT"])
    assert consumer["environment"]["DEPOIS_METRICS_HOST"] == "0.0.0.0"

    prometheus = mounts(services["prometheus"])
    assert prometheus["/etc/prometheus/alerts.yml"] == (str(PROM_DIR / "alerts.yml"), True)
    assert prometheus["/etc/prometheus/prometheus.yml"] == (str(PROM_DIR / "prometheus.yml"), True)
    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/dashboards"] == (str(DASHBOARD.parent), True)
    assert grafana["/etc/grafana/provisioning"][0] == str(REPO / "deploy/grafana/provisioning")


def test_compose_refuses_to_start_grafana_without_an_admin_password(
        compose_env: dict[str, str]) -> None:
    compose = _tool("docker-compose")
    del compose_env["GRAFANA_ADMIN_PASSWORD"]
    result = _run(compose, "-f", "docker-compose.yml", "config", "-q", env=compose_env)
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


# --- Prometheus -------------------------------------------------------------------------------

def test_promtool_accepts_config_and_rules() -> None:
    promtool = _tool("promtool")
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = _run(promtool, *args, cwd=PROM_DIR)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "test", "rules", "alerts_test.yml", cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr

    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for group in tests for case in group["alert_rule_test"]
             if case["exp_alerts"]}
    held_back = {case["alertname"] for group in tests for case in group["alert_rule_test"]
                 if not case["exp_alerts"]}
    names = {r["alert"] for r in alert_rules()}
    assert names >= REQUIRED_ALERTS
    assert fired == names, "every alert needs a promtool case in which it fires"
    assert held_back == names, "every alert needs a case in which it must stay quiet"


def test_every_alert_is_actionable_and_uses_exported_metrics() -> None:
    known = exposed_names() | PROMETHEUS_BUILTINS
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert len(rule["annotations"]["runbook"]) > 80, f"{rule['alert']} needs a real runbook"
        assert rule["annotations"]["summary"], rule["alert"]
        used = metric_names(rule["expr"])
        assert used and used <= known, f"{rule['alert']} uses unknown metrics {used - known}"


# --- Grafana ----------------------------------------------------------------------------------

def test_dashboard_panels_query_only_exported_metrics() -> None:
    board = load_dashboard(DASHBOARD)
    known = exposed_names() | PROMETHEUS_BUILTINS
    assert len({p.id for p in board.panels}) == len(board.panels)
    for panel in board.panels:
        assert panel.targets, f"panel {panel.title!r} has no query"
        for target in panel.targets:
            used = metric_names(target.expr)
            assert used, f"panel {panel.title!r} query {target.expr!r} reads no metric"
            assert used <= known, f"panel {panel.title!r} uses unknown metrics {used - known}"
            substitute_variables(target.expr, rate_interval="1m", range_="1h")  # raises if unknown


def test_dashboard_has_the_panels_operators_need() -> None:
    """The issue's list of views, each pinned to the metric that answers it."""
    board = load_dashboard(DASHBOARD)
    by_type: dict[str, set[str]] = {}
    for panel in board.panels:
        for target in panel.targets:
            by_type.setdefault(panel.type, set()).update(metric_names(target.expr))
    everything = set().union(*by_type.values())
    assert "depois_score_bucket" in by_type["heatmap"]
    assert "depois_model_info" in by_type["table"]
    assert {"depois_poison_rate", "depois_records_routed_total", "depois_consumer_lag",
            "depois_inference_duration_seconds_bucket", "depois_dead_lettered_total",
            "depois_quarantined_by_label_total", "depois_provider_fallback"} <= everything
    quantiles = [t.expr for p in board.panels for t in p.targets
                 if "depois_inference_duration_seconds_bucket" in t.expr]
    levels = {re.search(r"histogram_quantile\(([\d.]+)", q).group(1) for q in quantiles}
    assert levels >= {"0.5", "0.95", "0.99"}


def test_grafana_provisioning_points_at_the_dashboard_and_its_datasource() -> None:
    prov = REPO / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((prov / "dashboards" / "depois.yml").read_text())["providers"][0]
    raw = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in raw["panels"]} | {
        t["datasource"]["uid"] for p in raw["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}
    assert datasource["url"] == "http://prometheus:9090"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


# --- docs -------------------------------------------------------------------------------------

def test_operations_doc_lists_every_metric_and_every_alert() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    table = set(re.findall(r"^\| `(depois_[a-z0-9_]+)`", doc, flags=re.M))
    families = {f.name + {"counter": "_total", "info": "_info"}.get(f.type, "")
                for f in Metrics().registry.collect()}
    assert table == families, "docs/operations.md's metrics table is out of date"
    sections = set(re.findall(r"^### (Depois\w+)", doc, flags=re.M))
    assert sections == {r["alert"] for r in alert_rules()}, "each alert needs a runbook section"
