"""Every setting of the stream filter, declared once: type, default, meaning.

Sources, highest precedence first: command-line flags, ``DEPOIS_<NAME>`` environment variables,
a config file (``--config`` / ``DEPOIS_CONFIG_FILE``: YAML, TOML or JSON by extension, the same
snake_case names, dashes allowed), then the defaults below. ``depois-stream run``'s flags and
their ``--help`` are generated from this class (``filter.options``), so a setting, its default
and its help text cannot drift apart.

Anything wrong (unknown key, bad value, unreadable file, a Kafka option the chosen client does
not know or that the filter owns) is a ``ConfigError`` at start-up whose message names the
setting and what to do, never a traceback halfway through a stream.
"""

from __future__ import annotations

import difflib
import json
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict,
)

from depois_stream.contract.files import read_small
from depois_stream.contract.model import first_line
from depois_stream.filter.clients import ClientName


class ConfigError(ValueError):
    """Invalid configuration; the message says which setting and how to fix it."""


# Kafka's own rules for a topic name: a client given another crashes (librdkafka aborts on some)
# or fails deep in start-up with a traceback instead of naming the setting.
TOPIC_NAME = r"^[a-zA-Z0-9._-]{1,249}$"  # and neither "." nor ".." (checked below)
# Kafka's protocol carries these as int32.
INT32_MAX = 2**31 - 1
# The longest wait any setting may ask for (about 31 years: "never", for a breaker cooldown
# that only an operator's resume file should end); Python's timed waits overflow at ~292 years.
MAX_SECONDS = 1e9


def host_port_list(v: str) -> str:
    """A bootstrap list checked where it is given (run and replay): ``HOST[:PORT]`` entries,
    comma-separated (no port means 9092, as both clients read it; ``[IPv6]``; a ``PLAINTEXT://``
    style prefix). Before, an empty list or a port that is not a number failed deep in a client:
    kafka-python with a bare ValueError, run only at the start-up timeout, as "no answer" (fuzz
    run, stop 43). Hosts are not resolved here (a broker's name may resolve only later)."""
    entries = [e.strip() for e in v.split(",") if e.strip()]
    if not entries:
        raise ValueError("is empty: name at least one HOST[:PORT]")
    for entry in entries:
        address = entry.split("://", 1)[1] if "://" in entry else entry
        if address.startswith("[") and address.endswith("]"):  # an IPv6 address, no port
            continue
        host, sep, port = address.rpartition(":")
        if not sep:
            host, port = address, "9092"
        if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 65536) or any(
                c.isspace() or c == "/" for c in host):
            raise ValueError(f"{entry!r} is not HOST[:PORT] (a list is comma-separated)")
    return v


def flag(name: str, *alias: str) -> dict[str, Any]:
    """``json_schema_extra`` naming a setting's command-line flag(s), when not ``--<name>``."""
    return {"flags": (name, *alias)}


