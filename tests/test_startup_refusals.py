"""Bad start-up input found by a fuzz run (stop 39): each is one line and a documented exit code.

Before: a native abort (an empty group id under librdkafka, exit 134) or segfault (a topic name
that is not UTF-8, exit 139); a hang (a FIFO as config file, key or clean-sample file); tracebacks
(NUL bytes, infinite intervals, int32 overflows, option values of the wrong type, a num_classes of
30 digits); a model whose NaN boundary quarantines nothing accepted; `--model /dev/null`-like
targets replaced by a regular file. No broker is needed: every one is refused before Kafka.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from depois_stream.contract import Boundary, ContractError, ModelMetadata

NOWHERE = "127.0.0.1:1"


def run_cli(*args: str | bytes, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "depois_stream", *args], capture_output=True, timeout=timeout,
                          env={**os.environ, "DEPOIS_BOOTSTRAP_SERVERS": NOWHERE, **(env or {})})


def one_line_exit_2(proc: subprocess.CompletedProcess[bytes], needle: str) -> None:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, (proc.returncode, err)
    assert needle in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


@pytest.mark.parametrize("args, needle", [
    (("--client", "confluent-kafka", "--group-id", ""), "group_id"),
    (("--client", "confluent-kafka", "--ingest-topic", b"in\xff"), "ingest_topic"),
    (("--client", "confluent-kafka", "--ingest-topic", "bad topic!"), "ingest_topic"),
    (("--client", "kafka-python", "--clean-topic", ""), "clean_topic"),
    # an outside drill (stop 50): kafka-python refused the codec only after its bootstrap,
    # with a traceback
    (("--client", "kafka-python", "--kafka", "compression_type=bogus"), "compression_type"),
], ids=["empty-group", "non-utf8-topic", "illegal-topic", "empty-topic", "unknown-codec"])
def test_settings_a_client_library_would_crash_on_are_refused(
        centroid_model: Path, args: tuple, needle: str) -> None:
    proc = run_cli("run", "--model-path", str(centroid_model), "--device", "cpu", *args)
    one_line_exit_2(proc, needle)


@pytest.mark.parametrize("text, needle", [
    ("metrics_host: \"a\\0b\"\n", "metrics_host"),
    ("probe_interval_s: .inf\n", "probe_interval_s"),
    ("session_timeout_ms: 2147483648\n", "session_timeout_ms"),
    ("client: kafka-python\nkafka: {max_request_size: abc}\n", "max_request_size"),
    # librdkafka names it message.max.bytes; the user wrote kafka-python's name (stop 42)
    ("client: confluent-kafka\nkafka: {max_request_size: abc}\n", "max_request_size"),
    ("client: kafka-python\nkafka: {security_protocol: BOGUS}\n", "security_protocol"),
    ("client: confluent-kafka\ndelivery_timeout_ms: 2147483648\n", "delivery_timeout_ms"),
])
def test_bad_values_in_a_config_file_are_one_line(centroid_model: Path, tmp_path: Path,
                                                  text: str, needle: str) -> None:
    config = tmp_path / "filter.yaml"
    config.write_text(text)
    proc = run_cli("run", "--model-path", str(centroid_model), "--device", "cpu",
                   "--config", str(config))
    one_line_exit_2(proc, needle)


def test_a_config_file_error_is_not_blamed_on_json(tmp_path: Path) -> None:
    config = tmp_path / "filter.yaml"
    config.write_text("batch_size: [unclosed\n")
    proc = run_cli("run", "--model-path", "m.onnx", "--config", str(config))
    one_line_exit_2(proc, "filter.yaml")
    assert b"DEPOIS_KAFKA" not in proc.stderr


@pytest.mark.parametrize("flag", ["--config", "--verify-signature"])
def test_a_fifo_given_as_a_small_file_is_refused_not_waited_on(
        centroid_model: Path, tmp_path: Path, flag: str) -> None:
    fifo = tmp_path / ("filter.yaml" if flag == "--config" else "key.pub")
    os.mkfifo(fifo)
    proc = run_cli("run", "--model-path", str(centroid_model), "--device", "cpu", flag, str(fifo),
                   timeout=30)  # before: waited for a writer until killed
    one_line_exit_2(proc, "not a regular file")


def test_a_model_whose_boundary_is_nan_or_whose_class_count_is_absurd_is_refused() -> None:
    with pytest.raises(ValueError):
        Boundary(**{"global": math.nan})
    with pytest.raises(ValueError):
        Boundary(**{"global": -0.1, "per_class": [0.1, math.inf]})
    props = ModelMetadata(
        schema_version="1", boundary=Boundary(**{"global": -0.1}), target_fpr=0.01,
        input_shape=(1, 8, 8), num_classes=10, dataset="d", score_kind="critic",
        model_version="v", created_at="2026-01-01T00:00:00+00:00").to_props()
    for key, value in (("depois.num_classes", "1" * 30), ("depois.input_shape", "3,99999,99999")):
        with pytest.raises(ContractError):
            ModelMetadata.from_props({**props, key: value})


# ---------------------------------------------------------------- replay and depois-train

@pytest.mark.parametrize("args, env, needle", [
    (("list", "--bootstrap-servers", "host:notaport"), {}, "HOST[:PORT]"),
    (("list",), {"DEPOIS_KAFKA": '{"fetch_max_wait_ms": [1]}'}, "fetch_max_wait_ms"),
    (("list", "--topic", "a b"), {}, "topic"),
    (("rescore", "--model", "m.onnx", "--histogram", "h.xyz"), {}, "--histogram"),
    # a dry run said "would release 133" where the real run failed with a traceback
    (("release", "--dry-run", "--label", "3", "--operator", "o", "--reason", "r"),
     {"DEPOIS_KAFKA": '{"compression_type": "bogus"}'}, "compression_type"),
    (("list",), {"DEPOIS_KAFKA": '{"compression_type": ["gzip"]}'}, "compression_type"),
])
def test_replay_refuses_bad_settings_with_exit_2(args: tuple, env: dict, needle: str) -> None:
    from depois_stream.cli import app

    result = CliRunner().invoke(app, ["replay", *args],
                                env={"DEPOIS_BOOTSTRAP_SERVERS": NOWHERE, **env})
    assert result.exit_code == 2, (result.output, result.exception)
    assert needle in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, needle", [
    (["fit", "--seed", "-1"], "seed"),
    (["fit", "--aux-weight", "inf"], "aux"),
    (["fit", "--batch-size", "99999999999"], "batch"),
    (["evaluate", "--seeds", "-1"], "--seeds"),
    (["evaluate", "--stream-size", "0"], "--stream-size"),
])
def test_training_refuses_out_of_range_numbers_before_any_work(
        tmp_path: Path, args: list[str], needle: str) -> None:
    from training.cli import EXIT_USAGE, app

    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == EXIT_USAGE, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_export_never_replaces_a_device_or_fifo(tmp_path: Path) -> None:
    from training.cli import EXIT_USAGE, app

    run = tmp_path / "run" / "detector"
    run.mkdir(parents=True)
    (run / "detector.json").write_text("{}")
    (run / "detector.pt").write_bytes(b"x")
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    result = CliRunner().invoke(app, ["export-onnx", "--out", str(tmp_path / "run"),
                                      "--model", str(fifo)])
    assert result.exit_code == EXIT_USAGE and "not a regular file" in result.output, result.output
    assert fifo.is_fifo()


def test_recalibrate_refuses_a_fifo_instead_of_waiting_on_it(tmp_path: Path) -> None:
    fifo = tmp_path / "samples.npz"
    os.mkfifo(fifo)
    code = ("from training.recalibrate import CleanDataError, load_clean\n"
            "try:\n"
            f"    load_clean({str(fifo)!r}, (1, 8, 8), 10)\n"
            "except CleanDataError as exc:\n"
            "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)  # before: np.load waited for a writer until killed
    assert "not a file" in proc.stdout, proc.stdout + proc.stderr


def test_valid_settings_the_new_checks_must_not_refuse() -> None:
    """From a review for regressions: each of these worked before the checks and must still."""
    from depois_stream.audit.settings import ReplaySettings
    from depois_stream.filter.clients.kafka_python import check_passthrough
    from depois_stream.filter.config import ConsumerConfig

    for servers in ("kafka", "localhost,kafka:9092", "kafka:9092,", "[::1]:9092", "[::1]"):
        ReplaySettings(bootstrap_servers=servers)  # the clients add port 9092 themselves
    for servers in ("", ",", " "):
        with pytest.raises(ValueError, match="empty"):
            ReplaySettings(bootstrap_servers=servers)
    with pytest.raises(ValueError, match="whole number"):  # packed as is: fails at a fetch
        check_passthrough({"fetch_max_bytes": 52428800.0}, frozenset(), "owned")
    check_passthrough({"request_timeout_ms": 30000, "retries": 5, "api_version": [2, 8],
                       "ssl_check_hostname": False, "sasl_mechanism": "SCRAM-SHA-512",
                       "security_protocol": "SASL_SSL"}, frozenset(), "owned")
    cfg = ConsumerConfig(model_path="m.onnx", breaker_cooldown_s=1e9, ingest_topic="__a.b-c_9",
                         group_id="équipe-données", exit_when_idle_s=30 * 86400)
    assert cfg.breaker_cooldown_s == 1e9  # "never": only the operator's resume file ends it


@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka"])
def test_a_producer_size_limit_that_leaves_no_room_for_a_sample_is_refused(centroid_model: Path, client: str) -> None:
    """Fuzz run (stop 43): max_request_size=100 (kafka-python) started, routed nothing and replaced
    its producer for ever (even the dead letters were refused); 10000 dead-lettered every valid
    sample as too large ("can forward at most -8432"). A limit that fits a sample still starts."""
    if client == "confluent-kafka":
        pytest.importorskip("confluent_kafka")
    def refusal(limit: int, *extra: str) -> str:
        proc = run_cli("run", "--model-path", str(centroid_model), "--device", "cpu", "--client", client,
                       "--kafka", f"max_request_size={limit}", "--startup-timeout-s", "1", "--metrics-port", "0",
                       *extra)
        err = proc.stderr.decode("utf-8", "replace")
        said = [line for line in err.splitlines() if line.startswith("depois-stream run:")]
        assert proc.returncode == 2 and len(said) == 1 and "Traceback" not in err, (proc.returncode, err)
        return said[0]  # the model's load is logged first: the check needs its input shape

    assert "raise it to at least 18,530" in refusal(10000)
    assert "cannot use Kafka" in refusal(20000)  # past the check: it waited for the (absent) broker


def test_a_metrics_endpoint_that_cannot_be_served_names_the_setting_to_fix(centroid_model: Path) -> None:
    """Fuzz run (stop 43): `--metrics-host 999.1.1.1` was told to "pick another --metrics-port"."""
    import socket

    def said(*args: str) -> str:
        proc = run_cli("run", "--model-path", str(centroid_model), "--device", "cpu", "--startup-timeout-s", "1",
                       *args)
        err = proc.stderr.decode("utf-8", "replace")
        lines = [line for line in err.splitlines() if line.startswith("depois-stream run:")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    assert "check --metrics-host" in said("--metrics-host", "999.1.1.1", "--metrics-port", "0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        line = said("--metrics-port", str(busy.getsockname()[1]))
    assert "pick another --metrics-port" in line and "--metrics-host" not in line


def test_a_model_path_that_is_a_device_is_not_called_missing() -> None:
    """Fuzz run (stop 43): `--model-path /dev/null` was said not to exist."""
    proc = run_cli("run", "--model-path", "/dev/null", "--device", "cpu")
    one_line_exit_2(proc, "/dev/null is not a regular file")


@pytest.mark.parametrize("servers", ["", "127.0.0.1:abc", "::::garbage::::", "kafka:0", ",,"])
def test_a_bootstrap_list_that_is_not_host_port_is_refused_at_once(centroid_model: Path, servers: str) -> None:
    """Fuzz run (stop 43): these passed validation and failed only after the start-up timeout,
    as "no answer to a metadata request"; replay refused them already, by the same rule now."""
    proc = run_cli("run", "--model-path", str(centroid_model), "--device", "cpu", "--bootstrap-servers", servers)
    one_line_exit_2(proc, "bootstrap_servers")
