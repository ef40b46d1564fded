"""`depois-stream produce` and `depois-stream broker`: the simulation kit's commands.

``produce`` publishes a data set to the ingest topic, optionally poisoned; ``broker`` runs the
local in-memory Tansu broker for demos and tests. Registered on the main app in
``depois_stream.cli``.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from depois_stream.filter.cli import EXIT_STARTUP, fail, stop_on_signals
from depois_stream.filter.options import parse_pairs

if TYPE_CHECKING:
    from depois_stream.sim.broker import LocalBroker

DEFAULT_TOPICS = ["depois.ingest", "depois.clean", "depois.quarantine", "depois.dlq",
                  "depois.audit"]
# What produce decides itself; the rest of --kafka passes through to kafka-python's producer.
_PRODUCE_OWNED = frozenset({"bootstrap_servers", "acks", "client_id", "linger_ms",
                            "key_serializer", "value_serializer"})

# Exit codes of both commands, as their --help states them.
EXIT_FAILED = 1  # produce: Kafka did not take the records; broker: Tansu died while serving
EXIT_USAGE = EXIT_STARTUP  # 2: a flag or the data is wrong, or the broker could not start
BROKER = "depois-stream broker"


class AttackChoice(str, Enum):
    none = "none"
    random_flip = "random-flip"
    systematic_shift = "systematic-shift"
    targeted_flip = "targeted-flip"
    backdoor = "backdoor"
    ood = "ood"


class EncodingChoice(str, Enum):
    binary = "binary"
    json = "json"


class DtypeChoice(str, Enum):
    uint8 = "uint8"
    float32 = "float32"


class SplitChoice(str, Enum):
    test = "test"
    train = "train"


def produce(
    bootstrap_servers: str = typer.Option(
        "127.0.0.1:9092", "--bootstrap-servers", "--bootstrap", envvar="DEPOIS_BOOTSTRAP_SERVERS",
        help="Kafka bootstrap host:port list."),
    topic: str = typer.Option(
        "depois.ingest", envvar="DEPOIS_INGEST_TOPIC", help="Topic to publish to (the consumer's ingest topic)."),
    dataset: str = typer.Option(
        "digits", help="Named data set (digits, mnist, mnist-5k, fashion-mnist); digits is bundled."),
    split: SplitChoice = typer.Option(SplitChoice.test, help="Which split of the named data set to publish."),
    npz: Optional[Path] = typer.Option(
        None, exists=True, dir_okay=False, help="Publish this .npz instead of a named data set: arrays "
        "`images` ([N, C, H, W] or [N, H, W], float in [0, 1] or uint8 0..255) and `labels` ([N] "
        "integers 0..K-1), the rules every user array follows; any other file is refused (exit 2). "
        "The model is not checked: records it cannot take are dead-lettered by the filter."),
    data_dir: Optional[Path] = typer.Option(None, help="Where the named data set's files are."),
    attack: AttackChoice = typer.Option(
        AttackChoice.none, help="Poison the stream with this numpy attack before publishing."),
    rate: float = typer.Option(0.2, min=0.0, max=1.0, help="Fraction of samples the attack poisons."),
    seed: int = typer.Option(0, help="Seed of the attack and of where malformed records go."),
    encoding: EncodingChoice = typer.Option(
        EncodingChoice.binary, help="Wire encoding (docs/wire-format.md): compact binary or JSON."),
    dtype: DtypeChoice = typer.Option(DtypeChoice.uint8, help="Pixel type on the wire."),
    malformed: int = typer.Option(
        0, min=0, help="Also send this many invalid records (each must be dead-lettered)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Publish only the first N samples."),
    partitions: Optional[int] = typer.Option(
        None, min=1, help="Create the topic with this many partitions if it does not exist yet."),
    manifest: Optional[Path] = typer.Option(
        None, help="Write the ground truth (poisoned ids, malformed ids and their expected "
        "dead-letter reasons) to this JSON file, to score the filter against later."),
    kafka: list[str] = typer.Option(
        [], "--kafka", help="Extra kafka-python producer option KEY=VALUE, repeatable "
        "(security: security_protocol, sasl_mechanism, ssl_cafile, ...)."),
) -> None:
    """Publish a data set as one record per sample (key = sample id), optionally poisoned.

    Poisoned samples look like any other on the wire; only the --manifest file says which they are.

    Example: poison 20 % of the digits test split by random label flips, add six invalid records:

    depois-stream produce --attack random-flip --rate 0.2 --malformed 6 --manifest m.json

    Exit codes: 0 published; 1 Kafka did not take every record (unreachable broker, refused
    send); 2 a flag or the data is wrong (--kafka or --bootstrap-servers malformed, an unknown
    or missing data set, an --npz file that breaks the array rules, an attack the data cannot take),
    nothing sent. Each failure is one line on stderr.
    """
    from kafka.errors import KafkaError

    from depois_stream.filter.clients.kafka_python import check_passthrough
    from depois_stream.sim.datasets import DatasetError
    from depois_stream.sim.producer import attack_by_name, load_samples, produce as publish

    program = "depois-stream produce"
    options = parse_pairs("kafka", kafka)
    try:  # before loading anything: a bad flag must not cost a data set load first
        check_passthrough(options or {}, _PRODUCE_OWNED, "are set by produce itself")
    except ValueError as exc:
        raise fail(program, f"--kafka: {exc}", EXIT_USAGE) from None
    try:  # the data before Kafka: a file the filter would refuse is never half-published
        data = load_samples(dataset, split.value, npz=npz, data_dir=data_dir)
    except DatasetError as exc:
        raise fail(program, str(exc), EXIT_USAGE) from None
    try:
        chosen = None if attack is AttackChoice.none else attack_by_name(attack.value, data.num_classes)
        sent = publish(bootstrap_servers, topic, data, attack=chosen, rate=rate, seed=seed,
                       encoding=encoding.value, dtype=dtype.value, malformed=malformed, limit=limit,
                       partitions=partitions, kafka=options)
    except ValueError as exc:  # an attack the data cannot take, a bootstrap address that does not parse
        raise fail(program, str(exc), EXIT_USAGE) from None
    except (RuntimeError, OSError, KafkaError) as exc:
        raise fail(program, str(exc), EXIT_FAILED) from None
    typer.echo(f"sent {sent.sent} records to {topic}: {sent.samples} samples from {sent.source}, "
               f"{len(sent.poisoned_ids)} poisoned ({sent.attack or 'no attack'}), "
               f"{len(sent.malformed)} malformed")
    if manifest is not None:
        typer.echo(f"manifest: {sent.write(manifest)}")


def broker(
    port: int = typer.Option(
        0, min=0, max=65535, help="Loopback port to listen on (0 = a free one). A port in use is "
        "refused (exit 2): pick another and give the same address to the other commands."),
    create_topics: bool = typer.Option(
        True, "--create-topics/--no-create-topics",
        help="Create the default depois.* topics at start (Tansu cannot add partitions later). With "
        "--no-create-topics create them yourself: `depois-stream run` never creates its output topics "
        "and refuses to start without them."),
    partitions: int = typer.Option(
        1, min=1, help="Partitions per created topic (= max consumers that share the work)."),
    log_file: Optional[Path] = typer.Option(
        None, help="Where the broker's own log goes (default: a temporary file, removed on stop "
        "unless an error names it)."),
) -> None:
    """Run the in-memory Tansu broker on 127.0.0.1 until Ctrl-C/SIGTERM (data is lost on stop).

    It prints `bootstrap: 127.0.0.1:PORT` once the broker serves, and watches it after that.

    Exit codes: 0 stopped by Ctrl-C/SIGTERM; 1 Tansu exited while serving; 2 could not start
    (Tansu not installed, the port in use, Tansu exited at start-up, the topics not created).
    Each failure is one line on stderr, naming Tansu's log where it has something to say.
    """
    from depois_stream.sim.broker import BrokerError

    stop = stop_on_signals()
    local = _start_broker(port, log_file, create_topics, partitions)
    try:
        typer.echo(f"bootstrap: {local.bootstrap}")
        sys.stdout.flush()
        while not stop.wait(0.5):  # an address printed for a dead broker sends every later
            local.check_alive()     # command to whatever holds the port now
    except BrokerError as exc:
        raise fail(BROKER, str(exc), EXIT_FAILED) from None
    finally:
        local.stop()
    typer.echo("broker stopped")


def _start_broker(port: int, log_file: Optional[Path], create_topics: bool,
                  partitions: int) -> LocalBroker:
    """Start Tansu and create the topics, or stop it and exit 2 with one line: the broker is
    announced only once it serves, never a port that another process holds."""
    from kafka.errors import KafkaError

    from depois_stream.sim.broker import (
        BrokerError, LocalBroker, PortInUse, create_topics as create,
    )

    try:
        local = LocalBroker(port=port or None, log_path=log_file).start()
    except PortInUse as exc:
        raise fail(BROKER, f"{exc}; pick another with --port PORT (0 = a free one)",
                   EXIT_USAGE) from None
    except BrokerError as exc:
        raise fail(BROKER, str(exc), EXIT_USAGE) from None
    try:
        if create_topics:
            create(local.bootstrap, DEFAULT_TOPICS, partitions=partitions)
        local.check_alive()
    except (BrokerError, KafkaError) as exc:
        raise fail(BROKER, _start_failure(local, exc), EXIT_USAGE) from None
    except BaseException:  # anything else (a signal, an admin-client bug): never leave Tansu behind
        local.stop()       # holding the port, in its own session where Ctrl-C does not reach it
        raise
    return local


def _start_failure(local: LocalBroker, exc: Exception) -> str:
    """What to say when the topics could not be created: Tansu's exit explains a Kafka error
    better than the error does; stops the broker either way."""
    from depois_stream.sim.broker import BrokerError

    try:
        local.check_alive()
        message = str(exc) if isinstance(exc, BrokerError) else (
            f"could not create the topics on {local.bootstrap} ({exc}); its log: {local.log_file}")
    except BrokerError as died:
        message = str(died)
    if local.log_file is not None and str(local.log_file) in message:
        local.keep_log()
    local.stop()
    return message
