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
import sys
from pathlib import Path

import pytest
import yaml

from depois_stream.audit.metrics import ReplayMetrics
from depois_stream.audit.report import load_dashboard, substitute_variables
from depois_stream.filter.metrics import Metrics
from tests.helpers.prometheus import dashboard_variables, resolve_dashboard_variables

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "depois.json"
TOPICS = ("depois.ingest", "depois.clean", "depois.quarantine", "depois.dlq", "depois.audit")
PROMTOOL_TESTS = ("alerts_test.yml", "slo_test.yml")
REQUIRED_ALERTS = {
    "DepoisPoisonBurst", "DepoisPoisonSustained", "DepoisConsumerDown", "DepoisConsumerStalled",
    "DepoisConsumerLagGrowing", "DepoisBrokerUnreachable", "DepoisGpuFallback",
    "DepoisDeadLetterRate", "DepoisCircuitOpen", "DepoisCircuitBreakerTripped",
    "DepoisDeliveryRejected", "DepoisProduceRetrying", "DepoisCommitFailures",
    "DepoisModelRejected", "DepoisModelFileRefused", "DepoisForgedHeaders", "DepoisFreshnessSLOFastBurn",
    "DepoisFreshnessSLOSlowBurn", "DepoisDeliverySLOFastBurn", "DepoisDeliverySLOSlowBurn",
    "DepoisNoPartitionsOwned", "DepoisMemberOutOfGroup", "DepoisClientCallsStuck"}
# The one base URL of each annotation kind (alerts.yml's header says how to change them).
RUNBOOK_BASE = "https://github.com/depois-stream/depois-stream/blob/main/docs/operations.md#"
DASHBOARD_BASE = "http://localhost:3000/d/depois-stream/depois-stream?orgId=1"
# Series Prometheus or the Pushgateway add by themselves (push_time_seconds: last push of a group).
PROMETHEUS_BUILTINS = {"up", "push_time_seconds"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (CI installs it: see .ci/run)")
    return path


def _run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def families() -> list:
    """The metric families of the filter and of the replay batch job (its own registry)."""
    return [*Metrics().registry.collect(), *ReplayMetrics().registry.collect()]


def exposed_names() -> set[str]:
    """Every series name the registries can expose, including label-less families."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""], "info": ["_info"]}
    return {f.name + s for f in families() for s in suffixes[f.type]}


def metric_names(expr: str) -> set[str]:
    """Series names an expression reads: depois_* metrics, recorded job:depois_*:* series and
    the Prometheus built-ins it uses."""
    return set(re.findall(r"(?<![\w:])[a-z_:]*depois_[a-z0-9_:]+", expr)) | (
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


def all_rules() -> list[dict]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def published(service: dict) -> list[tuple[str, int]]:
    """(host ip, container port) of each published port, from the short or long syntax."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, str):  # [[host_ip:]host_port:]container_port[/protocol]
            parts = p.split("/")[0].split(":")
            out.append((parts[0] if len(parts) == 3 else "", int(parts[-1])))
        else:
            out.append((p.get("host_ip", ""), int(p["target"])))
    return out


def alert_rules() -> list[dict]:
    return [r for r in all_rules() if "alert" in r]


def recorded_names() -> set[str]:
    return {r["record"] for r in all_rules() if "record" in r}


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


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
                             "prometheus", "alertmanager", "pushgateway", "grafana"}

    kafka_env = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    init_script = " ".join(services["kafka-init"]["entrypoint"] + services["kafka-init"]["command"])
    assert all(t in init_script for t in TOPICS)
    # Lag in seconds and the freshness SLO measure time since arrival at the broker.
    assert re.search(r"--topic depois\.ingest [^\n]*\\\n[^\n]*--config message\.timestamp\.type=LogAppendTime",
                     init_script), init_script

    # The demo image inherits the runtime's /healthz check; `produce` serves no HTTP.
    check = services["demo-producer"]["healthcheck"]
    assert check.get("disable") is True or check.get("test") == ["NONE"], check

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

    # Prometheus sends alerts to the stack's Alertmanager, which reads the repository's config.
    prom_config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    (am_target,) = [t for am in prom_config["alerting"]["alertmanagers"]
                    for sc in am["static_configs"] for t in sc["targets"]]
    alertmanager = services["alertmanager"]
    assert am_target == "alertmanager:9093" and services["alertmanager"]["image"].startswith(
        "prom/alertmanager:")
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    assert mounts(alertmanager)["/etc/alertmanager/alertmanager.yml"] == (str(ALERTMANAGER_CONFIG), True)
    assert published(alertmanager) == [("127.0.0.1", 9093)]
    assert all(ip == "127.0.0.1" for s in services.values() for ip, _ in published(s)), \
        "host ports are published on loopback only"

    # Batch jobs push to the Pushgateway; Prometheus scrapes it keeping the pushed job label.
    pushgateway = services["pushgateway"]
    assert pushgateway["image"].startswith("prom/pushgateway:")
    assert published(pushgateway) == [("127.0.0.1", 9091)]
    push_job = next(j for j in scrape if j["job_name"] == "pushgateway")
    assert push_job["honor_labels"] is True
    assert push_job["static_configs"][0]["targets"] == ["pushgateway:9091"]
    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/dashboards"] == (str(DASHBOARD.parent), True)
    assert grafana["/etc/grafana/provisioning"][0] == str(REPO / "deploy/grafana/provisioning")


