"""``depois_commits_total`` and ``depois_last_batch_timestamp_seconds`` count what the broker
confirmed, not what was sent.

Commits are asynchronous; counting one when it is *sent* made a filter whose every commit the
broker refused look healthy: the commit counter grew and the "last committed batch" gauge kept
moving, so ``DepoisConsumerStalled`` (which reads that gauge) could never fire, and
``DepoisCommitFailures`` (failures over commits plus failures) reported 100 % failing as 50 %.

The refusal here is the real broker's: the filter's real consumer is kept, and only the topic
name in each commit request is changed to one that does not exist, which Tansu answers with
UNKNOWN_TOPIC_OR_PARTITION through the client library's own callback (or error, for the final
synchronous commit)."""

from __future__ import annotations

from typing import Any

from depois_stream.filter.app import StreamFilter
from depois_stream.filter.metrics import Metrics
from tests.helpers.kafka_io import Topics, consumer_config, publish


class _RefusedCommits:
    """A real consumer whose commits name a topic the broker does not have."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def commit(self, offsets, asynchronous, *args, **kwargs) -> None:
        renamed = {(f"{topic}-gone", p): off for (topic, p), off in offsets.items()}
        return self._inner.commit(renamed, asynchronous, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _ClientWithRefusedCommits:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def consumer(self, settings, on_commit):
        return _RefusedCommits(self._inner.consumer(settings, on_commit))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _value(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def _run(kafka_client, broker, unique, model, digits_arrays, refuse: bool) -> tuple[Metrics, int]:
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique)
    ids = [f"{unique}-{i}" for i in range(200)]
    publish(broker.bootstrap, topics.ingest, ids, xte[:200], yte[:200])
    metrics = Metrics()
    flt = StreamFilter(consumer_config(broker.bootstrap, topics, unique, model, client=kafka_client,
                                       batch_size=32), metrics)
    if refuse:
        flt.client = _ClientWithRefusedCommits(flt.client)
    stats = flt.run()
    return metrics, stats.consumed


def test_a_commit_the_broker_refused_is_a_failure_and_not_a_commit(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    metrics, consumed = _run(kafka_client, broker, unique, centroid_model, digits_arrays, refuse=True)
    assert consumed == 200  # every output acknowledged; only the commits were refused
    assert _value(metrics, "depois_commit_failures_total") >= 2  # the batches' and the final one
    assert _value(metrics, "depois_commits_total") == 0
    assert _value(metrics, "depois_last_batch_timestamp_seconds") == 0


def test_commits_the_broker_confirmed_are_counted(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    metrics, consumed = _run(kafka_client, broker, unique, centroid_model, digits_arrays, refuse=False)
    assert consumed == 200
    assert _value(metrics, "depois_commits_total") >= 2  # several batches of 32, then the final one
    assert _value(metrics, "depois_commit_failures_total") == 0
    assert _value(metrics, "depois_last_batch_timestamp_seconds") > 0
