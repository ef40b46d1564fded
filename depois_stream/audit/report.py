"""`depois-stream report`: the Grafana dashboard rendered to one PNG through Prometheus' HTTP API.

Operators look at Grafana, but a Grafana screenshot needs Grafana and a browser, which CI, an
incident ticket or an air-gapped review do not have. The report reads every panel's queries from
the dashboard JSON itself (deploy/grafana/dashboards/depois.json), so the picture and the
dashboard cannot drift apart: a query that breaks in one breaks in the other.

Grafana's own variables ($__rate_interval, $__range) are substituted with explicit values before
a query leaves this module; Prometheus would reject them. matplotlib is imported only when a PNG
is drawn, so the runtime image does not need it unless someone runs this command.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field

# The dashboard ships inside the package (a copy of deploy/grafana/dashboards/depois.json, kept
# identical by tests/test_report.py), so the default works from any directory and any install.
DEFAULT_DASHBOARD = Path(__file__).with_name("dashboard.json")

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d|w)$")
_DURATION_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LEGEND_VAR = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or rejected a query; the message carries its error."""


# --- the dashboard ---------------------------------------------------------------------------

class Target(BaseModel):
    """One query of a Grafana panel (only the fields the report uses)."""

    model_config = ConfigDict(extra="ignore")

    ref_id: str = Field(alias="refId")
    expr: str
    legend_format: str = Field("", alias="legendFormat")
    instant: bool = False


class Panel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    type: str
    title: str
    targets: list[Target] = Field(default_factory=list)
    field_config: dict[str, Any] = Field(default_factory=dict, alias="fieldConfig")

    @property
    def unit(self) -> str:
        return str(self.field_config.get("defaults", {}).get("unit", "none"))

    @property
    def percent(self) -> bool:
        """Grafana's ``percentunit`` stores fractions (0.2) and shows percentages (20 %)."""
        return self.unit == "percentunit"


class Dashboard(BaseModel):
    model_config = ConfigDict(extra="ignore")

    uid: str
    title: str
    panels: list[Panel]
    templating: dict[str, Any] = Field(default_factory=dict)

    @property
    def variables(self) -> dict[str, str]:
        """Query variables ($job, $instance) with the value Grafana sends for "All": the report
        shows the whole fleet, as the dashboard does when nothing is selected."""
        return {v["name"]: str(v.get("allValue") or ".+")
                for v in self.templating.get("list", []) if v.get("type") in ("query", "custom")}


def load_dashboard(path: str | Path) -> Dashboard:
    return Dashboard.model_validate_json(Path(path).read_text())


def parse_duration(text: str) -> float:
    """Prometheus duration ('90s', '15m', '1h') -> seconds; only the single-unit forms."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h)")
    return int(m.group(1)) * _DURATION_S[m.group(2)]


def substitute_variables(expr: str, *, rate_interval: str, range_: str,
                         variables: dict[str, str] | None = None) -> str:
    """Replace the Grafana variables the dashboard uses; refuse any other ``$`` variable.

    ``variables``: the dashboard's own (``$job``, ``${instance}``) and their values. Refusing the
    rest matters: an unknown variable would reach Prometheus as a parse error, or worse, a panel
    would silently show something else than Grafana does.
    """
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    for name, value in (variables or {}).items():
        out = re.sub(r"\$\{" + re.escape(name) + r"\}|\$" + re.escape(name) + r"\b",
                     lambda _m: value, out)
    leftover = re.findall(r"\$\{?\w+", out)
    if leftover:
        raise ValueError(f"query uses Grafana variables the report cannot fill: {leftover}: {expr}")
    return out


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana legendFormat ('{{destination}}') filled from a series' labels."""
    if not template:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return _LEGEND_VAR.sub(lambda m: labels.get(m.group(1), ""), template).strip()


# --- Prometheus' HTTP API --------------------------------------------------------------------

class _Result(BaseModel):
    metric: dict[str, str]
    value: tuple[float, str] | None = None
    values: list[tuple[float, str]] = Field(default_factory=list)


class _Data(BaseModel):
    result_type: str = Field(alias="resultType")
    result: list[Any]


class _Response(BaseModel):
    status: Literal["success", "error"]
    data: _Data | None = None
    error_type: str | None = Field(None, alias="errorType")
    error: str | None = None


