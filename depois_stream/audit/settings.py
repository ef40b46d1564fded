"""Where replay reads and writes: the DEPOIS_* settings it shares with `depois-stream run`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from depois_stream.audit.trail import DEFAULT_AUDIT_TOPIC
from depois_stream.filter.clients.kafka_python import check_passthrough, options_for
from depois_stream.filter.config import (
    MAX_SECONDS, TOPIC_NAME, host_port_list, misspells, unknown_env_matches,
)

CLIENT_ID = "depois-replay"

# Replay decides these itself; in particular a group id would let it commit offsets.
_OWNED_KAFKA_KEYS = frozenset({
    "bootstrap_servers", "group_id", "enable_auto_commit", "auto_offset_reset", "client_id",
    "acks", "key_deserializer", "value_deserializer", "key_serializer", "value_serializer",
})



class ReplaySettings(BaseSettings):
    """Where replay reads and writes; the same ``DEPOIS_*`` variables the consumer uses."""

    model_config = SettingsConfigDict(env_prefix="DEPOIS_", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    quarantine_topic: str = Field("depois.quarantine", pattern=TOPIC_NAME)
    clean_topic: str = Field("depois.clean", pattern=TOPIC_NAME)
    audit_topic: str = Field(DEFAULT_AUDIT_TOPIC, pattern=TOPIC_NAME)
    kafka: dict[str, Any] = {}  # security passthrough (sasl_*, ssl_*, security_protocol)
    read_timeout_s: float = Field(60.0, gt=0.0, le=MAX_SECONDS, allow_inf_nan=False)

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, v: str) -> str:
        return host_port_list(v)  # the rule `run` applies too

    @field_validator("kafka")
    @classmethod
    def _passthrough_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_passthrough(v, _OWNED_KAFKA_KEYS, "are chosen by replay itself (it reads without "
                          "a consumer group, so it can never commit the live consumer's offsets, "
                          "and writes with acks=all, so a release is on every replica before "
                          "its audit record); DEPOIS_KAFKA is for security and size options")
        return v

    @model_validator(mode="after")
    def _distinct_topics(self) -> "ReplaySettings":
        """The rule `run` applies to its topics: release reads quarantine, writes clean and
        audit; any two the same and audit JSON lands in the training topic, or released copies
        in quarantine again."""
        topics = [self.quarantine_topic, self.clean_topic, self.audit_topic]
        if len(set(topics)) != len(topics):
            raise ValueError(f"quarantine, clean and audit topics must differ, got {topics}")
        return self

    def client_options(self, client: type[KafkaConsumer] | type[KafkaProducer]) -> dict[str, Any]:
        """The ``kafka`` options ``client`` understands (kafka-python rejects the others)."""
        return options_for(client, self.kafka)


def unknown_replay_env(environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """``DEPOIS_*`` variables in ``environ`` that set nothing (``unknown_env_matches``, the check
    `depois-stream run` makes at start-up), split in two: those that most likely meant one of
    replay's own settings, to refuse (a misspelt DEPOIS_CLEAN_TOPIC would send released copies to
    the default topic), and the rest, to warn about as `run` does (replay runs in the stream
    filter's environment, where a platform may add variables of its own, such as Kubernetes'
    service variables for a Service named depois-something).
    """
    # and the filter's key variable, which `rescore` reads when --verify-signature is not given
    own = {f"DEPOIS_{name.upper()}" for name in ReplaySettings.model_fields} | {"DEPOIS_VERIFY_SIGNATURE"}
    refused: list[str] = []
    warned: list[str] = []
    for name, close in unknown_env_matches(environ):
        if name.upper() in own:
            continue
        entry = f"{name} (did you mean {close}?)" if close else name
        (refused if misspells(name, close, own, environ[name]) else warned).append(entry)
    return refused, warned
