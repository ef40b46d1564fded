"""Tiny HTTP endpoint: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for orchestrators.

prometheus-client's own server answers every path with metrics, which makes liveness and
readiness probes meaningless; this one keeps the three apart while still using its exposition.

* ``/healthz`` (liveness): 200 while the filter's loop keeps turning; 503 when it is wedged,
  which is what a restart fixes.
* ``/readyz`` (readiness): 200 when the model is loaded, the broker answered a direct probe
  recently and the member is in its consumer group, with or without partitions: a standby
  member of a group with more members than partitions is ready, or rollouts would never finish.
  During a rebalance (from the revocation to the next assignment) it is not: a join that never
  ends must not look like a standby.
Both answer JSON naming each check, so a failing probe says why; ``/readyz`` adds facts that
are not conditions (``partitions_assigned``: how many partitions this member owns).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Checks = Callable[[], dict[str, bool]]
# A connection that has not sent its request (or read its answer) in this long is closed: each
# holds a server thread, and a scanner or slow client on a 0.0.0.0 port would pile them up.
IDLE_TIMEOUT_S = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        """A client that hung up before its answer (a scrape that timed out, a probe killed
        mid-answer) is routine: socketserver's default printed a whole traceback for it, which
        reads like a crash in the filter's log. Anything else is a bug and keeps its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("HTTP client %s left before its answer: %r", client_address[0], exc)
            return
        log.exception("HTTP request from %s failed", client_address[0])


class HealthServer:
    """Serve metrics and probes from a daemon thread; ``port=0`` picks a free port."""

    def __init__(self, registry: CollectorRegistry, readiness: Checks,
                 liveness: Checks = lambda: {}, host: str = "127.0.0.1", port: int = 9108,
                 info: Callable[[], dict[str, object]] = lambda: {}) -> None:
        handler = _make_handler(registry, readiness, liveness, info)
        self._server = _Server((host, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="depois-http",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(registry: CollectorRegistry, readiness: Checks, liveness: Checks,
                  info: Callable[[], dict[str, object]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_TIMEOUT_S  # socket timeout per connection (StreamRequestHandler)

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                checks = liveness()
                ok = all(checks.values())
                body = json.dumps({"status": "alive" if ok else "wedged", "checks": checks})
                self._send(200 if ok else 503, body.encode(), "application/json")
            elif path == "/readyz":
                checks = readiness()
                ok = all(checks.values())
                body = json.dumps({"ready": ok, "checks": checks, **info()}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
            return

    return Handler
