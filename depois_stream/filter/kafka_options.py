"""Kafka client options passed through from configuration (security, network tuning).

Why a check at all: kafka-python raises on an unknown option only when a client is built, deep
in start-up and with a message that does not name the setting; and an option the caller decides
itself (commits, acks, group id) would silently change delivery semantics. Both are refused while
the configuration is validated, so a bad config fails at start-up saying what to change.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer, KafkaProducer


def check_passthrough(options: dict[str, Any], owned: frozenset[str], why_owned: str) -> dict[str, Any]:
    """Return ``options`` unchanged, or raise ValueError naming the keys that may not be passed."""
    refused = sorted(set(options) & owned)
    if refused:
        raise ValueError(f"{refused} {why_owned}")
    known = set(KafkaConsumer.DEFAULT_CONFIG) | set(KafkaProducer.DEFAULT_CONFIG)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{unknown} are not kafka-python client options (e.g. "
                         "security_protocol, sasl_mechanism, ssl_cafile)")
    return options


def options_for(client: type[KafkaConsumer] | type[KafkaProducer], options: dict[str, Any]) -> dict[str, Any]:
    """The pass-through options this client knows (kafka-python rejects the other's, e.g. a
    consumer's fetch_max_wait_ms given to the producer)."""
    return {k: v for k, v in options.items() if k in client.DEFAULT_CONFIG}
