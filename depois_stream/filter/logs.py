"""Logging set-up for the long-running commands: one line per event, and no floods.

During a broker outage the Kafka client libraries log the same connection error several times a
second (kafka-python: 200 to 370 ERROR lines a minute were measured). ``RateLimit`` lets the
first few of each message through per window and then summarises the rest once the window ends,
so an operator sees that the outage goes on, and how often, without losing the filter's own
lines in the noise.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARIES = ("kafka", "librdkafka")


class RateLimit(logging.Filter):
    """At most ``burst`` records per (logger, message template) per ``window_s`` seconds."""

    def __init__(self, burst: int = 5, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self._clock = burst, window_s, clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, count]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "always", False):  # rare lines that state the current truth
            return True
        if record.exc_info and record.name.split(".")[0] in LIBRARIES:
            # a client library's own traceback is noise to an operator: keep its one line
            exc = record.exc_info[1]
            said = f"{type(exc).__name__}: {exc}".replace("%", "%%") if record.args else \
                f"{type(exc).__name__}: {exc}"
            record.msg = f"{record.msg} ({said})"
            record.exc_info = record.exc_text = None
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            start, count = self._seen.get(key, (now, 0))
            if now - start >= self.window_s:
                suppressed = int(count) - self.burst
                if suppressed > 0:
                    record.msg = (f"[{suppressed} more like this in the last "
                                  f"{now - start:.0f} s were not logged] {record.msg}")
                start, count = now, 0
            count = int(count) + 1
            self._seen[key] = [start, count]
            return count <= self.burst


def configure(level: str) -> None:
    """stderr logging at ``level`` for our messages; Kafka libraries at WARNING and above, all
    rate-limited."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in LIBRARIES:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
