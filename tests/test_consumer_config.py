"""Consumer settings: flags beat env beat the config file; bad settings stop start-up clearly."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from depois_stream.filter.config import ConfigError, load_config


def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = tmp_path / "depois.yaml"
    cfg_file.write_text("batch-size: 64\ngroup_id: from-file\nlinger_ms: 7\nmodel_path: m.onnx\n")
    monkeypatch.setenv("DEPOIS_GROUP_ID", "from-env")
    monkeypatch.setenv("DEPOIS_LINGER_MS", "9")
    cfg = load_config(config_file=cfg_file, linger_ms=11, batch_size=None)
    assert (cfg.batch_size, cfg.group_id, cfg.linger_ms) == (64, "from-env", 11)
    assert cfg.model_path == Path("m.onnx")


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'batch_size = 32\nmodel_path = "m.onnx"\n'),
    (".json", '{"batch_size": 32, "model_path": "m.onnx"}'),
])
def test_toml_and_json_files(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert load_config(config_file=path).batch_size == 32


def test_config_file_named_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model_path: m.onnx\ndevice: cpu\n")
    monkeypatch.setenv("DEPOIS_CONFIG_FILE", str(path))
    assert load_config().device == "cpu"


def test_kafka_security_options_pass_through(tmp_path: Path) -> None:
    cfg = load_config(model_path="m.onnx", client="kafka-python",
                      kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"})
    assert cfg.kafka["security_protocol"] == "SASL_SSL"


def test_kafka_python_security_names_work_with_the_default_client_too() -> None:
    """The default ``auto`` may pick librdkafka: the usual kafka-python security names are
    translated for it, so a deployment written for kafka-python keeps starting."""
    pytest.importorskip("confluent_kafka")
    cfg = load_config(model_path="m.onnx", client="confluent-kafka",
                      kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                             "sasl_plain_username": "u", "sasl_plain_password": "p",
                             "ssl_check_hostname": False})
    assert cfg.kafka["sasl_plain_username"] == "u"
    from depois_stream.filter.clients.confluent import translate

    assert translate({"ssl_check_hostname": False}) == {
        "ssl.endpoint.identification.algorithm": "none"}
    assert translate({"ssl_check_hostname": "true"}) == {
        "ssl.endpoint.identification.algorithm": "https"}
    with pytest.raises(ConfigError, match="use true or false"):  # a typo must not turn it off
        load_config(model_path="m.onnx", client="confluent-kafka",
                    kafka={"ssl_check_hostname": "y"})


def test_a_kafka_python_only_option_under_librdkafka_says_how_to_fix_it() -> None:
    pytest.importorskip("confluent_kafka")
    with pytest.raises(ConfigError, match="dotted names .* or --client kafka-python"):
        load_config(model_path="m.onnx", client="confluent-kafka",
                    kafka={"api_version_auto_timeout_ms": 5})


def test_a_breaker_that_judges_each_large_batch_alone_is_accepted() -> None:
    """A one-sample window still holds the newest batch whole: with batches of 512 the breaker
    judges each on its own, and 200 samples are reached (review: the first rule refused it)."""
    cfg = load_config(model_path="m", client="kafka-python", breaker_window=1, batch_size=512,
                      breaker_min_samples=200)
    assert cfg.breaker_min_samples == 200


@pytest.mark.parametrize("kafka", [
    {"partition.assignment.strategy": "cooperative-sticky"},
    {"partition.assignment.strategy": "range,cooperative-sticky"},
    {"group.protocol": "consumer"},
])
def test_incremental_rebalancing_is_refused_at_start_up(kafka: dict) -> None:
    """The filter takes and hands back whole assignments (eager rebalancing). Under
    cooperative-sticky librdkafka refused its assign() at the first rebalance with an error
    that is no Exception: the filter died with status 1 at every start, after start-up had
    accepted the option."""
    pytest.importorskip("confluent_kafka")
    with pytest.raises(ConfigError, match="incremental"):
        load_config(model_path="m.onnx", client="confluent-kafka", kafka=kafka)


@pytest.mark.parametrize("overrides, message", [
    ({}, "model_path: Field required"),
    ({"model_path": "m", "batch_size": 0}, "batch_size"),
    ({"model_path": "m", "device": "tpu"}, "device"),
    ({"model_path": "m", "bacth_size": 3}, "bacth_size: Extra inputs"),
    ({"model_path": "m", "kafka": {"acks": 0}}, "set by depois-stream itself"),
    ({"model_path": "m", "kafka": {"linger_ms": 5}}, "set by depois-stream itself"),
    ({"model_path": "m", "kafka": {"sasl_pasword": "x"}}, "not kafka-python client options"),
    ({"model_path": "m", "clean_topic": "depois.ingest"}, "topics must differ"),
    ({"model_path": "m", "heartbeat_interval_ms": 5000, "session_timeout_ms": 6000}, "a third"),
    # the window holds at most 100 + 64 - 1 samples: a breaker that can never open
    ({"model_path": "m", "breaker_window": 100, "batch_size": 64, "breaker_min_samples": 200},
     "breaker_min_samples"),
])
def test_bad_settings_name_the_problem(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(**{"client": "kafka-python", **overrides})


def test_no_depois_variable_the_project_itself_reads_or_sets_is_called_unknown() -> None:
    """`run` warns about DEPOIS_* variables that set nothing (a misspelt setting), so every
    variable another command or a deployment file uses must be known to it: a shell that
    exports `depois-train`'s signing password was told it "sets nothing" and offered a guess."""
    import re

    from depois_stream.filter.config import unknown_env

    root = Path(__file__).resolve().parents[1]
    kinds = {".py", ".yaml", ".yml", ".json", ".sh", ".runtime", ".train", ""}
    files = [p for d in ("depois_stream", "training", "deploy", "benchmarks", ".ci")
             for p in (root / d).rglob("*") if p.is_file() and p.suffix in kinds]
    files += [root / "docker-compose.yml", root / "Makefile", root / "README.md",
              *(root / "docs").glob("*.md")]
    used = {name for p in files for name in re.findall(r"\bDEPOIS_[A-Z][A-Z0-9_]*[A-Z0-9]\b",
                                                       p.read_text(errors="replace"))}
    # options.py's help-text placeholder (DEPOIS_<NAME>) and unknown_env's own misspelt example
    used -= {"DEPOIS_NAME", "DEPOIS_VERIFY_SIGNATUR"}
    assert len(used) > 20, sorted(used)
    assert unknown_env(dict.fromkeys(used, "x")) == ([], [])


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid yaml"):
        load_config(config_file=bad)
    (tmp_path / "c.ini").write_text("x=1")
    with pytest.raises(ConfigError, match="unknown extension"):
        load_config(config_file=tmp_path / "c.ini")