@dataclass
class Series:
    """One labelled series; ``times`` and ``values`` have equal length (1 for an instant query)."""

    labels: dict[str, str]
    times: list[float]
    values: list[float]


class PrometheusClient:
    """Minimal client for ``/api/v1/query`` and ``/api/v1/query_range`` (standard library only)."""

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        params = {"query": expr}
        if at is not None:
            params["time"] = repr(at)
        return self._get("/api/v1/query", params)

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[Series]:
        return self._get("/api/v1/query_range",
                         {"query": expr, "start": repr(start), "end": repr(end), "step": repr(step_s)})

    def _get(self, path: str, params: dict[str, str]) -> list[Series]:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
            body = exc.read()
        except urllib.error.URLError as exc:
            raise PrometheusError(f"cannot reach Prometheus at {self.base_url}: {exc.reason}; "
                                  "is it running? (--prometheus-url)") from exc
        resp_model = _Response.model_validate(json.loads(body))
        if resp_model.status != "success" or resp_model.data is None:
            raise PrometheusError(f"{resp_model.error_type}: {resp_model.error} "
                                  f"(query: {params['query']})")
        if resp_model.data.result_type not in ("vector", "matrix"):
            raise PrometheusError(f"query returned a {resp_model.data.result_type}, "
                                  f"expected a vector or matrix: {params['query']}")
        return [_series(_Result.model_validate(r)) for r in resp_model.data.result]


def _series(r: _Result) -> Series:
    points = r.values if r.values else ([r.value] if r.value else [])
    return Series(labels=r.metric, times=[float(t) for t, _ in points],
                  values=[float(v) for _, v in points])


# --- collecting a panel's data ---------------------------------------------------------------

@dataclass
class PanelData:
    panel: Panel
    series: list[tuple[str, Series]] = field(default_factory=list)  # (legend, series)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Window:
    """The time range a report covers and the values it gives Grafana's variables."""

    end: float
    range_: str
    rate_interval: str

    @property
    def start(self) -> float:
        return self.end - parse_duration(self.range_)

    @property
    def step_s(self) -> float:
        """About 240 points per series: smooth lines without asking for every scrape."""
        return max(1.0, math.ceil(parse_duration(self.range_) / 240))


def panel_queries(panel: Panel, window: Window,
                  variables: dict[str, str] | None = None) -> list[tuple[Target, str]]:
    """The panel's targets with the PromQL that is actually sent for each."""
    return [(t, substitute_variables(t.expr, rate_interval=window.rate_interval,
                                     range_=window.range_, variables=variables))
            for t in panel.targets]


def collect(client: PrometheusClient, dashboard: Dashboard, window: Window) -> list[PanelData]:
    """Run every panel's queries; a failing query is kept as that panel's error, not raised."""
    out = []
    for panel in dashboard.panels:
        data = PanelData(panel)
        for target, expr in panel_queries(panel, window, dashboard.variables):
            try:
                if target.instant:
                    series = client.query(expr, at=window.end)
                else:
                    series = client.query_range(expr, window.start, window.end, window.step_s)
            except PrometheusError as exc:
                data.errors.append(f"{target.ref_id}: {exc}")
                continue
            data.series += [(legend(target.legend_format, s.labels), s) for s in series]
        out.append(data)
    return out


# --- drawing ---------------------------------------------------------------------------------

def heatmap_matrix(series: list[Series]) -> tuple[list[str], list[float], list[list[float]]]:
    """Cumulative ``le`` bucket series -> (bucket names, times, per-bucket counts [bucket][time]).

    Prometheus histograms are cumulative (each ``le`` counts everything at or below it); a
    heatmap wants each bucket on its own, so neighbouring buckets are subtracted.
    """
    by_le = sorted(series, key=lambda s: float(s.labels.get("le", "inf")))
    times = sorted({t for s in by_le for t in s.times})
    index = {t: i for i, t in enumerate(times)}
    cum = []
    for s in by_le:
        row = [0.0] * len(times)
        for t, v in zip(s.times, s.values):
            row[index[t]] = v if math.isfinite(v) else 0.0
        cum.append(row)
    counts = [[max(0.0, c - (cum[i - 1][j] if i else 0.0)) for j, c in enumerate(row)]
              for i, row in enumerate(cum)]
    names = [f"≤{s.labels.get('le', '?')}" for s in by_le]
    return names, times, counts


