"""The Kubernetes manifests are rendered and validated by the tools a cluster would use, offline.

Every overlay is rendered with ``kubectl kustomize``; every rendered object is validated with
strict field checking: core kinds against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships (oldest supported and newest version), the KEDA and
prometheus-operator kinds against CRD schemas in ``tests/fixtures/crds`` (and, when
``DEPOIS_UPSTREAM_CRDS`` names a folder holding the projects' own CRD YAML files, against those
too). Then the wiring a schema cannot see: probes and ports agree with the DEPOIS_* settings, the
PrometheusRule is alerts.yml, the autoscalers stop at the partition count and freeze while a
circuit breaker is open (checked by evaluating the KEDA formula and, with promtool, the
prometheus-adapter query).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
PRODUCTION = [o for o in OVERLAYS if o.startswith("production")]
CRD_FIXTURES = REPO / "tests" / "fixtures" / "crds"
# Oldest Kubernetes we claim (policy/v1 PDB, autoscaling/v2 HPA, sizeLimit) and the newest schemas.
K8S_VERSIONS = ("1.27.0", "1.37.0")
CORE_GROUPS = {"v1", "apps/v1", "policy/v1", "autoscaling/v2"}
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
             ("monitoring.coreos.com/v1", "PrometheusRule")}


def _load_generate():
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generate()


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (its built-in kustomize renders the overlays)")
    return path


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def render(overlay: str) -> list[dict[str, Any]]:
    if overlay not in _RENDERED:
        out = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"kubectl kustomize {overlay} failed: {out.stderr}"
        _RENDERED[overlay] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _RENDERED[overlay]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
                if c["name"] == "depois-stream")


def settings(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The DEPOIS_* environment of the filter container: envFrom ConfigMaps, then env."""
    c = container(docs)
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def _quantity(text: str) -> float:
    """A Kubernetes quantity ("500m", "1", "64Mi", "2Gi") as a number."""
    units = {"": 1.0, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text).strip())
    assert m and m.group(2) in units, f"not a quantity this test knows: {text!r}"
    return float(m.group(1)) * units[m.group(2)]


def strict(schema: Any) -> Any:
    """Reject unknown fields, as `kubectl apply` (strict field validation) does by default."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], list[tuple[str, dict]]]:
    """(apiVersion, kind) -> [(source, openAPIV3Schema)]: our fixtures, plus upstream CRDs."""
    schemas: dict[tuple[str, str], list[tuple[str, dict]]] = {k: [] for k in CRD_KINDS}
    for path in sorted(CRD_FIXTURES.glob("*.json")):
        group, version, kind = path.stem.split("_")
        api = f"{group}/{version}"
        schemas[(api, kind)].append((path.name, json.loads(path.read_text())["openAPIV3Schema"]))
    upstream = os.environ.get("DEPOIS_UPSTREAM_CRDS")
    if upstream:
        for path in sorted(Path(upstream).glob("*.y*ml")):
            crd = yaml.safe_load(path.read_text())
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                if key in schemas:
                    schemas[key].append((path.name, version["schema"]["openAPIV3Schema"]))
    return schemas


def validate_crd(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of a custom resource, per schema source."""
    import jsonschema

    key = (doc["apiVersion"], doc["kind"])
    sources = crd_schemas().get(key)
    assert sources, f"no schema for {key}: add one to tests/fixtures/crds"
    errors = []
    for source, schema in sources:
        validator = jsonschema.Draft7Validator(strict(schema))
        errors += [f"{source}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
                   for e in validator.iter_errors(doc)]
    return errors


