"""`depois-stream broker` that cannot serve says so and exits: it once printed its bootstrap and
ran on while its Tansu had died of a taken port (every later command then talked to whatever held
the port), and a port held by something that is not Kafka gave a 100-line traceback."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from depois_stream.sim.broker import BrokerError, LocalBroker

pytestmark = pytest.mark.slow  # real Tansu processes


def _broker_command(*args: str, env: dict[str, str] | None = None,
                    timeout_s: float = 40) -> subprocess.CompletedProcess[str]:
    """Run the command to its end; one that keeps serving past ``timeout_s`` fails the test."""
    proc = subprocess.Popen([sys.executable, "-m", "depois_stream", "broker", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
        pytest.fail(f"still serving after {timeout_s} s; stdout {out!r}, stderr {err!r}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("depois-stream broker: "), result.stderr
    assert "bootstrap:" not in result.stdout, result.stdout
    return lines[0]


@pytest.fixture
def listener() -> Iterator[int]:
    """A port held by something that is not Kafka: it accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _fake_tansu(tmp_path: Path, body: str) -> dict[str, str]:
    """DEPOIS_TANSU pointing at a script that plays a Tansu which dies (``body`` gets the port)."""
    script = tmp_path / "tansu"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import socket, sys, time
        url = sys.argv[sys.argv.index("--listener-url") + 1]
        port = int(url.rsplit(":", 1)[1])
    """) + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"DEPOIS_TANSU": str(script)}


def test_a_port_another_broker_holds_is_refused_in_one_line(broker, tmp_path: Path) -> None:
    result = _broker_command("--port", str(broker.port), "--log-file", str(tmp_path / "t.log"))
    line = _one_line(result)
    assert result.returncode == 2
    assert f"127.0.0.1:{broker.port} is already in use" in line and "--port" in line, line


def test_a_port_held_by_something_not_kafka_is_refused_in_one_line(listener: int) -> None:
    result = _broker_command("--port", str(listener))
    line = _one_line(result)
    assert result.returncode == 2
    assert f"127.0.0.1:{listener} is already in use" in line, line


def test_tansu_dying_at_start_up_is_reported_with_its_reason_and_log(tmp_path: Path) -> None:
    env = _fake_tansu(tmp_path, """\
        print("thread 'tokio-rt-worker' panicked at tansu-broker/src/broker.rs:139:18:")
        print("called `Result::unwrap()` on an `Err` value: Io(AddrInUse)")
        sys.exit(101)
    """)
    log = tmp_path / "tansu.log"
    result = _broker_command("--log-file", str(log), env=env)
    line = _one_line(result)
    assert result.returncode == 2
    assert "exited with code 101" in line and "Io(AddrInUse)" in line and str(log) in line, line


def test_without_a_log_file_the_start_up_failure_names_a_log_that_exists(tmp_path: Path) -> None:
    env = _fake_tansu(tmp_path, """\
        print("ERROR storage engine unavailable")
        sys.exit(0)
    """)
    line = _one_line(_broker_command(env=env))
    logged = Path(line.rsplit("its log: ", 1)[1])
    try:
        assert "storage engine unavailable" in logged.read_text(), line
    finally:
        logged.unlink()


def test_tansu_dying_while_serving_ends_the_command(tmp_path: Path) -> None:
    env = _fake_tansu(tmp_path, """\
        server = socket.socket()
        server.bind(("127.0.0.1", port))
        server.listen()
        time.sleep(2)
        print("thread 'main' panicked at src/main.rs:1:1:")
        print("out of memory")
        sys.exit(3)
    """)
    log = tmp_path / "tansu.log"
    result = _broker_command("--no-create-topics", "--log-file", str(log), env=env)
    assert result.stdout.startswith("bootstrap: 127.0.0.1:"), result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("depois-stream broker: "), result.stderr
    assert result.returncode == 1
    assert "exited with code 3 while serving" in lines[0] and "out of memory" in lines[0], lines[0]
    assert str(log) in lines[0]


def test_local_broker_refuses_a_taken_port(broker, tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match=f"127.0.0.1:{broker.port} is already in use"):
        LocalBroker(port=broker.port, log_path=tmp_path / "t.log").start()


def test_a_broker_restarts_on_the_port_its_predecessor_just_left(tmp_path: Path) -> None:
    """Connections the old broker closed leave the port in TIME_WAIT; that is not "in use"."""
    first = LocalBroker(log_path=tmp_path / "a.log").start()
    try:
        consumer = KafkaConsumer(bootstrap_servers=first.bootstrap)
        consumer.topics()
    finally:
        first.stop()
    consumer.close()
    with LocalBroker(port=first.port, log_path=tmp_path / "b.log") as second:
        consumer = KafkaConsumer(bootstrap_servers=second.bootstrap)
        try:
            assert consumer.topics() is not None
        finally:
            consumer.close()


def test_broker_help_documents_the_exit_codes() -> None:
    result = subprocess.run([sys.executable, "-m", "depois_stream", "broker", "--help"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert "Exit codes: 0 stopped" in text and "2 could not start" in text, text


def test_an_unexpected_error_while_creating_topics_does_not_leave_tansu_holding_the_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: only broker and Kafka errors stopped the broker; any other exception from the
    admin client left Tansu running in its own session, and the next start found the port taken."""
    from typer.testing import CliRunner

    import depois_stream.sim.broker as broker_module
    from depois_stream.cli import app
    from depois_stream.sim.broker import check_port_free, free_port

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("an admin-client bug")

    monkeypatch.setattr(broker_module, "create_topics", boom)
    port = free_port("127.0.0.1")
    result = CliRunner().invoke(app, ["broker", "--port", str(port)])
    assert isinstance(result.exception, AssertionError), result.output
    check_port_free("127.0.0.1", port)  # raises PortInUse if Tansu were still there
