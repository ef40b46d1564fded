"""A mistyped output topic stops start-up (exit 2) and is not created.

Found by a newcomer walkthrough (stop 42): `run --clean-topic depois.cleanx` routed 432 clean
records to a topic nobody reads, because asking for one topic's metadata lets a broker that
creates topics on first mention create it (Tansu always; Apache Kafka by default,
`auto.create.topics.enable=true`). docs/consumer.md promised exit 2 for a missing output topic.
"""

from __future__ import annotations

import subprocess

from kafka import KafkaConsumer

from tests.helpers.kafka_io import Topics, run_command


def _topics(bootstrap: str) -> set[str]:
    """Every topic, from a metadata request for all of them (which creates nothing)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return set(consumer.topics())
    finally:
        consumer.close()


def test_a_missing_output_topic_is_refused_and_not_created(broker, kafka_client: str, unique: str,
                                                           centroid_model) -> None:
    topics = Topics.create(broker.bootstrap, unique)
    typo = Topics(topics.ingest, f"{unique}-cleanx", topics.quarantine, topics.dlq)
    proc = subprocess.run(run_command(broker.bootstrap, typo, unique, centroid_model, kafka_client,
                                      "--exit-when-idle-s", "2", "--metrics-port", "0"),
                          capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert f"{unique}-cleanx" in err and "Traceback" not in err, err[-2000:]
    assert f"{unique}-cleanx" not in _topics(broker.bootstrap)


def test_an_output_topic_the_broker_does_not_answer_about_names_the_connection_not_the_topic(
        centroid_model) -> None:
    """The other refusal: the metadata call itself failed (connection, rights), so the topic may
    well exist; the message points at the connection and the principal's rights, not at
    creating the topic."""
    import pytest

    from depois_stream.filter.app import StartupError, StreamFilter
    from depois_stream.filter.clients.base import ClientError
    from depois_stream.filter.config import load_config

    class Refusing:
        def partition_count(self, topic: str) -> int:
            if topic == "depois.quarantine":
                raise ClientError("TopicAuthorizationFailed", retriable=False)
            return 3

    flt = StreamFilter(load_config(model_path=centroid_model, device="cpu", metrics_port=None))
    with pytest.raises(StartupError) as info:
        flt._output_partitions(Refusing())
    message = str(info.value)
    assert message.startswith("cannot check output topic 'depois.quarantine' (TopicAuthorizationFailed)")
    assert "Describe and Write" in message and "create it" not in message