class ConsumerConfig(BaseSettings):
    """Everything `depois-stream run` needs; docs/consumer.md explains the semantics."""

    model_config = SettingsConfigDict(env_prefix="DEPOIS_", extra="forbid", allow_inf_nan=False)

    config_file: Path | None = Field(None, description=(
        "YAML, TOML or JSON file with any of these settings (snake_case keys). Precedence: "
        "flags > DEPOIS_* env > this file > defaults."), json_schema_extra=flag("--config", "-c"))
    model_path: Path = Field(description=(
        "ONNX model exported by `depois-train export-onnx`; its model.card.json must sit "
        "beside it. Replacing the file hot-reloads it."),
        json_schema_extra=flag("--model-path", "-m"))
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap host:port list.")
    client: ClientName = Field(
        "auto", description=(
            "Kafka client library: kafka-python (pure Python) or confluent-kafka (librdkafka, "
            "its own cost per record about a third of kafka-python's; pip install 'depois-stream[fast]'); auto "
            "takes confluent-kafka when version 2.16 or later is installed, kafka-python "
            "otherwise. The choice is logged at start-up."))
    ingest_topic: str = Field("depois.ingest", pattern=TOPIC_NAME, description="Topic the samples arrive on.")
    clean_topic: str = Field("depois.clean", pattern=TOPIC_NAME, description="Where samples that pass go.")
    quarantine_topic: str = Field("depois.quarantine", pattern=TOPIC_NAME, description="Where suspected poisons go.")
    dlq_topic: str = Field("depois.dlq", pattern=TOPIC_NAME, description="Where undecodable records go.")
    group_id: str = Field("depois-stream", min_length=1, max_length=255, description=(
        "Consumer group; start more processes with the same id to scale out."))
    auto_offset_reset: Literal["earliest", "latest"] = Field("earliest", description=(
        "Where a new group starts: earliest (filters the backlog) or latest."))
    batch_size: int = Field(512, ge=1, le=65536, description="Records scored per batch.")
    linger_ms: int = Field(50, ge=0, le=INT32_MAX, description=(
        "Wait at most this long for a batch to fill once its first record arrived."))
    max_in_flight: int = Field(4, ge=1, le=64, description=(
        "Batches whose outputs may be awaiting acknowledgement while the next ones are read "
        "and scored (offsets are committed in order, never ahead of an acknowledgement)."))
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description=(
        "auto (CUDA when onnxruntime offers it), cuda or cpu. The provider actually used is "
        "logged and exported as depois_model_info."))
    scorer_threads: int = Field(0, ge=0, le=1024, description=(
        "onnxruntime threads for scoring on the CPU; 0 = onnxruntime's default, one per core it "
        "sees (in a container on a large node that can be the node's cores: set the CPU request "
        "instead)."))
    require_gpu: bool = Field(False, description="Refuse to start unless scoring runs on CUDA.",
                              json_schema_extra=flag("--require-gpu/--allow-cpu"))
    verify_signature: Path | None = Field(None, description=(
        "Public key (PEM) of the training team: refuse any model, at start-up and on hot "
        "reload, whose model.sig beside it was not made by the matching private key over "
        "exactly this model and card. Unset: models load unsigned (logged; for local use)."))
    verify_card: bool = Field(True, description=(
        "Check the model's sha256 against its model card."),
        json_schema_extra=flag("--verify-card/--no-verify-card"))
    exactly_once: bool = Field(False, description=(
        "Produce outputs and commit offsets in one Kafka transaction per batch (default: "
        "at-least-once). See docs/consumer.md for the Tansu caveat."),
        json_schema_extra=flag("--exactly-once/--at-least-once"))
    transactional_id: str | None = Field(None, min_length=1, max_length=255, description=(
        "Stable transactional.id for --exactly-once (default: group id + random)."))
    metrics_host: str = Field("127.0.0.1", description=(
        "Bind address of /metrics, /healthz, /readyz (0.0.0.0 in a container)."))
    metrics_port: int | None = Field(9108, ge=0, le=65535, description=(
        "Port of the HTTP endpoint (0 = any free port)."))
    session_timeout_ms: int = Field(10000, ge=1000, le=INT32_MAX, description=(
        "Group session timeout: how long the group waits for a member that stopped "
        "heartbeating (a crashed member's partitions move after this)."))
    heartbeat_interval_ms: int = Field(1000, ge=100, le=INT32_MAX,
                                       description="Group heartbeat interval.")
    delivery_timeout_ms: int = Field(30000, ge=1000, le=INT32_MAX, description=(
        "How long one attempt to produce a record may take before it counts as failed and "
        "its batch is sent again."))
    produce_retries: int | None = Field(None, ge=0, le=INT32_MAX, description=(
        "Give up (exit 1, nothing committed past the failure) once this many retries in a "
        "row have failed too (N retries: N + 1 attempts; a retry that cannot start while the "
        "broker is unreachable counts once a delivery timeout has passed); unset retries until "
        "the broker takes the batch."))
    retry_backoff_max_s: float = Field(30.0, gt=0.0, le=MAX_SECONDS, description=(
        "Longest wait between two attempts (the wait doubles from 0.5 s)."))
    startup_timeout_s: float = Field(30.0, gt=0.0, le=MAX_SECONDS, description=(
        "How long start-up waits for the broker before it gives up with exit code 2."))
    breaker_window: int = Field(1000, ge=1, le=10_000_000, description=(
        "Samples the poison rate is computed over."))
    breaker_max_rate: float = Field(0.5, gt=0.0, le=1.0, description=(
        "Pause consumption when more than this fraction would be quarantined (1.0 disables)."))
    breaker_min_samples: int = Field(200, ge=1, le=10_000_000, description=(
        "Samples needed before the breaker may open."))
    breaker_cooldown_s: float = Field(300.0, ge=0.0, le=MAX_SECONDS, description=(
        "An open breaker resumes by itself after this."))
    control_dir: Path | None = Field(None, description=(
        "Operator folder: `touch DIR/resume` closes an open circuit breaker."))
    reload_interval_s: float = Field(5.0, ge=0.0, le=MAX_SECONDS, description=(
        "How often to check the model file for a new version (SIGHUP checks at once)."))
    lag_interval_s: float = Field(10.0, gt=0.0, le=MAX_SECONDS, description=(
        "How often to refresh the consumer lag metrics (also about a second after an "
        "assignment brings new partitions)."))
    stall_restart_s: float = Field(60.0, ge=0.0, le=MAX_SECONDS, description=(
        "Restart the fetch of an owned partition that had records to give and gave none for "
        "this long while the filter kept asking (a client library that stopped fetching it): "
        "resumed and sought to the first record not yet filtered, counted in "
        "depois_partition_restarts_total. Checked every --lag-interval-s; 0 turns it off."))
    probe_interval_s: float = Field(5.0, gt=0.0, le=MAX_SECONDS, description=(
        "How often to probe the broker directly for /readyz and depois_broker_up."))
    kafka: dict[str, Any] = Field(default_factory=dict, description=(
        "Extra client option KEY=VALUE, repeatable, in the chosen client's own names "
        "(kafka-python: snake_case; confluent-kafka: librdkafka's dotted names). "
        "The common security and size options may use kafka-python's names with either "
        "client (security_protocol, sasl_mechanism, sasl_plain_username, sasl_plain_password, "
        "ssl_cafile, ssl_certfile, ssl_keyfile, max_request_size, ...). Options that decide "
        "delivery semantics are refused."))
    exit_when_idle_s: float | None = Field(None, gt=0.0, le=MAX_SECONDS, description=(
        "Exit 0 after this many seconds without records (demos and tests), once a lag read "
        "the broker answered after the quiet began finds nothing left to read; time while the "
        "broker is unreachable or the circuit breaker is open does not count."))

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, v: str) -> str:
        return host_port_list(v)

    @field_validator("config_file", "model_path", "verify_signature", "control_dir", mode="before")
    @classmethod
    def _no_empty_path(cls, v: Any) -> Any:
        """An empty value (``DEPOIS_VERIFY_SIGNATURE=`` from a template whose variable was unset)
        would become the path ".": refused with its cause named, not as "public key . cannot be
        read", and never taken for "not set" (for the key, that would turn verification off)."""
        if isinstance(v, str) and not v.strip():
            raise ValueError("is empty: name a file (or folder), or unset it")
        return v

    @field_validator("*", mode="after")
    @classmethod
    def _text_a_client_can_take(cls, v: Any) -> Any:
        """No NUL byte and valid UTF-8 in any text setting: the client libraries and the
        operating system take text as C strings (librdkafka crashed on a topic name with a byte
        that is not UTF-8, and a NUL cut a path short)."""
        texts = [v] if isinstance(v, (str, Path)) else []
        if isinstance(v, dict):
            texts = [*v, *(x for x in v.values() if isinstance(x, str))]
        for text in map(str, texts):
            if "\0" in text:
                raise ValueError("contains a NUL byte")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("is not valid UTF-8 text (check the shell's or file's "
                                 "encoding)") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ConsumerConfig":
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        topics = [self.ingest_topic, self.clean_topic, self.quarantine_topic, self.dlq_topic]
        if set(topics) & {".", ".."}:
            raise ValueError("a topic cannot be named '.' or '..'")
        if len(set(topics)) != len(topics):
            raise ValueError(f"ingest, clean, quarantine and dlq topics must differ, got {topics}")
        most = self.breaker_window + self.batch_size - 1  # the window's fullest (breaker.py)
        if self.breaker_min_samples > most:
            raise ValueError(f"breaker_min_samples ({self.breaker_min_samples}) is more than the "
                             f"breaker's window ever holds (breaker_window + batch_size - 1 = "
                             f"{most}), so the circuit breaker could never open")
        if self.kafka:
            from depois_stream.filter.clients import ClientUnavailable, make_client

            try:
                make_client(self.client).check_options(self.kafka)
            except ClientUnavailable as exc:
                raise ValueError(str(exc)) from None
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
        data = loader(read_small(path).decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except (ValueError, yaml.YAMLError) as exc:
        said = " ".join(str(exc).split())  # YAML's message spans lines: one line here
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:]}: {said[:300]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _toml_loads(text: str) -> Any:
    try:
        import tomllib
    except ImportError as exc:  # Python 3.10
        raise ConfigError("TOML config files need Python 3.11+; use YAML or JSON") from exc
    return tomllib.loads(text)


# DEPOIS_* variables that belong to other commands or to deployment files, not to `run`.
OTHER_TOOLS_ENV = frozenset({
    "DEPOIS_AUDIT_TOPIC", "DEPOIS_READ_TIMEOUT_S", "DEPOIS_PROMETHEUS_URL", "DEPOIS_DASHBOARD",
    "DEPOIS_TANSU", "DEPOIS_CACHE_DIR", "DEPOIS_MODEL_DIR", "DEPOIS_MODEL_FILE",
    "DEPOIS_MODEL_URL", "DEPOIS_IMAGE", "DEPOIS_PARTITIONS", "DEPOIS_UPSTREAM_CRDS",
    "DEPOIS_SIGN_KEY_PASSWORD",
})


# How alike (difflib's ratio) an unknown DEPOIS_* name must be to a setting's to be taken for a
# misspelling of it and refused: one or two characters off a name of about twenty
# (DEPOIS_VERIFY_SIGNATUR: 0.98). A platform's own variables stay below it, Kubernetes' service
# links for the Service depois-consumer say (its <NAME>_PORT: 0.77 to DEPOIS_METRICS_PORT), and
# are only warned about.
MISSPELT_RATIO = 0.85


# Kubernetes' service links for a Service NAME: NAME_SERVICE_HOST, NAME_SERVICE_PORT[_PORTNAME],
# NAME_PORT (tcp://...), NAME_PORT_<n>_<PROTO>[_PORT|_ADDR|_PROTO]. A Service named depois-model
# brings its <NAME>_PORT=tcp://..., which is close to DEPOIS_MODEL_PATH: the platform's, never
# refused (review, stop 43).
_SERVICE_LINK = re.compile(r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_PORT|_ADDR|_PROTO)?)$")
_SERVICE_URL = re.compile(r"^(tcp|udp|sctp)://", re.IGNORECASE)


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is one of the variables the kubelet adds for a Service."""
    upper = name.upper()
    return bool(_SERVICE_LINK.match(upper)) or (upper.endswith("_PORT") and bool(_SERVICE_URL.match(value)))


def misspells(name: str, close: str | None, settings: set[str] | frozenset[str], value: str = "") -> bool:
    """Whether the unknown variable ``name`` is a misspelling of ``close``, one of ``settings``
    (a Kubernetes service-link variable never is)."""
    return close is not None and close in settings and not is_service_link(name, value) and \
        difflib.SequenceMatcher(None, name.upper(), close).ratio() >= MISSPELT_RATIO


# `run`'s one option outside ConsumerConfig: logging is set up before the settings are read,
# so that reading them can log.
LOG_LEVEL_ENV = "DEPOIS_LOG_LEVEL"


def run_env_names() -> frozenset[str]:
    """The DEPOIS_* variable of every `depois-stream run` setting."""
    return frozenset(f"DEPOIS_{name.upper()}" for name in ConsumerConfig.model_fields) | {LOG_LEVEL_ENV}


def unknown_env_matches(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``DEPOIS_*`` variables that set nothing, each with the known variable it most likely meant
    (None when none is close). Names compare in upper case: pydantic-settings reads them in any
    case, so ``depois_clean_topic`` sets something and ``depois_clean_topc`` is a typo."""
    known = run_env_names() | OTHER_TOOLS_ENV
    out: list[tuple[str, str | None]] = []
    for name in sorted(k for k in environ if k.upper().startswith("DEPOIS_") and k.upper() not in known):
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        out.append((name, close[0] if close else None))
    return out