def validate_core(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install '.[deploy-check]' (kubernetes-validate)")
    kubernetes_validate.validate(doc, version, strict=True)


# --- rendering and schemas ---------------------------------------------------------------------

def test_the_expected_overlays_exist() -> None:
    assert {"dev", "production-keda", "production-hpa"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_every_overlay_validates(overlay: str) -> None:
    pytest.importorskip("jsonschema", reason="pip install '.[deploy-check]'")
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ServiceAccount"} <= kinds
    for doc in docs:
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] in CORE_GROUPS:
            for version in K8S_VERSIONS:
                try:
                    validate_core(doc, version)
                except Exception as exc:  # kubernetes_validate.ValidationError and friends
                    pytest.fail(f"{where} is invalid for Kubernetes {version}: {exc}")
        else:
            assert (doc["apiVersion"], doc["kind"]) in CRD_KINDS, f"{where}: kind not validated"
            assert not validate_crd(doc), f"{where}: {validate_crd(doc)}"


def test_the_validators_reject_what_a_cluster_would_reject() -> None:
    """Without these the test above could pass on anything."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render("production-keda")
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(deployment, K8S_VERSIONS[-1])
    scaled = copy.deepcopy(one(docs, "ScaledObject"))
    scaled["spec"]["maxReplicas"] = 6  # the HPA's spelling, not KEDA's
    assert any("maxReplicas" in e for e in validate_crd(scaled))
    scaled = copy.deepcopy(one(docs, "ScaledObject"))
    scaled["spec"]["advanced"]["scalingModifiers"]["metricType"] = "Utilization"
    assert validate_crd(scaled)
    rule = copy.deepcopy(one(docs, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert validate_crd(rule)


# --- the filter Deployment ---------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_ports_and_shutdown_match_the_settings(overlay: str) -> None:
    docs = render(overlay)
    deployment, c, env = one(docs, "Deployment"), container(docs), settings(docs)
    pod = deployment["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert env["DEPOIS_METRICS_HOST"] == "0.0.0.0", "127.0.0.1 is unreachable for probes"
    assert ports["metrics"] == int(env["DEPOIS_METRICS_PORT"])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    # SIGTERM finishes the batch and commits (< 10 s): the grace period leaves margin for it.
    assert 30 <= pod["terminationGracePeriodSeconds"] <= 60
    assert c["args"] == ["run"] and "command" not in c
    requests = c["resources"]["requests"]
    assert requests.get("cpu") and requests.get("memory") and c["resources"]["limits"]["memory"]
    # Runs as the image's unprivileged user on a read-only root file system.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # The breaker's resume flag directory is writable; /tmp exists.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert env["DEPOIS_CONTROL_DIR"] in mounts and not mounts[env["DEPOIS_CONTROL_DIR"]].get("readOnly")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_is_mounted_read_only_from_a_volume_or_fetched_by_an_init_container(overlay: str) -> None:
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c, env = container(docs), settings(docs)
    model_dir = str(Path(env["DEPOIS_MODEL_PATH"]).parent)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == model_dir)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim
                   for d in docs)
        assert not pod.get("initContainers")
    else:
        assert "emptyDir" in volume
        init = pod["initContainers"][0]
        assert init["image"] == c["image"], "the fetcher is the same image (no extra dependency)"
        init_mount = next(m for m in init["volumeMounts"] if m["name"] == mount["name"])
        assert not init_mount.get("readOnly")
        script = init["args"][0]
        compile(script, "fetch-model", "exec")  # the inline Python is at least valid Python
        assert all(f in script for f in ("model.onnx", "model.card.json", "model.sig"))
        assert not any(d["kind"] == "PersistentVolumeClaim" for d in docs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_pdb_select_the_filter_pods(overlay: str) -> None:
    docs = render(overlay)
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service, pdb = one(docs, "Service"), one(docs, "PodDisruptionBudget")
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    # The operator names the job after the Service: it must be the job the alerts query.
    assert f'job="{service["metadata"]["name"]}"' in (REPO / "deploy/prometheus/alerts.yml").read_text()


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_production_verifies_model_signatures_and_pins_the_image(overlay: str) -> None:
    docs = render(overlay)
    env, c = settings(docs), container(docs)
    key = Path(env["DEPOIS_VERIFY_SIGNATURE"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(key.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True
    assert volume["configMap"]["name"] == "depois-model-signing-key"
    assert volume["configMap"]["items"] == [{"key": key.name, "path": key.name}]
    assert not c["image"].endswith(":latest") and ":" in c["image"]


def test_dev_runs_unsigned_on_purpose() -> None:
    assert "DEPOIS_VERIFY_SIGNATURE" not in settings(render("dev"))


# --- monitoring --------------------------------------------------------------------------------

def test_generated_monitoring_files_are_up_to_date() -> None:
    assert not generate.stale(), "run python deploy/kubernetes/generate.py and commit the result"


def test_generator_notices_an_edited_alerts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edited = tmp_path / "alerts.yml"
    edited.write_text(generate.ALERTS.read_text().replace("for: 5m", "for: 6m", 1))
    monkeypatch.setattr(generate, "ALERTS", edited)
    assert generate.OUT / "prometheusrule.yaml" in generate.stale()


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_prometheus_rule_carries_exactly_the_alert_groups(overlay: str) -> None:
    rule = one(render(overlay), "PrometheusRule")
    alerts = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    monitor = one(render(overlay), "ServiceMonitor")
    service = one(render(overlay), "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_dashboard_configmap_is_the_dashboard(overlay: str) -> None:
    cm = next(d for d in render(overlay)
              if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1")
    dashboard = (REPO / "deploy/grafana/dashboards/depois.json")
    assert json.loads(cm["data"]["depois.json"]) == json.loads(dashboard.read_text())
    # client-side `kubectl apply` stores the object in an annotation limited to 256 KiB
    assert len(cm["data"]["depois.json"]) < 200 * 1024


def test_dev_uses_scrape_annotations_instead_of_the_operator() -> None:
    docs = render("dev")
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == settings(docs)["DEPOIS_METRICS_PORT"]
    assert not any(d["kind"] in {"ServiceMonitor", "PrometheusRule", "ScaledObject"} for d in docs)


# --- autoscaling -------------------------------------------------------------------------------

def compose_partitions() -> int:
    match = re.search(r"PARTITIONS: \$\{DEPOIS_PARTITIONS:-(\d+)\}",
                      (REPO / "docker-compose.yml").read_text())
    assert match, "docker-compose.yml no longer states the default partition count"
    return int(match.group(1))


def evaluate_formula(formula: str, values: dict[str, float]) -> float:
    """KEDA's `cond ? a : b` formulas (expr-lang), for the operators our formula uses."""
    m = re.fullmatch(r"\s*(.+?)\s*\?\s*(.+?)\s*:\s*(.+?)\s*", formula)
    parts = [m.group(1), m.group(2), m.group(3)] if m else [formula]
    for part in parts:
        assert re.fullmatch(r"[\w\s.*+\-/<>=()]+", part), f"unsupported formula syntax: {part}"
    env = {"__builtins__": {}, **values}
    if len(parts) == 1:
        return float(eval(parts[0], env))  # noqa: S307  (checked: names, numbers, arithmetic)
    return float(eval(parts[1] if eval(parts[0], env) else parts[2], env))  # noqa: S307


def test_keda_scales_on_group_lag_up_to_the_partition_count() -> None:
    docs = render("production-keda")
    so, env = one(docs, "ScaledObject"), settings(docs)
    deployment = one(docs, "Deployment")
    assert so["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert so["spec"]["scaleTargetRef"]["envSourceContainerName"] == container(docs)["name"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    partitions = int(so["metadata"]["annotations"]["depois.io/ingest-partitions"])
    assert so["spec"]["maxReplicaCount"] == partitions == compose_partitions()
    kafka = next(t for t in so["spec"]["triggers"] if t["type"] == "kafka")
    meta = kafka["metadata"]
    # The scaler watches the group and topic the members use, read from their own settings.
    assert {meta["bootstrapServersFromEnv"], meta["consumerGroupFromEnv"],
            meta["topicFromEnv"]} <= env.keys()
    assert meta["allowIdleConsumers"] == "false"
    assert meta["offsetResetPolicy"] == env.get("DEPOIS_AUTO_OFFSET_RESET", "earliest")
    modifiers = so["spec"]["advanced"]["scalingModifiers"]
    assert modifiers["metricType"] == "AverageValue"
    assert meta["lagThreshold"] == modifiers["target"]
    assert so["spec"]["fallback"]["behavior"] == "currentReplicas"


def test_keda_breaker_queries_watch_this_deployment() -> None:
    docs = render("production-keda")
    so = one(docs, "ScaledObject")
    namespace = one(docs, "Deployment")["metadata"]["namespace"]
    job = one(docs, "Service")["metadata"]["name"]
    names = {t.get("name") for t in so["spec"]["triggers"]}
    formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
    assert set(re.findall(r"[a-z_]+", formula)) <= names, "formula uses an unnamed trigger"
    exported = {"depois_circuit_breaker_open", "depois_group_joined"}
    for t in so["spec"]["triggers"]:
        if t["type"] == "prometheus":
            query = t["metadata"]["query"]
            assert f'namespace="{namespace}"' in query and f'job="{job}"' in query, query
            assert set(re.findall(r"depois_[a-z_]+", query)) <= exported


def _simulate(formula: str, target: float, partitions: int, minimum: int, replicas: int,
              breaker_open: bool, lag_series: list[int]) -> list[int]:
    """Replica counts an HPA driven by the formula reaches while lag follows ``lag_series``.

    Models KEDA's Kafka scaler (value capped at partitions * lagThreshold when idle consumers
    are not allowed) and the HPA rule for an AverageValue target (ceil(value / target), clamped
    to [min, max]); each step the members are the replicas of the step before."""
    out = []
    for lag in lag_series:
        capped = min(lag, partitions * target)
        value = evaluate_formula(formula, {"lag": capped, "breaker_open": float(breaker_open),
                                           "members": float(replicas)})
        replicas = max(minimum, min(partitions, math.ceil(value / target)))
        out.append(replicas)
    return out


def test_an_open_breaker_freezes_keda_scaling_whatever_the_lag() -> None:
    so = one(render("production-keda"), "ScaledObject")["spec"]
    formula = so["advanced"]["scalingModifiers"]["formula"]
    target = float(so["advanced"]["scalingModifiers"]["target"])
    growing = [10 ** k for k in range(2, 10)]  # a paused member's lag grows without bound
    frozen = _simulate(formula, target, so["maxReplicaCount"], so["minReplicaCount"], 2,
                       breaker_open=True, lag_series=growing)
    assert frozen == [2] * len(growing)
    # The same lag with the breaker closed scales out, one partition's worth at a time, to P.
    free = _simulate(formula, target, so["maxReplicaCount"], so["minReplicaCount"], 2,
                     breaker_open=False, lag_series=[0, int(target * 2.5), *growing])
    assert free[0] == 1 and free[1] == 3 and free[-1] == so["maxReplicaCount"]
    # A plain lag trigger would have gone to the maximum: this is what the formula prevents.
    naive = _simulate("lag", target, so["maxReplicaCount"], so["minReplicaCount"], 2,
                      breaker_open=True, lag_series=growing)
    assert naive[-1] == so["maxReplicaCount"]


def test_hpa_alternative_has_the_same_bounds_and_target_as_its_adapter_rule() -> None:
    docs = render("production-hpa")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in one(docs, "Deployment")["spec"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    partitions = int(hpa["metadata"]["annotations"]["depois.io/ingest-partitions"])
    assert hpa["spec"]["maxReplicas"] == partitions == compose_partitions()
    metric = hpa["spec"]["metrics"][0]["external"]
    rule = adapter_rule()
    assert metric["metric"]["name"] == rule["name"]["as"]
    assert metric["target"]["type"] == "AverageValue"
    assert f"* {metric['target']['averageValue']}" in rule["metricsQuery"]
    keda = one(render("production-keda"), "ScaledObject")["spec"]
    assert hpa["spec"]["behavior"] == keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert metric["target"]["averageValue"] == keda["advanced"]["scalingModifiers"]["target"]


def adapter_rule() -> dict[str, Any]:
    rules = yaml.safe_load((K8S / "components/hpa/prometheus-adapter-rules.yaml").read_text())
    (rule,) = rules["externalRules"]
    return rule


def test_adapter_query_freezes_on_an_open_breaker_in_promtool(tmp_path: Path) -> None:
    """Evaluate the adapter's PromQL as a recording rule with promtool's unit-test runner."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (CI installs it: see .ci/run)")
    query = adapter_rule()["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="depois"')
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "depois_scaling_lag", "expr": query}]}]}))
    lag = 'depois_consumer_lag{{namespace="depois",job="depois-consumer",topic="depois.ingest",partition="{p}",pod="{pod}"}}'
    member = '{name}{{namespace="depois",job="depois-consumer",pod="{pod}"}}'
    series = [
        # breaker closed: partition 1 is reported by two members mid-rebalance (counted once)
        {"series": lag.format(p=0, pod="a"), "values": "3000x10"},
        {"series": lag.format(p=1, pod="a"), "values": "9000x10"},
        {"series": lag.format(p=1, pod="b"), "values": "9000x10"},
        {"series": member.format(name="depois_circuit_breaker_open", pod="a"), "values": "0x4 1x5"},
        {"series": member.format(name="depois_circuit_breaker_open", pod="b"), "values": "0x10"},
        {"series": member.format(name="depois_group_joined", pod="a"), "values": "1x10"},
        {"series": member.format(name="depois_group_joined", pod="b"), "values": "1x10"},
        {"series": member.format(name="depois_group_joined", pod="c"), "values": "1x10"},
    ]
    expect = [
        {"expr": "depois_scaling_lag", "eval_time": "2m",
         "exp_samples": [{"labels": 'depois_scaling_lag{namespace="depois"}', "value": 12000}]},
        # pod a's breaker opens at 5m: the value is 3 members * 5000, whatever the lag
        {"expr": "depois_scaling_lag", "eval_time": "7m",
         "exp_samples": [{"labels": 'depois_scaling_lag{namespace="depois"}', "value": 15000}]},
    ]
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": expect}]}))
    out = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_scale_up_adds_one_member_at_a_time() -> None:
    """Each join is a group-wide rebalance: never add several members in one step."""
    behavior = one(render("production-keda"), "ScaledObject")["spec"]["advanced"][
        "horizontalPodAutoscalerConfig"]["behavior"]
    for direction in ("scaleUp", "scaleDown"):
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in behavior[direction]["policies"])
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_an_empty_prometheus_answer_falls_back_instead_of_unfreezing() -> None:
    """With ``ignoreNullValues: true`` (KEDA's default) an empty result is the value 0, not an
    error: a Prometheus that does not scrape the members (a kube-prometheus-stack whose selector
    misses the ServiceMonitor) turned ``breaker_open`` into 0 and the formula into plain lag, the
    scale-to-maximum on every trip the freeze exists to prevent. As an error, the fallback keeps
    the current replica count."""
    so = one(render("production-keda"), "ScaledObject")["spec"]
    prometheus = [t for t in so["triggers"] if t["type"] == "prometheus"]
    assert prometheus
    for t in prometheus:
        assert t["metadata"].get("ignoreNullValues") == "false", t["name"]
    assert so["fallback"]["behavior"] == "currentReplicas"


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_tmp_holds_a_copy_of_the_model_for_the_signature_check(overlay: str) -> None:
    """Verifying a signature writes a private copy of the model and its card under $TMPDIR
    (depois_stream/contract/signing.py): a /tmp smaller than the model got the pod evicted at
    every start and hot reload (64 MiB against a 1 GiB model volume)."""
    docs = render(overlay)
    assert settings(docs).get("DEPOIS_VERIFY_SIGNATURE"), "production verifies signatures"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    size = next(v for v in pod["volumes"] if v["name"] == tmp["name"])["emptyDir"]["sizeLimit"]
    model_dir = str(Path(settings(docs)["DEPOIS_MODEL_PATH"]).parent)
    model_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == model_dir)
    model_volume = next(v for v in pod["volumes"] if v["name"] == model_mount["name"])
    if "persistentVolumeClaim" in model_volume:
        claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
        model_size = claim["spec"]["resources"]["requests"]["storage"]
    else:
        model_size = model_volume["emptyDir"]["sizeLimit"]
    assert _quantity(size) >= _quantity(model_size), (size, model_size)


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_each_member_is_given_the_core_the_docs_say_it_needs(overlay: str) -> None:
    """docs/operations.md: a member uses about one core at full backlog, "give each pod a core
    (requests.cpu)"; a 500m request let two busy members share one core exactly when the
    autoscaler adds them, delaying heartbeats into rebalances. (The dev overlay asks for 250m on
    purpose: one member on a laptop cluster.)"""
    cpu = container(render(overlay))["resources"]["requests"]["cpu"]
    assert _quantity(str(cpu)) >= 1, cpu


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_scorer_uses_as_many_threads_as_the_pod_requests_cores(overlay: str) -> None:
    """Left at 0, onnxruntime starts a thread per core the pod sees: every core of the node,
    since the pods set no CPU limit. Several members on a 64-core node each ran 64 scoring
    threads over their one requested core (docs/operations.md told the operator to set it;
    no manifest did)."""
    env = {e["name"]: e for e in container(render(overlay)).get("env", [])}
    ref = env["DEPOIS_SCORER_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "requests.cpu" and str(ref.get("divisor", "1")) == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_drain_during_a_broker_outage_can_evict_unready_members(overlay: str) -> None:
    """During a Kafka outage every member is unready (/readyz); with the default eviction policy
    the budget then counts them all as disrupted and blocks every eviction: a node drain hangs
    until Kafka is back."""
    pdb = one(render(overlay), "PodDisruptionBudget")
    assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
