"""Operator-facing logs: floods are summarised, client-library tracebacks are one line."""

from __future__ import annotations

import logging

from depois_stream.filter.logs import FORMAT, RateLimit


def _handler(clock) -> tuple[logging.Handler, list[str]]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    h = Collect()
    h.setFormatter(logging.Formatter(FORMAT))
    h.addFilter(RateLimit(burst=2, window_s=60.0, clock=clock))
    return h, lines


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def test_a_repeated_message_is_let_through_then_summarised_once_the_window_ends():
    now = [0.0]
    h, lines = _handler(lambda: now[0])
    log = _logger("kafka.conn", h)
    for _ in range(10):
        log.error("connect to %s failed", "127.0.0.1:9092")
    assert len(lines) == 2
    now[0] = 61.0
    log.error("connect to %s failed", "127.0.0.1:9092")
    assert len(lines) == 3 and "[8 more like this in the last 61 s were not logged]" in lines[2]


def test_a_client_library_traceback_becomes_one_line_with_the_exception():
    h, lines = _handler(lambda: 0.0)
    log = _logger("kafka.producer.sender", h)
    try:
        raise ValueError("100% broken")
    except ValueError:
        log.exception("sender failed for %s", "p0")
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert lines[0].endswith("sender failed for p0 (ValueError: 100% broken)")


def test_our_own_tracebacks_are_kept():
    h, lines = _handler(lambda: 0.0)
    log = _logger("depois_stream.test", h)
    try:
        raise ValueError("ours")
    except ValueError:
        log.exception("failed")
    assert "Traceback" in lines[0]
