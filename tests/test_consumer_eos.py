"""Exactly-once mode: outputs and input offsets go through one transaction per batch.

Tansu accepts transactions but does not hide aborted records from read_committed readers, so
this tests the commit path (offsets committed through the transaction, every record routed
once), not isolation; see docs/consumer.md.
"""

from __future__ import annotations

from collections import Counter

from depois_stream.filter.app import StreamFilter
from tests.helpers.kafka_io import Topics, committed, consumer_config, publish, read_all


def test_transactional_batches_commit_their_offsets(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    ids = [f"{unique}-{i}" for i in range(300)]
    ends = publish(broker.bootstrap, topics.ingest, ids, xte[:300], yte[:300])
    stats = StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                                         exactly_once=True, exit_when_idle_s=1.5)).run()
    assert stats.consumed == len(ids)
    keys = Counter(r.key.decode() for t in topics.outputs() for r in read_all(broker.bootstrap, t))
    assert set(keys) == set(ids) and set(keys.values()) == {1}
    assert committed(broker.bootstrap, unique, topics.ingest) == ends
