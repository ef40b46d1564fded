"""librdkafka refuses to seek a partition that is assigned but not fetching yet (its start
offset, the group's commit, is still being looked up): ``_STATE``, "Erroneous state". A retried
batch right after a partition came back to the member rewinds it just then, and the error
ended the filter's loop (exit 3). Such a partition starts at the group's committed offset, at
or before any offset the filter rewinds to, so the seek can wait for the next poll; records
fetched from the old position meanwhile are not handed on."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.serial  # a seek must answer within half a second

confluent = pytest.importorskip("depois_stream.filter.clients.confluent")
from confluent_kafka import TopicPartition  # noqa: E402

from depois_stream.filter.clients.base import ClientSettings  # noqa: E402
from tests.helpers.kafka_io import Topics, publish  # noqa: E402


def _consumer(bootstrap: str, group: str):
    return confluent.ConfluentConsumer(
        ClientSettings(bootstrap_servers=bootstrap, client_id="t", group_id=group), lambda e: None)


def test_a_seek_before_the_partition_fetches_waits_for_it_instead_of_failing() -> None:
    """No broker: the partition can never start fetching, so librdkafka refuses every seek."""
    consumer = _consumer("127.0.0.1:9", "g")
    try:
        consumer._c.assign([TopicPartition("t", 0)])
        consumer.seek(("t", 0), 5)  # raised ClientError(_STATE) before
    finally:
        consumer._c.close()


def test_records_before_a_waiting_seek_are_not_handed_on(broker, unique, digits_arrays) -> None:
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique)
    publish(broker.bootstrap, topics.ingest, [f"r{i}" for i in range(20)], xte[:20], yte[:20])
    consumer = _consumer(broker.bootstrap, unique)
    try:
        consumer._topic = topics.ingest
        consumer._c.assign([TopicPartition(topics.ingest, 0)])  # starts at the commit: none, 0
        consumer.seek((topics.ingest, 0), 10)  # at once: usually before it fetches
        offsets: list[int] = []
        deadline = time.monotonic() + 20
        while len(offsets) < 10 and time.monotonic() < deadline:
            offsets += consumer.poll(0.2, 100).offsets.tolist()
        assert offsets == list(range(10, 20))
    finally:
        consumer._c.close()


def test_the_topic_id_is_known_without_waiting_and_follows_a_re_created_topic(broker, unique) -> None:
    """confluent-kafka's consumer metadata carries no topic id, so the source could not see a
    broker that came back empty (or a re-created topic) under confluent-kafka, only the weaker
    commit and log-end signs. The id is now asked in the background; the poll never waits."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from tests.helpers.kafka_io import wait_for

    topic = f"{unique}-ids"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    consumer = _consumer(broker.bootstrap, unique)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
        started = time.monotonic()
        assert consumer.topic_id(topic) is None  # asked, not waited for
        assert time.monotonic() - started < 0.5
        wait_for(lambda: consumer.topic_id(topic) is not None, timeout_s=20)
        first = consumer.topic_id(topic)
        admin.delete_topics([topic])
        time.sleep(1)
        admin.create_topics([NewTopic(topic, 1, 1)])
        wait_for(lambda: consumer.topic_id(topic) not in (None, first), timeout_s=20)
    finally:
        consumer._c.close()
        admin.close()


def test_the_all_zero_topic_id_is_no_id() -> None:
    """A broker below Metadata v10 (a cluster mid-upgrade) answers with the all-zero id. Taken
    as the topic's id, the real one given by the upgrade looked like a replaced log, and every
    member restarted its partitions at the log's start (a review). No broker needed: the answer
    is played by a finished future."""
    from confluent_kafka import Uuid

    class Answer:
        def __init__(self, ident) -> None:
            self.topic_id = ident

    class Done:
        def __init__(self, ident) -> None:
            self._answer = Answer(ident)

        def done(self) -> bool:
            return True

        def result(self):
            return self._answer

    consumer = _consumer("127.0.0.1:9", "g")
    try:
        consumer._id_next = float("inf")  # ask nothing of the (absent) broker
        for ident in (Uuid(0, 0), None):
            consumer._id_asked = Done(ident)
            assert consumer.topic_id("t") is None
        consumer._id_asked = Done(Uuid(7, 9))
        real = consumer.topic_id("t")
        consumer._id_asked = Done(Uuid(0, 0))
        assert real is not None and consumer.topic_id("t") == real
    finally:
        consumer._c.close()
