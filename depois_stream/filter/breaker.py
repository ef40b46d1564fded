"""Poison-rate circuit breaker: stop consuming when the quarantine rate is implausibly high.

A real poisoning campaign is a minority of the stream; a quarantine rate above the limit far
more often means a mis-calibrated or wrong model, which would otherwise silently divert the whole
stream into quarantine. So the breaker *opens* (the consumer pauses its partitions and hands the
offending batch back uncommitted) and waits for a human or a timeout instead.

State machine (pure; the caller passes the clock so tests need no sleeps):

    closed --(>= min_samples in window and rate > max_rate)--> open
    open --(cooldown elapsed)--> closed, with an empty window (a probe)
    open --(operator resume)--> closed and *acknowledged*, with an empty window
    acknowledged --(>= min_samples in window and rate <= max_rate)--> closed (armed again)

Resuming after the cooldown is a probe: if the model is still wrong the next window trips it
again. An operator's resume *under the model that tripped it* is a decision about the burst ("this is
a campaign, keep quarantining it"), so the breaker does not trip again until the quarantine rate
has come back under the limit once: without that, a real campaign above the limit tripped it
again on the very batch it had held back, and no resume ever got past it. A resume after a model
change is a probe like the cooldown's (the new model is what is being judged), and a model
change while acknowledged arms the breaker again (``rearm``): the acknowledgement is about one
model's verdicts, never a blanket "stop judging".
The window counts *samples*, not batches, so the limit means the same at any batch size.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BreakerSettings:
    window: int = 1000  # samples the rate is computed over
    max_rate: float = 0.5  # open when the quarantined fraction exceeds this
    min_samples: int = 200  # never judge on fewer scored samples than this
    cooldown_s: float = 300.0  # an open breaker closes by itself after this long


@dataclass
class CircuitBreaker:
    settings: BreakerSettings = field(default_factory=BreakerSettings)
    opened_at: float | None = None
    trips: int = 0
    acknowledged: bool = False  # an operator resumed: no trip until the rate is back under the limit
    _batches: deque[tuple[int, int]] = field(default_factory=deque)  # (scored, quarantined)
    _scored: int = 0
    _quarantined: int = 0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    @property
    def samples(self) -> int:
        """Scored samples currently in the window (fewer than ``window`` early on)."""
        return self._scored

    @property
    def rate(self) -> float:
        """Quarantined fraction of the samples in the window (0 when the window is empty)."""
        return self._quarantined / self._scored if self._scored else 0.0

    def would_trip(self, scored: int, quarantined: int) -> bool:
        """Whether adding this batch would open the breaker (the caller can then hold it back)."""
        return not self.acknowledged and self._above(*self._window_after(scored, quarantined))

    def _above(self, total: int, bad: int) -> bool:
        return total >= self.settings.min_samples and bad / total > self.settings.max_rate

    def observe(self, scored: int, quarantined: int, now: float) -> bool:
        """Add a batch to the window; returns True when this batch opened the breaker."""
        if self.is_open or scored == 0:
            return False
        tripped = self.would_trip(scored, quarantined)
        self._batches.append((scored, quarantined))
        self._scored += scored
        self._quarantined += quarantined
        self._trim()
        if self.acknowledged and self._scored >= self.settings.min_samples and not self._above(
                self._scored, self._quarantined):
            self.acknowledged = False  # the acknowledged burst is over: judge again
        if tripped:
            self.opened_at = now
            self.trips += 1
        return tripped

    def should_close(self, now: float, operator_resume: bool = False) -> bool:
        return self.opened_at is not None and (
            operator_resume or now - self.opened_at >= self.settings.cooldown_s)

    def close(self, acknowledge: bool = False) -> None:
        """Resume with an empty window so the next verdict is judged on fresh samples;
        ``acknowledge`` (an operator's resume) holds it closed until the rate is under the limit."""
        self.opened_at = None
        self.acknowledged = acknowledge
        self._batches.clear()
        self._scored = self._quarantined = 0

    def rearm(self) -> bool:
        """End an acknowledgement (the model changed); True when there was one to end."""
        was, self.acknowledged = self.acknowledged, False
        return was

    def _window_after(self, scored: int, quarantined: int) -> tuple[int, int]:
        total, bad = self._scored + scored, self._quarantined + quarantined
        for old_scored, old_bad in self._batches:  # oldest first, drop while still a full window
            if total - old_scored < self.settings.window:
                break
            total, bad = total - old_scored, bad - old_bad
        return total, bad

    def _trim(self) -> None:
        while self._batches and self._scored - self._batches[0][0] >= self.settings.window:
            old_scored, old_bad = self._batches.popleft()
            self._scored -= old_scored
            self._quarantined -= old_bad