def unknown_env(environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """``DEPOIS_*`` variables that set nothing, each with the setting it most likely meant, split
    into misspellings of a `run` setting (``misspells``: refused at start-up) and the rest (warned
    about: a platform may add DEPOIS_* variables of its own).

    pydantic-settings ignores environment variables it does not know, so a misspelt
    ``DEPOIS_VERIFY_SIGNATUR`` would silently serve models signed by anyone (stop 43: it was only
    warned about, and the filter ran without verifying).
    """
    own = run_env_names()
    refused: list[str] = []
    warned: list[str] = []
    for name, close in unknown_env_matches(environ):
        entry = f"{name} (did you mean {close}?)" if close else name
        (refused if misspells(name, close, own, environ[name]) else warned).append(entry)
    return refused, warned


def describe_errors(exc: ValidationError) -> str:
    """A pydantic error as one line: ``setting: problem; ...`` (no URLs, no input dump).

    A validator's own message is a whole sentence that names its flag: pydantic's "Value
    error, " prefix is dropped, and so is the location of a check across settings (it has none)."""
    parts = []
    for e in exc.errors(include_url=False, include_input=False):
        where, msg = ".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def load_config(**overrides: Any) -> ConsumerConfig:
    """Build the config from flags (``overrides``; ``None`` means "not given"), env and file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return ConsumerConfig(**given)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid configuration: {describe_errors(exc)} (set it with a flag, a "
            "DEPOIS_<NAME> env variable or the config file)") from None
    except ConfigError:  # the config file's own error says what is wrong with it
        raise
    except ValueError as exc:  # e.g. DEPOIS_KAFKA is not JSON (pydantic-settings' SettingsError)
        raise ConfigError(f"invalid configuration: {first_line(exc) or type(exc).__name__} "
                          "(complex settings such as DEPOIS_KAFKA are JSON: DEPOIS_KAFKA='{\"security_protocol\": "
                          "\"SSL\"}')") from None
