"""Horizontal scale: two members of one group split the partitions and together route everything."""

from __future__ import annotations

import threading

from depois_stream.filter.app import StreamFilter
from tests.helpers.kafka_io import (Topics, assert_each_key_once, committed, consumer_config, publish,
                                     wait_for)


def test_two_members_split_partitions_and_account_for_everything(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=4)
    members = [StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                                            exit_when_idle_s=None)) for _ in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=m.run, args=(stop,)) for m in members]
    for t in threads:
        t.start()
    try:
        # publish only once both hold partitions, so neither can drain the stream alone
        wait_for(lambda: all(m.assignment for m in members)
                 and sum(len(m.assignment) for m in members) == 4)
        ids = [f"{unique}-{i}" for i in range(400)]
        ends = publish(broker.bootstrap, topics.ingest, ids, xte[:400], yte[:400])
        wait_for(lambda: sum(m.stats.consumed for m in members) >= len(ids))
        a, b = (set(m.assignment) for m in members)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    assert not a & b and len(a | b) == 4
    assert all(m.stats.consumed > 0 for m in members)
    assert sum(m.stats.consumed for m in members) == len(ids)
    assert_each_key_once(broker.bootstrap, topics.outputs(), ids)
    assert committed(broker.bootstrap, unique, topics.ingest) == ends