@contextmanager
def logging_set_up_kept() -> Iterator[None]:
    """`run` called in process points the root logger at the runner's stderr, which is closed
    afterwards: later tests' background Kafka threads would log into it. Put the set-up back."""
    import logging

    from depois_stream.filter.logs import LIBRARIES

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in LIBRARIES}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lib_level in levels.items():
            logging.getLogger(name).setLevel(lib_level)


def test_run_called_in_process_refuses_a_bad_model_with_exit_2(tmp_path: Path) -> None:
    """`run` through typer's test runner (or a notebook), where stderr is not a file: the crash
    handler must not turn the documented exit 2 into an unrelated error before start-up."""
    from typer.testing import CliRunner

    from depois_stream.cli import app

    with logging_set_up_kept():
        result = CliRunner().invoke(app, ["run", "--model-path", str(tmp_path / "missing.onnx"),
                                          "--bootstrap-servers", "127.0.0.1:1"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "missing.onnx" in result.output


def test_an_unexpected_error_in_the_loop_exits_3_and_names_it(centroid_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (any exception the filter does not expect) must not look like exit 1, which tells an
    SRE "check the broker": it stops with its own documented code, one line naming the error and
    the traceback in the log for the bug report."""
    from typer.testing import CliRunner

    from depois_stream.cli import app
    from depois_stream.filter import app as filter_app
    from depois_stream.filter.cli import EXIT_CRASH

    def broken_run(self: object, stop: object = None) -> object:
        raise ZeroDivisionError("a bug in the loop")

    monkeypatch.setattr(filter_app.StreamFilter, "run", broken_run)
    with logging_set_up_kept():
        result = CliRunner().invoke(app, ["run", "--model-path", str(centroid_model), "--device", "cpu",
                                          "--bootstrap-servers", "127.0.0.1:1", "--metrics-port", "0"])
    assert EXIT_CRASH not in (0, 1, 2)
    assert result.exit_code == EXIT_CRASH, (result.output, result.exception)
    assert "ZeroDivisionError: a bug in the loop" in result.output
    assert "Traceback" in result.output  # logged once, for the bug report


def test_a_malformed_kafka_option_is_a_usage_error_not_a_crash() -> None:
    """`--kafka foo` is the operator's typo: exit 2 naming the option, never exit 3 ("a bug")."""
    proc = _cli("run", "--model-path", "m.onnx", "--kafka", "foo")
    assert proc.returncode == 2, proc.stderr
    assert "--kafka" in proc.stderr and "Traceback" not in proc.stderr and "a bug" not in proc.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "depois_stream", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_refuses_a_bad_model_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage")
    (tmp_path / "model.card.json").write_text("{}")
    proc = _cli("run", "--model-path", str(bad), "--bootstrap-servers", "127.0.0.1:1")
    assert proc.returncode == 2
    assert "model card" in proc.stderr and "not valid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    proc = _cli("run", "--model-path", str(tmp_path / "m.onnx"), "--batch-size", "0")
    assert proc.returncode == 2
    assert "batch_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka"])
def test_cli_unreachable_broker_exits_2_with_what_to_check(centroid_model: Path,
                                                           client: str) -> None:
    pytest.importorskip({"kafka-python": "kafka", "confluent-kafka": "confluent_kafka"}[client])
    fast = ["--kafka", "bootstrap_timeout_ms=300"] if client == "kafka-python" else []
    proc = _cli("run", "--model-path", str(centroid_model), "--device", "cpu", "--client", client,
                "--bootstrap-servers", "127.0.0.1:1", "--metrics-port", "0",
                *fast, "--startup-timeout-s", "2")
    assert proc.returncode == 2
    assert "cannot use Kafka at 127.0.0.1:1" in proc.stderr and "Traceback" not in proc.stderr


def test_busy_metrics_port_is_a_startup_error(centroid_model: Path) -> None:
    from depois_stream.filter.app import StartupError, StreamFilter

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flt = StreamFilter(load_config(model_path=centroid_model, device="cpu", metrics_port=port,
                                       bootstrap_servers="127.0.0.1:1"))
        expected = f"cannot serve metrics on 127.0.0.1:{port}.*--metrics-port"
        with pytest.raises(StartupError, match=expected):
            flt.run()


def test_series_that_dashboards_divide_by_exist_before_the_first_record(centroid_model: Path) -> None:
    """rate() over a series that appears only with its first sample misses that first burst."""
    from prometheus_client import generate_latest

    from depois_stream.filter.app import StreamFilter

    flt = StreamFilter(load_config(model_path=centroid_model, device="cpu", ingest_topic="in.x",
                                   bootstrap_servers="127.0.0.1:1"))
    text = generate_latest(flt.metrics.registry).decode()
    assert 'depois_records_consumed_total{topic="in.x"} 0.0' in text
    for label in range(10):
        assert f'depois_quarantined_by_label_total{{label="{label}"}} 0.0' in text
    provider = flt.detector.provider
    assert f'depois_inference_duration_seconds_count{{provider="{provider}"}} 0.0' in text


@pytest.mark.parametrize("installed, expected", [
    ((2, 16), "confluent-kafka"), ((3, 0), "confluent-kafka"),
    ((2, 12), "kafka-python"), (None, "kafka-python")])
def test_a_plain_run_takes_librdkafka_when_a_usable_one_is_installed(
        monkeypatch: pytest.MonkeyPatch, installed: tuple[int, int] | None, expected: str) -> None:
    """The default client is ``auto``: a newcomer who installed the ``fast`` extra and typed
    ``depois-stream run`` got kafka-python, half the throughput (docs/performance.md). An older
    confluent-kafka pulled in by another package (Quix Streams pins < 2.13; 2.12 crashed on a
    re-created topic) must not become the client."""
    from depois_stream.filter import clients

    monkeypatch.setattr(clients, "confluent_version", lambda: installed)
    cfg = load_config(model_path="m.onnx")
    assert cfg.client == "auto"
    assert clients.resolve(cfg.client) == expected
    assert clients.resolve("kafka-python") == "kafka-python"


def test_the_installed_confluent_kafka_version_is_read() -> None:
    from depois_stream.filter import clients

    version = clients.confluent_version()
    if clients.confluent_installed():
        assert version is not None and version >= (2, 0)
    else:
        assert version is None


def test_liveness_fails_once_too_many_abandoned_client_calls_are_stuck(
        centroid_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a broker that never answers, an exactly-once member abandons a transactional call
    (and the producer handle inside it) about once a minute; nothing capped them, so a long
    enough outage would exhaust the process's memory. Above the cap /healthz fails, and the
    count is exported for the dashboards."""
    from prometheus_client import generate_latest

    from depois_stream.filter import app

    flt = app.StreamFilter(load_config(model_path=centroid_model, device="cpu",
                                       bootstrap_servers="127.0.0.1:1"))
    stuck = [0]
    monkeypatch.setattr(app, "abandoned_calls", lambda: stuck[0])
    assert flt._liveness()["abandoned_calls_below_cap"]
    stuck[0] = app.MAX_ABANDONED_CALLS + 1
    assert not flt._liveness()["abandoned_calls_below_cap"]
    import re

    text = generate_latest(flt.metrics.registry).decode()
    assert re.search(r"^depois_client_calls_abandoned \d+\.0$", text, flags=re.M)


def test_liveness_stays_up_while_start_up_waits_for_the_broker(centroid_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A member started during a broker outage waits up to --startup-timeout-s; the wait is the
    loop turning, not a wedge. Before, the stall clock ran from construction: raised past the
    stall limit (to ride out an outage instead of crash-looping on Kubernetes), /healthz said
    "wedged" mid-wait and liveness killed the pod with a misleading reason."""
    import threading
    import urllib.error
    import urllib.request

    from depois_stream.filter.app import StartupError, StreamFilter

    flt = StreamFilter(load_config(model_path=centroid_model, device="cpu", metrics_port=0,
                                   bootstrap_servers="127.0.0.1:1", startup_timeout_s=60,
                                   probe_interval_s=1))  # one wait step: a 1 s probe + 1 s pause
    monkeypatch.setattr(flt, "_stall_limit_s", lambda: 3.0)
    stop, failed = threading.Event(), []

    def run() -> None:
        try:
            flt.run(stop)
        except StartupError as exc:  # the stop below ends the wait; anything else is the bug
            failed.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while flt.http_address is None:
            assert time.monotonic() < deadline and runner.is_alive(), "the probe server never started"
            time.sleep(0.05)
        time.sleep(7.0)  # more than twice the stall limit, still inside the start-up wait
        assert runner.is_alive(), failed
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{flt.http_address[1]}/healthz", timeout=2) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode()
        assert status == 200, body
    finally:
        stop.set()
        runner.join(timeout=20)
    assert not runner.is_alive() and not failed


def test_the_ingest_is_read_committed_in_both_delivery_modes(centroid_model: Path) -> None:
    """Fuzz run (stop 43): in at-least-once mode the filter read uncommitted, so the 28 records
    of an aborted upstream transaction were routed (18 to clean): data its producer retracted
    went into training data. Both clients take ``read_committed`` from these settings
    (Tansu cannot show the difference: it shows aborted records to every reader)."""
    from depois_stream.filter.app import StreamFilter

    for exactly_once in (False, True):
        flt = StreamFilter(load_config(model_path=centroid_model, device="cpu", metrics_port=None,
                                       exactly_once=exactly_once))
        assert flt._client_settings().read_committed


def test_the_log_level_is_a_depois_variable_like_every_other_setting(tmp_path: Path) -> None:
    """--log-level was the one run option without a DEPOIS_* variable: DEPOIS_LOG_LEVEL=DEBUG
    was warned about as setting nothing and the level stayed INFO."""
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("DEPOIS_")}
    args = [sys.executable, "-m", "depois_stream", "run", "--model-path", str(tmp_path / "m.onnx")]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=60,
                           env={**base, "DEPOIS_LOG_LEVEL": "ERROR"})
    assert quiet.returncode == 2
    assert "sets nothing" not in quiet.stderr and " WARNING " not in quiet.stderr, quiet.stderr
    loud = subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={**base, "DEPOIS_LOG_LEVEL": "LOUD"})
    assert loud.returncode == 2 and "LOUD" in loud.stderr and "Traceback" not in loud.stderr


