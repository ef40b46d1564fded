"""The batch histogram exposes exactly what prometheus-client's Histogram would."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from depois_stream.filter.metrics import LATENCY_BUCKETS, SCORE_BUCKETS, BatchHistogram


def _series(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("x_") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.parametrize("buckets", [SCORE_BUCKETS, LATENCY_BUCKETS])
def test_batches_expose_the_same_series_as_one_observe_per_value(buckets) -> None:
    values = np.random.default_rng(0).normal(0, 4, 5000)
    if buckets[0] >= 0:
        values = np.abs(values)
    values[::97] = np.nan  # never counted, as the consumer never scores a NaN
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("x", "doc", buckets, namespace="x", registry=ours)
    reference = Histogram("x_x", "doc", buckets=buckets, registry=theirs)
    for chunk in np.array_split(values, 7):
        batch.observe_many(chunk)
    for v in values[~np.isnan(values)]:
        reference.observe(v)
    a, b = _series(ours), _series(theirs)
    assert set(a) == set(b)
    for name in a:
        assert np.isclose(a[name], b[name]), name  # counts exact, the sum up to rounding
    assert a["x_x_count"] == (~np.isnan(values)).sum()


def test_the_filters_private_registry_exports_the_process_metrics() -> None:
    """The runbook's exit-137 row (out of memory) needs the replica's memory; the filter's
    registry is private, so prometheus-client's process collector has to be added to it."""
    from depois_stream.filter.metrics import Metrics

    text = generate_latest(Metrics().registry).decode()
    assert "\nprocess_resident_memory_bytes " in text
    assert "\nprocess_open_fds " in text
