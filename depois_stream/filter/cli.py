"""`depois-stream run`: the stream filter as a command; its flags come from ``ConsumerConfig``.

Exit codes (also in docs/consumer.md and ``--help``): 0 stopped by SIGTERM/SIGINT or
``--exit-when-idle-s`` with everything produced committed; 1 outputs could not be produced
within ``--produce-retries`` (nothing past them committed); 2 start-up refused (configuration,
model, unreachable broker, missing topic, busy metrics port), with one line saying what to fix;
3 an unexpected error (a bug), the traceback in the log.
"""

from __future__ import annotations

import faulthandler
import inspect
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

import typer

from depois_stream.filter.config import (
    LOG_LEVEL_ENV, ConfigError, ConsumerConfig, load_config, unknown_env,
)
from depois_stream.filter.options import command, parse_pairs
from depois_stream.filter.signals import on_signal

EXIT_DELIVERY = 1  # the broker would not take the output: nothing was committed past it
EXIT_STARTUP = 2  # configuration, model or start-up problem: fix and restart
EXIT_CRASH = 3  # an error the filter does not expect (a bug): the traceback is in the log

if TYPE_CHECKING:
    from depois_stream.filter.app import StreamFilter

log = logging.getLogger("depois_stream")


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT ask for a graceful stop: finish the batch, commit, leave the group.
    (Acted on by ``signals``' relay thread, never inside the handler.)"""
    stop = threading.Event()

    def stop_now(signum: signal.Signals) -> None:
        log.info("%s received: finishing the batches in flight, committing, leaving the group",
                 signum.name)
        stop.set()

    on_signal(signal.SIGTERM, stop_now)
    on_signal(signal.SIGINT, stop_now)
    return stop


def check_model_on_sighup(flt: StreamFilter) -> None:
    """SIGHUP asks for a model check now instead of at the next ``--reload-interval-s`` (as
    Prometheus and most daemons read it); its default action would end the filter without a
    graceful stop."""
    def check_now(signum: signal.Signals) -> None:
        log.info("SIGHUP received: checking the model file now")
        flt.request_model_check()

    on_signal(signal.SIGHUP, check_now)


def _report_native_crashes() -> None:
    """A crash inside a native library (librdkafka, onnxruntime) would otherwise end the process
    without a line in its log: faulthandler names the signal and each Python thread's stack.
    It needs a real file descriptor, which an in-process caller's stderr may not have."""
    try:
        faulthandler.enable()
    except (AttributeError, ValueError):  # io.UnsupportedOperation is a ValueError
        log.debug("stderr has no file descriptor: native crashes will not be reported")


def fail(program: str, message: str, code: int) -> typer.Exit:
    typer.echo(f"{program}: {message}", err=True)
    return typer.Exit(code)


def _run(log_level: str, **settings: Any) -> None:
    """Filter the ingest topic until SIGTERM/SIGINT (which finish the batch and commit first).

    Every sample is decoded, scored by the De-Pois model and produced to the clean, quarantine
    or dead-letter topic with its verdict and provenance in headers; its offset is committed
    only once the broker acknowledged the output. Every setting below is also a DEPOIS_<NAME>
    environment variable and a key of the --config file.

    Exit codes: 0 stopped (everything produced was committed); 1 outputs could not be produced
    within --produce-retries (nothing past them committed; a restart re-reads them); 2 start-up
    refused: configuration, model, signature, unreachable broker, missing topic or busy port;
    3 an unexpected error (a bug: the traceback is in the log; a restart re-reads the rest).
    """
    from depois_stream.filter.app import StartupError, StreamFilter
    from depois_stream.filter.clients import ClientUnavailable
    from depois_stream.filter.delivery import DeliveryError
    from depois_stream.filter.detector import ModelLoadError
    from depois_stream.filter.logs import configure

    program = "depois-stream run"
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise fail(program, f"--log-level / {LOG_LEVEL_ENV} {log_level!r}: use DEBUG, INFO, "
                            "WARNING or ERROR",
                   EXIT_STARTUP)
    configure(log_level)
    _report_native_crashes()
    misspelt, unknown = unknown_env(os.environ)
    for name in unknown:
        log.warning("environment variable %s sets nothing: `depois-stream run --help` lists the "
                    "DEPOIS_* settings", name)
    if misspelt:
        many = len(misspelt) > 1
        raise fail(program, f"environment variable{'s' * many} {', '.join(misspelt)} set{'' if many else 's'} "
                            f"nothing: correct or unset {'them' if many else 'it'} (`depois-stream run --help` "
                            "lists the DEPOIS_* settings)", EXIT_STARTUP)
    kafka = parse_pairs("kafka", settings.get("kafka"))  # a typo here is a usage error (exit 2)
    try:
        cfg = load_config(**{**settings, "kafka": kafka})
        flt = StreamFilter(cfg)
    except (ConfigError, ModelLoadError, ClientUnavailable) as exc:
        raise fail(program, str(exc), EXIT_STARTUP) from None
    except Exception as exc:  # noqa: BLE001 - a bug: its own exit code, not a misleading 1
        raise _crashed(program, exc) from None
    log.info("depois-stream filtering %s with client %s, group %s", cfg.ingest_topic,
             flt.client.name, cfg.group_id)
    try:
        check_model_on_sighup(flt)
        stats = flt.run(stop_on_signals())
    except StartupError as exc:
        raise fail(program, str(exc), EXIT_STARTUP) from None
    except DeliveryError as exc:
        raise fail(program, str(exc), EXIT_DELIVERY) from None
    except Exception as exc:  # noqa: BLE001 - see _crashed
        raise _crashed(program, exc) from None
    typer.echo(f"consumed={stats.consumed} clean={stats.clean} quarantined={stats.quarantined} "
               f"dead_lettered={stats.dead_lettered} batches={stats.batches} "
               f"breaker_trips={stats.breaker_trips}")


def _crashed(program: str, exc: Exception) -> typer.Exit:
    """An exception the filter does not expect is a bug. Crash-only: no retry around the loop
    (state after an unknown error is unknown) and no final commit (the loop's in-order settling
    did not run): nothing unacknowledged was ever committed, and a restart re-reads everything
    after the group's last commit, so records are not lost but some may be produced twice. Its
    own exit code keeps it apart from exit 1 ("check the broker"); the traceback goes to the log
    once."""
    log.error("unexpected error, stopping (a bug: report it with this traceback)", exc_info=exc)
    return fail(program, f"unexpected {type(exc).__name__}: {exc} (a bug; the traceback is in the "
                f"log; a restart re-reads every record after the last commit)", EXIT_CRASH)


LOG_LEVEL = inspect.Parameter(
    "log_level", inspect.Parameter.KEYWORD_ONLY, annotation=str,
    default=typer.Option("INFO", envvar=LOG_LEVEL_ENV, help="DEBUG, INFO, WARNING or ERROR."))

run = command(_run, ConsumerConfig, extra=[LOG_LEVEL])