def test_a_probe_that_cannot_reach_a_broker_leaves_no_thread_behind() -> None:
    """kafka-python starts a network thread before its first bootstrap and leaves it running
    when the bootstrap fails; the broker probe builds a new admin client at each check while the
    broker is away, so an outage grew one thread (and its selector) per check, without bound
    and without showing in depois_client_calls_abandoned (a reviewer's find, stop 50)."""
    import threading
    import time

    from depois_stream.filter.clients import make_client
    from depois_stream.filter.clients.base import ClientSettings
    from depois_stream.sim.broker import free_port

    def io_threads() -> int:
        return sum(t.name.startswith("kafka-io") for t in threading.enumerate())

    before = io_threads()
    probe = make_client("kafka-python").probe(ClientSettings(
        bootstrap_servers=f"127.0.0.1:{free_port()}", client_id="p", group_id="p"))
    try:
        for _ in range(3):
            assert probe.check(0.5) is False
    finally:
        probe.close()
    deadline = time.monotonic() + 5
    while io_threads() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert io_threads() == before, [t.name for t in threading.enumerate()]


def test_the_second_opinion_reader_gets_the_security_options_in_kafka_python_names() -> None:
    """confluent-kafka's second opinion (a kafka-python reader) must authenticate as the filter
    does: librdkafka's names of the security options become kafka-python's, and one with no
    equivalent refuses the reader rather than letting it connect without it (a diff review,
    stop 51: they were dropped, and the reader connected in plain text)."""
    from depois_stream.filter.clients.confluent import kafka_python_options

    given = {"security.protocol": "SASL_SSL", "sasl.mechanisms": "PLAIN", "sasl.username": "u",
             "sasl.password": "p", "ssl.ca.location": "/ca.pem",
             "ssl.endpoint.identification.algorithm": "none", "fetch.min.bytes": 1,
             "ssl_certfile": "/c.pem"}
    assert kafka_python_options(given) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u",
        "sasl_plain_password": "p", "ssl_cafile": "/ca.pem", "ssl_check_hostname": False,
        "fetch.min.bytes": 1, "ssl_certfile": "/c.pem"}
    with pytest.raises(ValueError, match="sasl.oauthbearer.config"):
        kafka_python_options({"sasl.oauthbearer.config": "x"})
