"""Consumer settings from (highest precedence first) flags, ``DEPOIS_*`` env vars, a config file.

The config file is itself a setting (``--config`` / ``DEPOIS_CONFIG_FILE``) in YAML, TOML or JSON,
chosen by extension, with the same field names as the flags (``batch_size: 256``). Anything
wrong (unknown key, bad value, unreadable file, Kafka option the client does not know) is a
``ConfigError`` at start-up whose message names the setting and what to do, never a traceback
halfway through a stream.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict,
)

# Kafka client options a deployment may pass through (security and network tuning); the
# consumer owns everything that decides delivery semantics (commits, acks, idempotence).
_OWNED_KAFKA_KEYS = frozenset({
    "bootstrap_servers", "client_id", "group_id", "enable_auto_commit", "enable_idempotence",
    "acks", "transactional_id", "isolation_level", "key_deserializer", "value_deserializer",
    "key_serializer", "value_serializer", "max_poll_records", "auto_offset_reset",
    "session_timeout_ms", "heartbeat_interval_ms", "linger_ms", "batch_size",
})


class ConfigError(ValueError):
    """Invalid consumer configuration; the message says which setting and how to fix it."""


class ConsumerConfig(BaseSettings):
    """Everything `depois-stream run` needs; see docs/consumer.md for the semantics."""

    model_config = SettingsConfigDict(env_prefix="DEPOIS_", extra="forbid")

    config_file: Path | None = None
    bootstrap_servers: str = "127.0.0.1:9092"
    model_path: Path
    verify_card: bool = True
    ingest_topic: str = "depois.ingest"
    clean_topic: str = "depois.clean"
    quarantine_topic: str = "depois.quarantine"
    dlq_topic: str = "depois.dlq"
    group_id: str = "depois-stream"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    batch_size: int = Field(512, ge=1, le=65536)
    linger_ms: int = Field(50, ge=0)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    require_gpu: bool = False
    exactly_once: bool = False
    transactional_id: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(9108, ge=0, le=65535)
    session_timeout_ms: int = Field(45000, ge=1000)
    heartbeat_interval_ms: int = Field(3000, ge=100)
    breaker_window: int = Field(1000, ge=1)
    breaker_max_rate: float = Field(0.5, gt=0.0, le=1.0)
    breaker_min_samples: int = Field(200, ge=1)
    breaker_cooldown_s: float = Field(300.0, ge=0.0)
    control_dir: Path | None = None
    reload_interval_s: float = Field(5.0, ge=0.0)
    lag_interval_s: float = Field(10.0, gt=0.0)
    produce_retries: int = Field(5, ge=0)
    kafka: dict[str, Any] = Field(default_factory=dict)
    exit_when_idle_s: float | None = Field(None, gt=0.0)

    @field_validator("kafka")
    @classmethod
    def _passthrough_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        from depois_stream.filter.kafka_options import check_passthrough

        return check_passthrough(v, _OWNED_KAFKA_KEYS, "are set by depois-stream itself (use its own flags)")

    @model_validator(mode="after")
    def _consistent(self) -> "ConsumerConfig":
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        topics = [self.ingest_topic, self.clean_topic, self.quarantine_topic, self.dlq_topic]
        if len(set(topics)) != len(topics):
            raise ValueError(f"ingest, clean, quarantine and dlq topics must differ, got {topics}")
        return self

    def effective_transactional_id(self) -> str:
        """A stable id when configured; otherwise unique per process (fencing then relies on
        the consumer group metadata sent with the offsets, KIP-447)."""
        return self.transactional_id or f"{self.group_id}-{uuid.uuid4().hex[:12]}"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls, init_settings,
                                                              env_settings)


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by the ``config_file`` setting (from flags or env)."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource,
                 env: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        path = None
        if isinstance(init, InitSettingsSource):
            path = init.init_kwargs.get("config_file")
        path = path or env().get("config_file")
        self._values = read_config_file(Path(path)) if path else {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML, TOML or JSON mapping; keys may use dashes like the flags do."""
    loaders = {".yaml": yaml.safe_load, ".yml": yaml.safe_load, ".json": json.loads,
               ".toml": _toml_loads}
    loader = loaders.get(path.suffix.lower())
    if loader is None:
        raise ConfigError(f"config file {path}: unknown extension, use .yaml, .yml, .toml or .json")
    try:
        data = loader(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:]}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _toml_loads(text: str) -> Any:
    try:
        import tomllib
    except ImportError as exc:  # Python 3.10
        raise ConfigError("TOML config files need Python 3.11+; use YAML or JSON") from exc
    return tomllib.loads(text)


def load_config(**overrides: Any) -> ConsumerConfig:
    """Build the config from flags (``overrides``; ``None`` means "not given"), env and file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return ConsumerConfig(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(
            f"invalid configuration: {problems} (set it with a flag, a DEPOIS_<NAME> env "
            "variable or the config file)") from exc
