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
