"""`depois-stream`: run the stream filter, start a local broker, print the version.

Other commands register themselves here with one line each (produce, report, replay). Start-up
problems (bad config, bad model, no broker binary) exit with code 2 and a one-paragraph message
that says what to fix, never a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from depois_stream import __version__

app = typer.Typer(
    name="depois-stream", no_args_is_help=True, add_completion=False,
    help="De-Pois data-poisoning filter for Kafka: score every training sample on its way in, "
         "route it to a clean, quarantine or dead-letter topic.")

EXIT_STARTUP = 2  # configuration or model problem: fix and restart
EXIT_DELIVERY = 1  # the broker would not take the output: nothing was committed past it


def _stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT ask for a graceful stop: finish the batch, commit, exit 0."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        logging.getLogger("depois_stream").info("%s received: finishing the current batch",
                                                signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"depois-stream: {message}", err=True)
    return typer.Exit(code)


def _parse_kafka(pairs: list[str]) -> dict[str, Any] | None:
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise _fail("--kafka expects KEY=VALUE (e.g. security_protocol=SASL_SSL), "
                        f"got {pair!r}", EXIT_STARTUP)
        out[key.strip()] = yaml.safe_load(value)  # "9" -> 9, "true" -> True, text stays text
    return out


@app.command()
def run(
    model_path: Optional[Path] = typer.Option(
        None, "--model-path", "-m", help="ONNX model exported by `depois-train export-onnx`; its "
        "model.card.json must sit beside it. Replacing the file hot-reloads it."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML, TOML or JSON file with any of these settings "
        "(snake_case keys). Precedence: flags > DEPOIS_* env > this file > defaults."),
    bootstrap_servers: Optional[str] = typer.Option(None, help="Kafka bootstrap host:port list."),
    ingest_topic: Optional[str] = typer.Option(None, help="Topic the samples arrive on."),
    clean_topic: Optional[str] = typer.Option(None, help="Where samples that pass go."),
    quarantine_topic: Optional[str] = typer.Option(None, help="Where suspected poisons go."),
    dlq_topic: Optional[str] = typer.Option(None, help="Where undecodable records go."),
    group_id: Optional[str] = typer.Option(
        None, help="Consumer group; start more processes with the same id to scale out."),
    auto_offset_reset: Optional[str] = typer.Option(
        None, help="Where a new group starts: earliest (default, filters the backlog) or latest."),
    batch_size: Optional[int] = typer.Option(None, help="Records scored per batch (default 512)."),
    linger_ms: Optional[int] = typer.Option(
        None, help="Wait at most this long for a batch to fill once its first record arrived."),
    device: Optional[str] = typer.Option(
        None, help="auto (CUDA when onnxruntime offers it), cuda or cpu. The provider actually "
        "used is logged and exported as depois_model_info."),
    require_gpu: Optional[bool] = typer.Option(
        None, "--require-gpu/--allow-cpu", help="Refuse to start unless scoring runs on CUDA."),
    verify_card: Optional[bool] = typer.Option(
        None, "--verify-card/--no-verify-card",
        help="Check the model's sha256 against its model card (default on)."),
    exactly_once: Optional[bool] = typer.Option(
        None, "--exactly-once/--at-least-once", help="Produce outputs and commit offsets in one "
        "Kafka transaction (default: at-least-once). See docs/consumer.md for the Tansu caveat."),
    transactional_id: Optional[str] = typer.Option(
        None, help="Stable transactional.id for --exactly-once (default: group id + random)."),
    metrics_host: Optional[str] = typer.Option(
        None, help="Bind address of /metrics, /healthz, /readyz."),
    metrics_port: Optional[int] = typer.Option(
        None, help="Port of the HTTP endpoint (0 = any free port)."),
    session_timeout_ms: Optional[int] = typer.Option(None, help="Group session timeout."),
    heartbeat_interval_ms: Optional[int] = typer.Option(None, help="Group heartbeat interval."),
    breaker_window: Optional[int] = typer.Option(
        None, help="Samples the poison rate is computed over."),
    breaker_max_rate: Optional[float] = typer.Option(
        None, help="Pause consumption when more than this fraction would be quarantined (0.5)."),
    breaker_min_samples: Optional[int] = typer.Option(
        None, help="Samples needed before the breaker may open."),
    breaker_cooldown_s: Optional[float] = typer.Option(
        None, help="An open breaker resumes by itself after this."),
    control_dir: Optional[Path] = typer.Option(
        None, help="Operator folder: `touch DIR/resume` closes an open circuit breaker."),
    reload_interval_s: Optional[float] = typer.Option(
        None, help="How often to check the model file for a new version."),
    lag_interval_s: Optional[float] = typer.Option(
        None, help="How often to refresh the consumer lag metric."),
    produce_retries: Optional[int] = typer.Option(
        None, help="Retries of a batch the broker did not acknowledge."),
    kafka: list[str] = typer.Option(
        [], "--kafka", help="Extra kafka-python client option KEY=VALUE, repeatable "
        "(security: security_protocol, sasl_mechanism, sasl_plain_username, ssl_cafile, ...)."),
    exit_when_idle_s: Optional[float] = typer.Option(
        None, help="Exit 0 after this many seconds without records (demos and tests)."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Filter the ingest topic until SIGTERM/SIGINT (which finish the batch and commit first)."""
    settings = {k: v for k, v in locals().items() if k not in {"config", "kafka", "log_level"}}
    from kafka.errors import KafkaError

    from depois_stream.filter.config import ConfigError, load_config
    from depois_stream.filter.app import DeliveryError, StartupError, StreamFilter
    from depois_stream.filter.detector import ModelLoadError

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        cfg = load_config(config_file=config, kafka=_parse_kafka(kafka), **settings)
        flt = StreamFilter(cfg)
    except (ConfigError, ModelLoadError) as exc:
        raise _fail(str(exc), EXIT_STARTUP) from None
    try:
        stats = flt.run(_stop_on_signals())
    except StartupError as exc:
        raise _fail(str(exc), EXIT_STARTUP) from None
    except DeliveryError as exc:
        raise _fail(str(exc), EXIT_DELIVERY) from None
    except KafkaError as exc:  # e.g. the broker went away for longer than the client retries
        raise _fail(f"Kafka error: {exc}; the batch in flight was not committed and will be "
                    "re-read on restart", EXIT_DELIVERY) from None
    typer.echo(f"consumed={stats.consumed} clean={stats.clean} quarantined={stats.quarantined} "
               f"dead_lettered={stats.dead_lettered} batches={stats.batches} "
               f"breaker_trips={stats.breaker_trips}")