def test_the_breaker_resume_flag_can_be_written_where_the_runbook_says(compose_env: dict[str, str]) -> None:
    """DepoisCircuitOpen's runbook closes an open breaker by creating `resume` in the consumer's
    DEPOIS_CONTROL_DIR: each deployment must set that directory on a writable mount, and the
    runbook must give the command for it."""
    compose = _tool("docker-compose")
    result = _run(compose, "-f", "docker-compose.yml", "config", env=compose_env)
    assert result.returncode == 0, result.stderr
    consumer = yaml.safe_load(result.stdout)["services"]["depois-consumer"]
    control = consumer["environment"].get("DEPOIS_CONTROL_DIR")
    assert control, "the compose consumer sets no DEPOIS_CONTROL_DIR: the breaker cannot be resumed"
    tmpfs = consumer.get("tmpfs", [])
    assert any(str(t).split(":")[0] == control for t in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)), \
        f"{control} must be a tmpfs: the image runs as a non-root user"
    runbook = (REPO / "docs/operations.md").read_text()
    section = runbook.split("### DepoisCircuitOpen", 1)[1].split("\n### ", 1)[0]
    assert f"touch {control}/resume" in section and "docker compose exec" in section
    assert "kubectl" in section


def test_compose_refuses_to_start_grafana_without_an_admin_password(
        compose_env: dict[str, str]) -> None:
    compose = _tool("docker-compose")
    del compose_env["GRAFANA_ADMIN_PASSWORD"]
    result = _run(compose, "-f", "docker-compose.yml", "config", "-q", env=compose_env)
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


# --- Prometheus and Alertmanager -------------------------------------------------------------

