"""Noticing that this process did not run at all for a while: stopped (SIGSTOP), a frozen VM, or
a pause that holds every thread (a long garbage collection under the GIL).

Such a member's group session may have expired meanwhile, and its partitions gone to another
member that filtered and committed past where this one stands; until its client learns that
(kafka-python: its first heartbeat answer) it still believes it owns them (``source.Source``
reads the group's commits when this says so). A thread that ticks every second tells a freeze
from a loop that is merely slow (waiting on a broker, loading a model): a freeze stops the
ticks too, a slow loop does not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

TICK_S = 1.0


class FreezeWatch:
    """How long this process did not run, if longer than ``threshold_s``: ``frozen_for`` returns
    the longest such pause since its last call (0.0: none), and forgets it."""

    def __init__(self, threshold_s: float, clock: Callable[[], float] = time.monotonic,
                 tick_s: float = TICK_S) -> None:
        self._threshold_s = threshold_s
        self._clock = clock
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._last_tick = clock()
        self._longest = 0.0  # the longest pause seen between ticks since the last frozen_for()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FreezeWatch:
        self._thread = threading.Thread(target=self._run, name="depois-freeze-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            self.tick(self._clock())

    def tick(self, now: float) -> None:
        """One tick of the watch's thread at ``now``."""
        with self._lock:
            self._longest = max(self._longest, now - self._last_tick - self._tick_s)
            self._last_tick = now

    def frozen_for(self) -> float:
        """The longest pause above ``threshold_s`` since the last call, including one still
        going on for the ticking thread (the caller woke first), else 0.0."""
        now = self._clock()
        with self._lock:
            longest = max(self._longest, now - self._last_tick - self._tick_s)
            self._longest = 0.0
            if longest > self._threshold_s:
                self._last_tick = max(self._last_tick, now)  # not reported twice
                return longest
        return 0.0
