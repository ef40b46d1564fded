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


def test_a_missing_ingest_topic_is_waited_for(broker, kafka_client: str, unique: str, centroid_model) -> None:
    """Fuzz run (stop 43): a misspelt ingest topic. Both clients wait for it (DepoisNoPartitionsOwned
    says so) and stop cleanly on SIGTERM; librdkafka never creates it. kafka-python's subscription
    created it: it now asks brokers not to (next test), which Apache Kafka honours and Tansu
    ignores (Tansu creates a topic on any mention), so on Tansu only confluent-kafka's is checked."""
    import signal
    import time

    topics = Topics.create(broker.bootstrap, unique)
    typo = Topics(f"{unique}-ingestx", topics.clean, topics.quarantine, topics.dlq)
    proc = subprocess.Popen(run_command(broker.bootstrap, typo, unique, centroid_model, kafka_client,
                                        "--metrics-port", "0", "--session-timeout-ms", "3000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(8)  # start-up, the subscription and a join's worth of metadata requests
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in err.decode(), err.decode()[-2000:]
    finally:
        proc.kill()
    if kafka_client == "confluent-kafka":
        assert f"{unique}-ingestx" not in _topics(broker.bootstrap)


def test_kafka_python_asks_brokers_not_to_create_topics(monkeypatch) -> None:
    """The filter never creates topics; kafka-python's metadata requests may (its default), and
    a broker with auto.create.topics.enable (Apache Kafka's default) then creates a misspelt
    ingest topic on subscription. Both of its handles turn that off."""
    import kafka

    from depois_stream.filter.clients import kafka_python as kp
    from depois_stream.filter.clients.base import ClientSettings

    made: dict[str, dict] = {}

    def recorder(name: str):
        def make(*args, **config):
            made[name] = config
            raise RuntimeError("recorded")
        return make

    monkeypatch.setattr(kp, "KafkaConsumer", recorder("consumer"))
    monkeypatch.setattr(kp, "KafkaProducer", recorder("producer"))
    settings = ClientSettings(bootstrap_servers="127.0.0.1:1", client_id="c", group_id="g")
    for build in (lambda: kp.KafkaPythonConsumer(settings, lambda error: None),
                  lambda: kp.KafkaPythonProducer(settings)):
        try:
            build()
        except RuntimeError:
            pass
    assert made["consumer"]["allow_auto_create_topics"] is False
    assert made["producer"]["allow_auto_create_topics"] is False
    assert kafka.KafkaConsumer.DEFAULT_CONFIG["allow_auto_create_topics"] is True  # why it is set
