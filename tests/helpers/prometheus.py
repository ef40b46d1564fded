"""A real Prometheus server for tests: loopback only, temporary storage, fast scrapes.

The point of the observability tests is that the dashboard and the alert rules work against the
Prometheus that runs them in production, not against our idea of PromQL; so this starts the real
binary (Debian's `prometheus` package) with the repository's alert rules loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from depois_stream.sim.broker import free_port

REPO = Path(__file__).resolve().parents[2]
ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yml"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


class _Server:
    """A loopback server process started from a command line, ready when ``ready_path`` answers."""

    name = "server"  # also the log file's stem
    ready_path = "/-/ready"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout_s: float = 30.0):
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}{self.ready_path}", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout_s} s")

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PrometheusServer(_Server):
    """``with PrometheusServer(tmp, targets=["127.0.0.1:9108"]) as prom: prom.url``.

    Targets are scraped as job ``depois-consumer``, the job name the alert rules and the
    dashboard expect; rules are evaluated as often as targets are scraped.
    """

    name = "prometheus"

    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str = "1s",
                 rule_files: list[Path] | None = None, alertmanagers: list[str] | None = None,
                 extra_scrape_configs: list[dict] | None = None) -> None:
        super().__init__(workdir)
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(p) for p in (rule_files if rule_files is not None else [ALERT_RULES])],
            "scrape_configs": [{"job_name": "depois-consumer",
                                "static_configs": [{"targets": targets}]}]
                              + list(extra_scrape_configs or []),
        }
        if alertmanagers:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": alertmanagers}]}]}
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))

    def command(self) -> list[str]:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed: apt-get install prometheus")
        return [binary, f"--config.file={self.config_path}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                "--storage.tsdb.retention.time=1h", "--log.level=warn"]

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict]:
        """Instant query; the raw result list (raises on a PromQL error)."""
        import urllib.parse

        body = self.api("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for_target_up(self, timeout_s: float = 20.0) -> None:
        """Block until every target was scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = self.api("/api/v1/targets")["data"]["activeTargets"]
            if active and all(t["health"] == "up" for t in active):
                return
            time.sleep(0.2)
        raise AssertionError(f"targets never came up: {self.api('/api/v1/targets')}")



# --- the dashboard's template variables ---------------------------------------------------------

def dashboard_variables(board: dict) -> dict[str, dict]:
    """name -> definition of each template variable of a dashboard JSON."""
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def resolve_dashboard_variables(expr: str, board: dict, values: dict[str, str] | None = None) -> str:
    """Fill the dashboard's own variables in a query, as Grafana would before sending it.

    A variable named in ``values`` gets that value (regex-escaped, since the dashboard matches
    with ``=~``); any other gets its "All" value. Grafana's built-ins ($__rate_interval,
    $__range) are left for depois_stream.audit.report.substitute_variables. Raises KeyError on a
    variable the dashboard does not define.
    """
    import re

    variables = dashboard_variables(board)
    values = values or {}

    def fill(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name.startswith("__"):
            return m.group(0)
        variable = variables[name]
        if name in values:
            return re.escape(values[name]).replace("\\", "\\\\")
        return variable["allValue"]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", fill, expr)


# --- Alertmanager and Pushgateway ----------------------------------------------------------------

def binary(*names: str) -> str | None:
    """The first of ``names`` on PATH or in /usr/bin (Debian's package names)."""
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    return None


def alertmanager_binary() -> str | None:
    return binary("prometheus-alertmanager", "alertmanager")


def pushgateway_binary() -> str | None:
    return binary("prometheus-pushgateway", "pushgateway")


class AlertmanagerServer(_Server):
    """A real Alertmanager on loopback with the given config file; no cluster gossip port."""

    name = "alertmanager"

    def __init__(self, workdir: Path, config: Path) -> None:
        super().__init__(workdir)
        self.config = Path(config)

    def command(self) -> list[str]:
        return [alertmanager_binary() or "alertmanager", f"--config.file={self.config}",
                f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
                "--log.level=warn"]

    def alerts(self, **filters: str) -> list[dict]:
        import urllib.parse

        query = "&".join("filter=" + urllib.parse.quote(f'{k}="{v}"') for k, v in filters.items())
        return self.get(f"/api/v2/alerts?{query}")


class PushgatewayServer(_Server):
    """A real Pushgateway on loopback, without persistence."""

    name = "pushgateway"

    def command(self) -> list[str]:
        # Debian's build persists to /var/lib/prometheus/pushgateway.data unless told not to,
        # which would leak one test's pushes into the next run.
        return [pushgateway_binary() or "pushgateway",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                "--persistence.file="]