def render_png(panels: list[PanelData], out: str | Path, *, title: str, subtitle: str) -> Path:
    """Draw one subplot per panel, in dashboard order, three to a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=15, y=0.995)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, data in zip(axes.flat, panels):
        ax.set_title(data.panel.title, fontsize=12, fontweight="bold")
        if data.errors:
            _message(ax, "query failed:\n" + "\n".join(_wrap(e, 60) for e in data.errors), "red")
        elif not data.series:
            _message(ax, "no data in this range", "grey")
        elif data.panel.type == "table":
            _draw_table(ax, data)
        elif data.panel.type == "bargauge":
            _draw_bars(ax, data)
        elif data.panel.type == "heatmap":
            _draw_heatmap(ax, data, mdates)
        elif data.panel.type == "stat":
            _draw_stat(ax, data, mdates)
        else:
            _draw_lines(ax, data, mdates)
    # Fixed margins: tight_layout would draw the whole figure a second time to measure it.
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=1 - 1.2 / fig.get_figheight(),
                        hspace=0.35, wspace=0.22)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _draw_lines(ax: Any, data: PanelData, mdates: Any) -> None:
    percent = data.panel.percent
    for name, s in data.series:
        ys = [v * 100 if percent else v for v in s.values]
        ax.plot([_dt(t) for t in s.times], ys, label=name, linewidth=1.6)
    ax.set_ylabel(_unit_label(data.panel.unit))
    _time_axis(ax, mdates)
    ax.grid(alpha=0.3)
    if 1 < len(data.series) <= 8 or (data.series and data.panel.targets[0].legend_format):
        ax.legend(fontsize=9, loc="upper left")


def _draw_stat(ax: Any, data: PanelData, mdates: Any) -> None:
    """Grafana's stat panel: the latest value, large, over a faint sparkline of the range."""
    percent = data.panel.percent
    latest = [s.values[-1] for _, s in data.series if s.values and math.isfinite(s.values[-1])]
    if latest:
        shown = max(latest) * 100 if percent else max(latest)
        ax.text(0.5, 0.55, f"{shown:.4g}{' %' if percent else ''}", ha="center", va="center",
                fontsize=34, fontweight="bold", color="tab:blue", transform=ax.transAxes)
    for _, s in data.series:
        ys = [v * 100 if percent else v for v in s.values]
        ax.plot([_dt(t) for t in s.times], ys, color="tab:blue", alpha=0.25, linewidth=1.2)
    ax.set_yticks([])
    _time_axis(ax, mdates)
    ax.margins(y=0.6)


def _draw_heatmap(ax: Any, data: PanelData, mdates: Any) -> None:
    names, times, counts = heatmap_matrix([s for _, s in data.series])
    mesh = ax.pcolormesh(mdates.date2num([_dt(t) for t in times]), range(len(names)), counts,
                         cmap="Oranges", shading="nearest")
    _time_axis(ax, mdates)
    step = max(1, len(names) // 12)
    ax.set_yticks(range(0, len(names), step), names[::step], fontsize=8)
    ax.set_ylabel("score bucket (upper bound)")
    ax.figure.colorbar(mesh, ax=ax, label="records per rate interval")


def _draw_bars(ax: Any, data: PanelData) -> None:
    rows = sorted(((name, s.values[-1]) for name, s in data.series if s.values),
                  key=lambda r: _natural(r[0]))
    ax.barh(range(len(rows)), [r[1] for r in rows], color="tab:orange")
    # Names inside the plot, over their bars: as tick labels left of the axis the figure's
    # fixed margin cut them (evidence member names are up to 17 characters).
    ax.set_yticks([])
    for i, (name, _) in enumerate(rows):
        ax.text(0.01, i, name, transform=ax.get_yaxis_transform(), va="center", ha="left",
                fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(_unit_label(data.panel.unit) or "records")
    ax.grid(axis="x", alpha=0.3)


def _draw_table(ax: Any, data: PanelData) -> None:
    """One block per series: info-style series show their labels, plain ones their value."""
    ax.axis("off")
    plain = {"__name__", "job", "instance"}
    blocks = []
    for name, s in data.series:
        extra = [f"    {k} = {_short(v)}" for k, v in sorted(s.labels.items()) if k not in plain]
        value = f"{s.values[-1]:g}" if s.values else "?"
        blocks.append(f"{name}:\n" + "\n".join(extra) if extra else f"{name}: {value}")
    ax.text(0.0, 1.0, "\n".join(blocks), va="top", ha="left", fontsize=10, family="monospace",
            transform=ax.transAxes)


def _time_axis(ax: Any, mdates: Any) -> None:
    locator = mdates.AutoDateLocator(minticks=3, maxticks=6, tz=timezone.utc)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=timezone.utc))


