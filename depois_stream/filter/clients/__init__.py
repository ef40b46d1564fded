"""Pick a Kafka client library by name: ``kafka-python``, ``confluent-kafka`` or ``auto``.

``auto`` (the default) takes confluent-kafka when a usable one is installed (``pip install
'depois-stream[fast]'``: librdkafka does the network work in C: the filter's own cost per record
is about a third of kafka-python's, docs/performance.md) and kafka-python otherwise, so that a plain ``depois-stream run`` is the fast filter
wherever it can be. "Usable" is the ``fast`` extra's floor, 2.16: 2.12 crashed inside librdkafka
when a topic came back under a new topic id, and an older copy pulled in by another package (Quix
Streams pins < 2.13) must not silently become the client. The choice is logged at start-up and
exported as ``depois_build_info{client=...}``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Literal

from depois_stream.filter.clients.base import Client

ClientName = Literal["auto", "kafka-python", "confluent-kafka"]
CLIENT_NAMES: tuple[str, ...] = ("auto", "kafka-python", "confluent-kafka")


class ClientUnavailable(RuntimeError):
    """The requested client library is not installed; the message says what to install."""


# The oldest confluent-kafka ``auto`` takes (the ``fast`` extra's floor in pyproject.toml).
CONFLUENT_FLOOR = (2, 16)


def confluent_installed() -> bool:
    return importlib.util.find_spec("confluent_kafka") is not None


def confluent_version() -> tuple[int, int] | None:
    """The installed confluent-kafka's (major, minor) (None when it is not installed)."""
    if not confluent_installed():
        return None
    try:
        found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("confluent-kafka"))
    except importlib.metadata.PackageNotFoundError:  # importable, but not an installed package
        return None
    return (int(found[1]), int(found[2])) if found else None


def resolve(name: str) -> str:
    """``auto`` -> the library that will be used; any other name is returned as it is."""
    if name == "auto":
        version = confluent_version()
        usable = version is not None and version >= CONFLUENT_FLOOR
        return "confluent-kafka" if usable else "kafka-python"
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