def test_promtool_accepts_config_and_rules() -> None:
    promtool = _tool("promtool")
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = _run(promtool, *args, cwd=PROM_DIR)
        assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_alertmanager_config_and_routes_by_severity() -> None:
    amtool = _tool("amtool")
    result = _run(amtool, "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr

    def receiver(**labels: str) -> str:
        args = [f"{k}={v}" for k, v in labels.items()]
        routed = _run(amtool, "config", "routes", "test", "--config.file", str(ALERTMANAGER_CONFIG), *args)
        assert routed.returncode == 0, routed.stdout + routed.stderr
        return routed.stdout.strip()

    for rule in alert_rules():
        severity = rule["labels"]["severity"]
        assert receiver(alertname=rule["alert"], job="depois-consumer", severity=severity) == severity
    assert receiver(alertname="SomethingElse") == "ticket", "an alert without severity must not vanish"
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    names = {r["alert"] for r in alert_rules()}
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            pattern = re.fullmatch(r'alertname=~?"([^"]+)"', matcher).group(1)
            assert any(re.fullmatch(pattern, n) for n in names), f"inhibit rule names no alert: {matcher}"


def test_the_documented_receiver_example_is_a_valid_config(tmp_path: Path) -> None:
    """docs/operations.md's receiver example, alternatives uncommented, in place of the shipped
    receivers: amtool accepts it and the routes still find both receivers."""
    amtool = _tool("amtool")
    doc = (REPO / "docs" / "operations.md").read_text()
    (example,) = re.findall(r"```yaml\n(receivers:\n.*?)```", doc, flags=re.S)
    uncommented = re.sub(r"^(\s*)# (\s*(?:- )?[a-z_]+:.*)$", r"\1\2", example, flags=re.M)
    assert uncommented.count("_configs:") == 4, uncommented
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    config["receivers"] = yaml.safe_load(uncommented)["receivers"]
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    result = _run(amtool, "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "test", "rules", *PROMTOOL_TESTS, cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr

    tests = [group for name in PROMTOOL_TESTS
             for group in yaml.safe_load((PROM_DIR / name).read_text())["tests"]]
    cases = [case for group in tests for case in group.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    held_back = {case["alertname"] for case in cases if not case["exp_alerts"]}
    names = {r["alert"] for r in alert_rules()}
    assert names >= REQUIRED_ALERTS
    assert fired == names, "every alert needs a promtool case in which it fires"
    assert held_back == names, "every alert needs a case in which it must stay quiet"


def test_alerts_test_yml_is_what_its_generator_writes(tmp_path: Path) -> None:
    """alerts_test.yml carries recorded random traffic; its generator is the file to edit."""
    out = tmp_path / "alerts_test.yml"
    result = _run(sys.executable, str(PROM_DIR / "build_alerts_test.py"), str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == (PROM_DIR / "alerts_test.yml").read_text(), \
        "edit deploy/prometheus/build_alerts_test.py and rerun it"


def test_every_alert_is_actionable_and_uses_exported_metrics() -> None:
    known = exposed_names() | PROMETHEUS_BUILTINS
    recorded = recorded_names()
    for rule in alert_rules():
        name, annotations = rule["alert"], rule["annotations"]
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert set(annotations) == {"summary", "description", "runbook_url", "dashboard_url"}, name
        assert annotations["summary"], name
        # the description says what is at stake for the data and where to look first, in plain
        # text (promtool's expected annotations repeat it, so no template values)
        assert "First check:" in annotations["description"] and "{{" not in annotations["description"], name
        assert annotations["runbook_url"] == RUNBOOK_BASE + name.lower(), name
        assert annotations["dashboard_url"].startswith(DASHBOARD_BASE + "&var-job="), name
        used = metric_names(rule["expr"])
        assert used and used <= known | recorded, f"{name} uses unknown series {used - known - recorded}"


def test_recording_rules_read_exported_metrics_and_are_all_used() -> None:
    known = exposed_names() | PROMETHEUS_BUILTINS
    rules = all_rules()
    recorded = recorded_names()
    for rule in rules:
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:depois_[a-z0-9_]+:[a-z0-9_]+", rule["record"]), \
                f"{rule['record']}: use the level:metric:operation naming convention"
            used = metric_names(rule["expr"])
            assert used and used <= known | recorded, f"{rule['record']} reads {used - known - recorded}"
    read = set().union(*(metric_names(r["expr"]) for r in rules))
    board = json.loads(DASHBOARD.read_text())
    read |= {n for p in board["panels"] for t in p["targets"] for n in metric_names(t["expr"])}
    assert recorded <= read, f"recorded but read by no alert nor panel: {recorded - read}"


# --- Grafana ----------------------------------------------------------------------------------

def raw_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_by_id(pid: int) -> dict:
    return next(p for p in raw_dashboard()["panels"] if p["id"] == pid)


def rule_threshold(alert: str, pattern: str) -> float:
    """A number out of an alert's expression, e.g. the 2 of `ratio30m >= 2`."""
    expr = next(r["expr"] for r in alert_rules() if r["alert"] == alert)
    return float(re.search(pattern, expr).group(1))


def threshold_values(panel: dict) -> list[float]:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [s["value"] for s in steps if s["value"] is not None]


def test_dashboard_panels_query_only_exported_metrics() -> None:
    board = load_dashboard(DASHBOARD)
    raw = raw_dashboard()
    known = exposed_names() | PROMETHEUS_BUILTINS | recorded_names()
    assert len({p.id for p in board.panels}) == len(board.panels)
    for panel in board.panels:
        assert panel.targets, f"panel {panel.title!r} has no query"
        for target in panel.targets:
            used = metric_names(target.expr)
            assert used, f"panel {panel.title!r} query {target.expr!r} reads no metric"
            assert used <= known, f"panel {panel.title!r} uses unknown metrics {used - known}"
            # Raises on a variable the dashboard does not define or Grafana would not fill.
            substitute_variables(resolve_dashboard_variables(target.expr, raw),
                                 rate_interval="1m", range_="1h")
    for annotation in raw["annotations"]["list"]:
        used = metric_names(annotation["expr"])
        assert used and used <= known, annotation["name"]
        substitute_variables(resolve_dashboard_variables(annotation["expr"], raw),
                             rate_interval="1m", range_="1h")


def test_every_dashboard_query_is_filtered_by_the_job_and_instance_variables() -> None:
    """Each series a panel reads is selected with the dashboard's variables, so choosing a job
    or one replica narrows every panel. Two documented exceptions: recorded job-level series
    (SLO burn, burst detector) take the job only, and the replay batch job's series are read
    from its own Pushgateway job."""
    recorded = recorded_names()
    batch = {"depois_replay_outcomes_total", "push_time_seconds"}
    raw = raw_dashboard()
    queries = [(p["title"], t["expr"]) for p in raw["panels"] for t in p["targets"]]
    queries += [(a["name"], a["expr"]) for a in raw["annotations"]["list"]]
    for title, expr in queries:
        for name in metric_names(expr):
            for m in re.finditer(rf"(?<![\w:]){re.escape(name)}(\{{[^}}]*\}})?", expr):
                matchers = m.group(1) or ""
                if name in recorded:
                    required = ['job=~"$job"']
                elif name in batch:
                    required = ['job="depois-replay"']
                else:
                    required = ['job=~"$job"', 'instance=~"$instance"']
                for r in required:
                    assert r in matchers, f"{title}: {name}{matchers} lacks {r}"


def test_dashboard_variables_and_datasource() -> None:
    raw = raw_dashboard()
    variables = dashboard_variables(raw)
    assert list(variables) == ["datasource", "job", "instance"]
    prov = REPO / "deploy" / "grafana" / "provisioning"
    provisioned = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == provisioned["type"] == "prometheus"
    assert ds["current"]["value"] == provisioned["uid"]
    for name in ("job", "instance"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".+"
        assert metric_names(v["query"]["query"]) <= exposed_names()
    assert '{job=~"$job"}' in variables["instance"]["query"]["query"], "instances of the chosen job"


def test_every_panel_axis_has_a_unit_and_record_rates_are_not_requests() -> None:
    for panel in raw_dashboard()["panels"]:
        defaults = panel["fieldConfig"]["defaults"]
        units = [defaults.get("unit", "none")] + [
            prop["value"] for o in panel["fieldConfig"]["overrides"] for prop in o["properties"]
            if prop["id"] == "unit"]
        assert "reqps" not in units, f"{panel['title']}: records are not requests"
        if panel["type"] == "table":
            continue
        assert units[0] not in ("", "none"), f"{panel['title']} has no unit"
        if panel["type"] == "timeseries":
            assert defaults["custom"]["axisLabel"], f"{panel['title']} has no axis label"
        if panel["type"] == "heatmap":
            assert panel["options"]["yAxis"]["unit"] and panel["options"]["cellValues"]["unit"]
    rates = [p for p in raw_dashboard()["panels"] if "records per second" in p["title"].lower()]
    assert rates and all(p["fieldConfig"]["defaults"]["unit"] == "count:records/s" for p in rates)


def test_dashboard_thresholds_are_the_alert_levels() -> None:
    """The lines an operator compares against are the ones that page."""
    factor = rule_threshold("DepoisPoisonSustained", r"ratio30m >= ([\d.]+)")
    assert threshold_values(panel_by_id(2))[-1] == factor  # red at the sustained alert's level
    poison = panel_by_id(7)
    (level,) = [t for t in poison["targets"] if t["expr"].startswith(f"{factor:g} * (")]
    assert "depois_target_fpr" in level["expr"]
    dashed = {o["matcher"]["options"] for o in poison["fieldConfig"]["overrides"]}
    assert level["legendFormat"] in dashed

    scores = panel_by_id(10)
    (boundary,) = [t for t in scores["targets"] if "depois_detection_boundary" in t["expr"]]
    assert boundary["legendFormat"] in {o["matcher"]["options"] for o in scores["fieldConfig"]["overrides"]}
    assert any("depois_score_bucket" in t["expr"] for t in scores["targets"])

    assert threshold_values(panel_by_id(14)) == [
        rule_threshold("DepoisConsumerLagGrowing", r"depois_consumer_lag_seconds\) > ([\d.]+)")]
    assert threshold_values(panel_by_id(29)) == [
        rule_threshold("DepoisPoisonBurst", r"zscore:burst2m >= ([\d.]+)")]
    from depois_stream.filter.app import MAX_ABANDONED_CALLS

    assert threshold_values(panel_by_id(30))[-1] == MAX_ABANDONED_CALLS  # where /healthz fails
    assert threshold_values(panel_by_id(31))[-1] == rule_threshold(
        "DepoisPartitionRestarted", r"\[1h\]\)\) >= ([\d.]+)")
    fresh_budget = float(re.search(r"/ ([\d.]+)$", next(
        r["expr"] for r in all_rules() if r.get("record") == "job:depois_slo_fresh_burn:rate1h")).group(1))
    delivered_budget = float(re.search(r"/ ([\d.]+)$", next(
        r["expr"] for r in all_rules() if r.get("record") == "job:depois_slo_delivered_burn:rate1h")).group(1))
    assert threshold_values(panel_by_id(18)) == [pytest.approx(1 - fresh_budget)]
    assert threshold_values(panel_by_id(19)) == [pytest.approx(1 - delivered_budget)]
    assert threshold_values(panel_by_id(16)) == [30]  # the freshness SLI's le="30" bucket
    burn = threshold_values(panel_by_id(17))
    assert {rule_threshold("DepoisFreshnessSLOFastBurn", r"rate1h > ([\d.]+)"),
            rule_threshold("DepoisFreshnessSLOFastBurn", r"rate6h > ([\d.]+)")} <= set(burn)


def test_dashboard_annotates_model_reloads_and_breaker_trips() -> None:
    annotations = raw_dashboard()["annotations"]["list"]
    read = {n for a in annotations for n in metric_names(a["expr"])}
    assert {"depois_model_reloads_total", "depois_circuit_breaker_trips_total",
            "depois_model_rejections_total"} <= read
    assert all(a["datasource"]["uid"] == "${datasource}" and a["enable"] for a in annotations)


def test_every_dashboard_url_opens_an_existing_panel_with_existing_variables() -> None:
    raw = raw_dashboard()
    ids = {p["id"] for p in raw["panels"]}
    variables = dashboard_variables(raw)
    for rule in alert_rules():
        url = rule["annotations"]["dashboard_url"]
        assert url.startswith(f"http://localhost:3000/d/{raw['uid']}/"), rule["alert"]
        params = dict(kv.split("=", 1) for kv in url.split("?", 1)[1].split("&"))
        assert int(params["viewPanel"]) in ids, f"{rule['alert']}: no panel {params['viewPanel']}"
        for key in params:
            if key.startswith("var-"):
                assert key[4:] in variables, f"{rule['alert']}: no variable {key[4:]}"


def test_a_table_of_several_queries_shows_them_as_one_table() -> None:
    """Grafana shows one frame per query in a table and hides the others behind a dropdown:
    the model table's fallback, target FPR, signature and build columns were invisible. A
    merge transformation joins the frames on their common labels (the instance)."""
    tables = [p for p in raw_dashboard()["panels"] if p["type"] == "table" and len(p["targets"]) > 1]
    assert tables
    for panel in tables:
        ids = [t["id"] for t in panel.get("transformations", [])]
        assert ids and ids[0] in {"merge", "joinByField"}, f"{panel['title']}: frames not joined"


def test_consumers_up_reads_as_a_share_of_the_scraped_replicas() -> None:
    """``sum(up)`` was green at one replica of three; the share is red below all of them."""
    panel = panel_by_id(1)
    (target,) = panel["targets"]
    assert target["expr"].startswith("sum(up{") and "/ count(up{" in target["expr"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert threshold_values(panel)[-1] == 1


def test_time_since_the_last_confirmed_commit_is_shown_at_the_stall_level() -> None:
    (panel,) = [p for p in raw_dashboard()["panels"]
                if any("depois_last_batch_timestamp_seconds" in t["expr"] for t in p["targets"])]
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"
    assert threshold_values(panel)[-1] == rule_threshold(
        "DepoisConsumerStalled", r"depois_last_batch_timestamp_seconds\) > ([\d.]+)")


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
            "depois_consumer_lag_seconds", "depois_inference_duration_seconds_bucket",
            "depois_dead_lettered_total", "depois_quarantined_by_label_total",
            "depois_quarantined_by_reason_total", "depois_provider_fallback", "depois_broker_up",
            "depois_client_calls_abandoned", "depois_partition_restarts_total",
            "depois_delivery_failures_total", "depois_forged_headers_total", "depois_target_fpr",
            "depois_replay_outcomes_total", "job:depois_slo_fresh_burn:rate1h",
            "job:depois_slo_delivered_burn:rate1h", "depois_last_batch_timestamp_seconds",
            "depois_group_joined", "depois_partitions_assigned"} <= everything
    quantiles = [t.expr for p in board.panels for t in p.targets
                 if "depois_inference_duration_seconds_bucket" in t.expr]
    levels = {re.search(r"histogram_quantile\(([\d.]+)", q).group(1) for q in quantiles}
    assert levels >= {"0.5", "0.95", "0.99"}


def test_grafana_provisioning_points_at_the_dashboard_and_its_datasource() -> None:
    prov = REPO / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((prov / "dashboards" / "depois.yml").read_text())["providers"][0]
    raw = raw_dashboard()
    uids = {p["datasource"]["uid"] for p in raw["panels"]} | {
        t["datasource"]["uid"] for p in raw["panels"] for t in p["targets"]}
    assert uids == {"${datasource}"}, "every panel follows the datasource variable"
    assert dashboard_variables(raw)["datasource"]["current"]["value"] == datasource["uid"]
    assert datasource["url"] == "http://prometheus:9090"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


# --- docs -------------------------------------------------------------------------------------

def test_operations_doc_lists_every_metric_and_every_alert() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    table = set(re.findall(r"^\| `(depois_[a-z0-9_]+)`", doc, flags=re.M))
    names = {f.name + {"counter": "_total", "info": "_info"}.get(f.type, "") for f in families()
             if f.name.startswith("depois_")}  # process_*: prometheus-client's own, documented once
    assert table == names, "docs/operations.md's metrics table is out of date"
    sections = set(re.findall(r"^### (Depois\w+)", doc, flags=re.M))
    assert sections == {r["alert"] for r in alert_rules()}, "each alert needs a runbook section"


def test_every_runbook_url_lands_on_a_runbook_section() -> None:
    """The runbook_url fragment is the GitHub anchor of a heading that holds a real runbook."""
    doc = (REPO / "docs" / "operations.md").read_text()
    headings = re.split(r"^### ", doc, flags=re.M)[1:]
    sections = {github_anchor(h.split("\n", 1)[0]): h.split("\n", 1)[1].split("\n## ")[0]
                for h in headings}
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook_url"].removeprefix(RUNBOOK_BASE)
        assert anchor in sections, f"{rule['alert']}: no heading with anchor #{anchor}"
        body = sections[anchor]
        first_line = body.strip().split("\n", 1)[0]
        assert first_line.startswith(f"*Severity:* {rule['labels']['severity']}"), \
            f"{rule['alert']}'s runbook must open with its severity, not {first_line!r}"
        for part in ("*Meaning:*", "*First check:*", "*Action:*"):
            assert part in body, f"{rule['alert']}'s runbook lacks {part}"