def _message(ax: Any, text: str, color: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", color=color, fontsize=10, wrap=True,
            transform=ax.transAxes)


def _unit_label(unit: str) -> str:
    """Grafana's unit id -> an axis label ("suffix:x" and "count:x" carry their own text)."""
    if unit.startswith(("suffix:", "count:")):
        return unit.split(":", 1)[1].strip()
    return {"percentunit": "%", "s": "seconds", "reqps": "records / s", "cpm": "per minute",
            "bool_yes_no": "yes / no", "short": "", "none": ""}.get(unit, unit)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def _short(value: str) -> str:
    """sha256 digests make tables unreadable; 12 hex digits identify a model just as well."""
    return value[:12] if re.fullmatch(r"[0-9a-f]{64}", value) else value


def _natural(text: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", text)
    return (int(digits[0]) if digits else sys.maxsize, text)


def _wrap(text: str, width: int) -> str:
    return "\n".join(text[i:i + width] for i in range(0, len(text), width))


# --- CLI -------------------------------------------------------------------------------------

def report_command(
    out: Path = typer.Option(Path("depois-report.png"), "--out", "-o",
                             help="PNG file to write (parent folders are created)."),
    prometheus_url: str = typer.Option(
        "http://127.0.0.1:9090", envvar="DEPOIS_PROMETHEUS_URL",
        help="Base URL of the Prometheus that scrapes the consumers."),
    dashboard: Path = typer.Option(
        DEFAULT_DASHBOARD, envvar="DEPOIS_DASHBOARD", exists=True, dir_okay=False,
        help="Grafana dashboard JSON whose panel queries are rendered."),
    range_: str = typer.Option("1h", "--range",
                               help="How far back the report looks, as a Prometheus duration."),
    rate_interval: str = typer.Option(
        "1m", help="Value for Grafana's $__rate_interval: at least 4x the scrape interval."),
    end: float | None = typer.Option(None, help="Unix time the report ends at (default: now)."),
) -> None:
    """Render the Grafana dashboard's panels to one PNG, from the same queries.

    For when Grafana is not at hand (CI, an incident ticket, a review): each panel of the
    dashboard JSON becomes one chart, in dashboard order, from Prometheus' HTTP API, with the
    dashboard's $job and $instance at their "All" value. Panels without data are named on
    stdout (and drawn as "no data"), never hidden.

    Exit codes: 0 every query ran; 1 a query failed (its panel shows the Prometheus error; the PNG
    is still written); 2 a flag is wrong or Prometheus could not be reached at all.
    """
    for name, value in (("--range", range_), ("--rate-interval", rate_interval)):
        try:
            parse_duration(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=name) from exc
    board = load_dashboard(dashboard)
    window = Window(end=end if end is not None else time.time(), range_=range_,
                    rate_interval=rate_interval)
    client = PrometheusClient(prometheus_url)
    try:
        client.query("vector(1)")
    except PrometheusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    panels = collect(client, board, window)
    stamp = datetime.fromtimestamp(window.end, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    path = render_png(panels, out, title=f"{board.title}: last {range_} to {stamp}",
                      subtitle=f"{prometheus_url} · rate interval {rate_interval} · "
                               f"dashboard {dashboard.name}")
    failed = [e for p in panels for e in p.errors]
    empty = [p.panel.title for p in panels if not p.series and not p.errors]
    typer.echo(f"wrote {path} ({len(panels)} panels, {len(empty)} without data)"
               + (f": {', '.join(empty)}" if empty else ""))
    for err in failed:
        typer.echo(f"query failed: {err}", err=True)
    if failed:
        raise typer.Exit(1)
