"""The probe endpoint under a client that connects and never finishes a request.

Before: each such connection held a server thread for ever. Bound to 0.0.0.0 in a container, a
port scanner or a slow client accumulates them (memory, threads) on the one process whose
/healthz decides whether Kubernetes restarts it.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

import depois_stream.filter.http as http_module
from depois_stream.filter.http import HealthServer

pytestmark = pytest.mark.serial  # an idle connection must be closed within 5 s


def test_a_connection_that_sends_nothing_is_closed_and_probes_still_answer(monkeypatch) -> None:
    monkeypatch.setattr(http_module, "IDLE_TIMEOUT_S", 1.0, raising=False)
    server = HealthServer(CollectorRegistry(), readiness=lambda: {"ok": True}, port=0).start()
    try:
        host, port = server.address
        idle = socket.create_connection((host, port))
        idle.sendall(b"GET /metr")  # a request line that never ends
        idle.settimeout(10)
        started = time.monotonic()
        try:
            closed = idle.recv(1024) == b""
        except socket.timeout:
            closed = False
        finally:
            idle.close()
        assert closed and time.monotonic() - started < 5, "the idle connection was kept open"
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=5) as reply:
            assert reply.status == 200
    finally:
        server.close()


def test_a_client_that_hangs_up_before_its_answer_leaves_no_traceback_in_the_log(capfd) -> None:
    """socketserver printed a full BrokenPipeError traceback ("Exception occurred during
    processing of request") for each scrape whose client left early (a timed-out Prometheus, a
    probe killed mid-answer): in the filter's log it reads like a crash (fuzz drill)."""
    server = HealthServer(CollectorRegistry(), readiness=lambda: {"ok": True}, port=0).start()
    try:
        host, port = server.address
        for _ in range(5):
            s = socket.create_connection((host, port))
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # gone before the blank line and the answer
            s.close()
        time.sleep(1.0)
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=5) as reply:
            assert reply.status == 200
    finally:
        server.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err[-2000:]
