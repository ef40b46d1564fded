"""The report's own logic: Grafana variables, legends, histogram buckets, an unreachable Prometheus.

Everything that needs Prometheus' answers lives in test_prometheus_integration.py; these are
the pure pieces whose mistakes would draw a plausible but wrong picture.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from depois_stream.sim.broker import free_port
from depois_stream.audit.report import (
    Series, heatmap_matrix, legend, parse_duration, substitute_variables,
)

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "depois.json"


def test_grafana_variables_are_filled_and_unknown_ones_refused() -> None:
    expr = "sum(rate(x_total[$__rate_interval])) / sum(increase(y_total[$__range]))"
    assert substitute_variables(expr, rate_interval="1m", range_="6h") == \
        "sum(rate(x_total[1m])) / sum(increase(y_total[6h]))"
    for unknown in ("rate(x[$__interval])", "x{instance=~\"$instance\"}", "x{job=\"${job}\"}"):
        with pytest.raises(ValueError, match="Grafana variables"):
            substitute_variables(unknown, rate_interval="1m", range_="1h")


def test_durations_parse_and_bad_ones_are_explained() -> None:
    assert [parse_duration(d) for d in ("500ms", "30s", "15m", "2h", "1d")] == \
        [0.5, 30, 900, 7200, 86400]
    with pytest.raises(ValueError, match="15m"):
        parse_duration("1h30m")


def test_legend_follows_grafana_legend_format() -> None:
    labels = {"__name__": "depois_records_routed_total", "destination": "dlq", "job": "j"}
    assert legend("{{destination}}", labels) == "dlq"
    assert legend("p95 {{ provider }}", {"provider": "CUDAExecutionProvider"}) == \
        "p95 CUDAExecutionProvider"
    assert legend("", labels) == "destination=dlq,job=j"


def test_heatmap_turns_cumulative_buckets_into_per_bucket_counts() -> None:
    # Cumulative counts at two instants, listed out of order as Prometheus may return them:
    # le=-1 holds 2 then 5, le=0 holds 7 then 9, +Inf holds 10 then 20.
    t = [100.0, 115.0]
    series = [Series({"le": "+Inf"}, t, [10.0, 20.0]), Series({"le": "-1.0"}, t, [2.0, 5.0]),
              Series({"le": "0.0"}, t, [7.0, 9.0])]
    names, times, counts = heatmap_matrix(series)
    assert names == ["≤-1.0", "≤0.0", "≤+Inf"]
    assert times == t
    assert counts == [[2.0, 5.0], [5.0, 4.0], [3.0, 11.0]]


def test_report_exits_2_with_a_message_when_prometheus_is_unreachable(tmp_path: Path) -> None:
    out = tmp_path / "r.png"
    result = subprocess.run(
        [sys.executable, "-m", "depois_stream", "report", "--dashboard", str(DASHBOARD),
         "--prometheus-url", f"http://127.0.0.1:{free_port()}", "--out", str(out)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot reach Prometheus" in result.stderr and "--prometheus-url" in result.stderr
    assert not out.exists()


def test_dashboard_variables_are_filled_with_their_all_value() -> None:
    from depois_stream.audit.report import load_dashboard

    board = load_dashboard(DASHBOARD)
    assert board.variables["job"] == ".+" and "instance" in board.variables
    expr = 'sum(rate(x_total{job=~"$job", instance=~"${instance}"}[$__rate_interval]))'
    assert substitute_variables(expr, rate_interval="1m", range_="1h",
                                variables=board.variables) == \
        'sum(rate(x_total{job=~".+", instance=~".+"}[1m]))'
    # every panel query of the shipped dashboard can be filled
    for panel in board.panels:
        for target in panel.targets:
            substitute_variables(target.expr, rate_interval="1m", range_="1h",
                                 variables=board.variables)


def test_the_packaged_dashboard_is_the_deployed_one_and_the_default_from_anywhere(
        tmp_path: Path) -> None:
    from depois_stream.audit.report import DEFAULT_DASHBOARD

    assert DEFAULT_DASHBOARD.read_bytes() == DASHBOARD.read_bytes(), (
        "cp deploy/grafana/dashboards/depois.json depois_stream/audit/dashboard.json")
    result = subprocess.run(  # no --dashboard, run from a folder without deploy/
        [sys.executable, "-m", "depois_stream", "report",
         "--prometheus-url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "r.png")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "cannot reach Prometheus" in result.stderr
    assert "does not exist" not in result.stderr


def test_every_bar_label_of_the_png_lies_inside_the_figure(tmp_path: Path, monkeypatch) -> None:
    """"Quarantine by reason" drew its member names as y tick labels left of the bars, and the
    fixed margin cut them: label_agreement and pixel_agreement both read `el_agreement`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from depois_stream.audit.report import Panel, PanelData, render_png

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig: kept.append(fig))
    names = ["label_agreement", "pixel_agreement", "pixel_mahalanobis", "critic", "below_boundary"]
    panels = [PanelData(Panel(id=i, type="bargauge", title=f"bars {i}"),
                        [(n, Series(labels={}, times=[0.0], values=[float(k + 1)]))
                         for k, n in enumerate(names)]) for i in range(3)]
    render_png(panels, tmp_path / "r.png", title="t", subtitle="s")
    fig = kept[0]
    renderer = fig.canvas.get_renderer()
    shown = []
    for ax in fig.axes:
        for text in [*ax.get_yticklabels(), *ax.texts]:
            if text.get_text() in names:
                box = text.get_window_extent(renderer)
                assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, (text.get_text(), box)
                shown.append(text.get_text())
    assert sorted(shown) == sorted(names * 3)
