"""The read-back check the delivery tests rely on: it must fail, and say why, when a key is
missing or read twice (a helper that cannot fail would make those tests vacuous)."""

from __future__ import annotations

import pytest

from tests.helpers.kafka_io import Topics, assert_each_key_once, publish


def test_each_key_once_passes_on_the_exact_keys_and_explains_a_missing_or_doubled_one(
        broker, unique, digits_arrays):
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique)
    ids = [f"{unique}-{i}" for i in range(3)]
    publish(broker.bootstrap, topics.clean, ids[:2], xte[:2], yte[:2])
    publish(broker.bootstrap, topics.quarantine, ids[2:], xte[2:3], yte[2:3])
    assert_each_key_once(broker.bootstrap, topics.outputs(), ids)
    with pytest.raises(AssertionError, match=r"first read 3 records, 1 ids missing .*second read"):
        assert_each_key_once(broker.bootstrap, topics.outputs(), ids + [f"{unique}-9"])
    publish(broker.bootstrap, topics.dlq, ids[:1], xte[:1], yte[:1])
    with pytest.raises(AssertionError, match=r"first read 4 records, 0 ids missing \[\], 1 read twice"):
        assert_each_key_once(broker.bootstrap, topics.outputs(), ids)
