"""Pick a Kafka client library by name: ``kafka-python``, ``confluent-kafka`` or ``auto``.

``auto`` takes confluent-kafka when it is installed (``pip install 'depois-stream[fast]'``:
librdkafka does the network work in C, several times cheaper per record) and kafka-python
otherwise. The choice is logged at start-up and exported as ``depois_build_info{client=...}``.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from depois_stream.filter.clients.base import Client

ClientName = Literal["auto", "kafka-python", "confluent-kafka"]
CLIENT_NAMES: tuple[str, ...] = ("auto", "kafka-python", "confluent-kafka")


class ClientUnavailable(RuntimeError):
    """The requested client library is not installed; the message says what to install."""


def confluent_installed() -> bool:
    return importlib.util.find_spec("confluent_kafka") is not None


def resolve(name: str) -> str:
    """``auto`` -> the library that will be used; any other name is returned as it is."""
    if name == "auto":
        return "confluent-kafka" if confluent_installed() else "kafka-python"
    return name


def make_client(name: str) -> Client:
    name = resolve(name)
    if name == "kafka-python":
        from depois_stream.filter.clients.kafka_python import KafkaPythonClient, missing_codecs

        if missing := missing_codecs():
            raise ClientUnavailable(
                f"kafka-python cannot decompress {', '.join(missing)} record batches (their "
                "libraries are not installed), so every such batch would stall its partition: "
                "pip install 'kafka-python[lz4,snappy,zstd]' (or reinstall depois-stream)")
        return KafkaPythonClient()
    if name == "confluent-kafka":
        if not confluent_installed():
            raise ClientUnavailable(
                "--client confluent-kafka needs the confluent-kafka package: "
                "pip install 'depois-stream[fast]' (or choose --client kafka-python)")
        from depois_stream.filter.clients.confluent import ConfluentClient

        return ConfluentClient()
    raise ClientUnavailable(f"unknown client {name!r}; choose one of {', '.join(CLIENT_NAMES)}")
