"""The demo's filter-and-score path on the real broker, with the fast centroid model."""

from __future__ import annotations

import pytest

from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS
from depois_stream.filter.config import ConsumerConfig
from depois_stream.sim.demo import render, run_demo
from depois_stream.sim.producer import Manifest

pytestmark = pytest.mark.slow


def test_demo_accounts_for_every_record_and_catches_the_flips(broker, unique, centroid_model, tmp_path):
    cfg = ConsumerConfig(
        bootstrap_servers=broker.bootstrap, model_path=centroid_model, group_id=unique,
        ingest_topic=f"{unique}.ingest", clean_topic=f"{unique}.clean",
        quarantine_topic=f"{unique}.quarantine", dlq_topic=f"{unique}.dlq", metrics_port=0,
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS, heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS,
        exit_when_idle_s=2.0)
    result = run_demo(cfg, attack="random-flip", rate=0.2, malformed=6, seed=0,
                      manifest_path=tmp_path / "manifest.json")

    manifest = Manifest.read(tmp_path / "manifest.json")
    assert result.published == manifest.sent == 537 + 6
    assert result.consumed == result.published
    assert result.clean + result.quarantined + result.dead_lettered == result.published
    assert result.dlq_as_expected and result.dead_lettered == 6
    assert result.recall >= 0.7 and result.precision >= 0.7
    assert result.false_positive_rate <= 0.1
    assert result.metrics_url and result.metrics_url.startswith("http://127.0.0.1:")
    assert f"recall         {result.recall:.3f}" in render(result, cfg, "random-flip", 0.2)

    # What an operator reads: quarantined records with their headers, and the consumer's counters.
    assert 0 < len(result.quarantine_rows) <= 8
    for row in result.quarantine_rows:
        assert float(row.score) < float(row.boundary)  # quarantined means below its boundary
        assert row.label.isdigit() and row.source_offset.isdigit()
    consumed = [m for m in result.metrics_excerpt if m.startswith("depois_records_consumed_total")]
    assert consumed == [f'depois_records_consumed_total{{topic="{cfg.ingest_topic}"}} '
                        f'{float(result.consumed)}']
    shown = render(result, cfg, "random-flip", 0.2)
    assert "first quarantined records" in shown and "consumer metrics" in shown
    # Its broker is gone when this is read: the replay hint must not point at it as if it were up.
    assert "broker stopped with it" in shown
