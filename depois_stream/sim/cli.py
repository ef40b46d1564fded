"""`depois-stream produce` and `depois-stream broker`: the simulation kit's commands.

``produce`` publishes a data set to the ingest topic, optionally poisoned; ``broker`` runs the
local in-memory Tansu broker for demos and tests. Registered on the main app in
``depois_stream.cli``.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from depois_stream.filter.cli import EXIT_STARTUP, fail, stop_on_signals
from depois_stream.filter.options import parse_pairs

DEFAULT_TOPICS = ["depois.ingest", "depois.clean", "depois.quarantine", "depois.dlq",
                  "depois.audit"]
# What produce decides itself; the rest of --kafka passes through to kafka-python's producer.
_PRODUCE_OWNED = frozenset({"bootstrap_servers", "acks", "client_id", "linger_ms",
                            "key_serializer", "value_serializer"})


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
        "`images` ([N, C, H, W] or [N, H, W], float in [0, 1] or uint8) and `labels` ([N] ints)."),
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
    """
    from kafka.errors import KafkaError

    from depois_stream.filter.clients.kafka_python import check_passthrough
    from depois_stream.sim.producer import attack_by_name, load_samples, produce as publish

    options = parse_pairs("kafka", kafka)
    try:  # before loading anything: a bad flag must not cost a data set load first
        check_passthrough(options or {}, _PRODUCE_OWNED, "are set by produce itself")
    except ValueError as exc:
        raise fail("depois-stream produce", f"--kafka: {exc}", EXIT_STARTUP) from None
    try:
        data = load_samples(dataset, split.value, npz=npz, data_dir=data_dir)
        chosen = None if attack is AttackChoice.none else attack_by_name(attack.value, data.num_classes)
        sent = publish(bootstrap_servers, topic, data, attack=chosen, rate=rate, seed=seed,
                       encoding=encoding.value, dtype=dtype.value, malformed=malformed, limit=limit,
                       partitions=partitions, kafka=options)
    except (ValueError, RuntimeError, OSError, KafkaError) as exc:
        typer.echo(f"depois-stream produce: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"sent {sent.sent} records to {topic}: {sent.samples} samples from {sent.source}, "
               f"{len(sent.poisoned_ids)} poisoned ({sent.attack or 'no attack'}), "
               f"{len(sent.malformed)} malformed")
    if manifest is not None:
        typer.echo(f"manifest: {sent.write(manifest)}")


def broker(
    port: int = typer.Option(0, help="Loopback port to listen on (0 = a free one)."),
    create_topics: bool = typer.Option(
        True, "--create-topics/--no-create-topics",
        help="Create the default depois.* topics at start (Tansu cannot add partitions later)."),
    partitions: int = typer.Option(
        1, min=1, help="Partitions per created topic (= max consumers that share the work)."),
    log_file: Optional[Path] = typer.Option(
        None, help="Where the broker's own log goes (default: discarded)."),
) -> None:
    """Run the in-memory Tansu broker on 127.0.0.1 until Ctrl-C/SIGTERM (data is lost on stop)."""
    from depois_stream.sim.broker import BrokerError, LocalBroker, create_topics as create

    stop = stop_on_signals()
    try:
        local = LocalBroker(port=port or None, log_path=log_file).start()
    except BrokerError as exc:
        raise fail("depois-stream broker", str(exc), EXIT_STARTUP) from None
    try:
        if create_topics:
            create(local.bootstrap, DEFAULT_TOPICS, partitions=partitions)
        typer.echo(f"bootstrap: {local.bootstrap}")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        local.stop()
    typer.echo("broker stopped")