@app.command()
def broker(
    port: int = typer.Option(0, help="Loopback port to listen on (0 = a free one)."),
    create_topics: bool = typer.Option(
        True, "--create-topics/--no-create-topics",
        help="Create the default depois.* topics at start (Tansu cannot add partitions later)."),
    partitions: int = typer.Option(
        1, help="Partitions per created topic (= max consumers that share the work)."),
    log_file: Optional[Path] = typer.Option(
        None, help="Where the broker's own log goes (default: discarded)."),
) -> None:
    """Run the in-memory Tansu broker on 127.0.0.1 until Ctrl-C/SIGTERM (data is lost on stop)."""
    from depois_stream.sim.broker import BrokerError, LocalBroker, create_topics as create

    stop = _stop_on_signals()
    try:
        local = LocalBroker(port=port or None, log_path=log_file).start()
    except BrokerError as exc:
        raise _fail(str(exc), EXIT_STARTUP) from None
    try:
        if create_topics:
            create(local.bootstrap, ["depois.ingest", "depois.clean", "depois.quarantine",
                                     "depois.dlq", "depois.audit"], partitions=partitions)
        typer.echo(f"bootstrap: {local.bootstrap}")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        local.stop()
    typer.echo("broker stopped")


@app.command()
def version() -> None:
    """Print the depois-stream version."""
    typer.echo(__version__)


from depois_stream.sim.cli import produce  # noqa: E402  (registration only)

app.command()(produce)

from depois_stream.audit.cli import replay_app  # noqa: E402  (registration only)

app.add_typer(replay_app, name="replay")

from depois_stream.audit.report import report_command  # noqa: E402  (registration only)

app.command("report")(report_command)
