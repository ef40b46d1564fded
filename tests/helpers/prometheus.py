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

from depois_stream.broker import free_port

REPO = Path(__file__).resolve().parents[2]
ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yml"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


class PrometheusServer:
    """``with PrometheusServer(tmp, targets=["127.0.0.1:9108"]) as prom: prom.url``.

    Targets are scraped as job ``depois-consumer``, the job name the alert rules and the
    dashboard expect; rules are evaluated as often as targets are scraped.
    """

    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str = "1s",
                 rule_files: list[Path] | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(p) for p in (rule_files if rule_files is not None else [ALERT_RULES])],
            "scrape_configs": [{"job_name": "depois-consumer",
                                "static_configs": [{"targets": targets}]}],
        }
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed: apt-get install prometheus")
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready within {timeout_s} s")

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as r:
            return json.loads(r.read())

    def wait_for_target_up(self, timeout_s: float = 20.0) -> None:
        """Block until every target was scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = self.api("/api/v1/targets")["data"]["activeTargets"]
            if active and all(t["health"] == "up" for t in active):
                return
            time.sleep(0.2)
        raise AssertionError(f"targets never came up: {self.api('/api/v1/targets')}")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the dashboard's template variables ---------------------------------------------------------

def dashboard_variables(board: dict) -> dict[str, dict]:
    """name -> definition of each template variable of a dashboard JSON."""
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def resolve_dashboard_variables(expr: str, board: dict, values: dict[str, str] | None = None) -> str:
    """Fill the dashboard's own variables in a query, as Grafana would before sending it.

    A variable named in ``values`` gets that value (regex-escaped, since the dashboard matches
    with ``=~``); any other gets its "All" value. Grafana's built-ins ($__rate_interval,
    $__range) are left for depois_stream.report.substitute_variables. Raises KeyError on a
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
