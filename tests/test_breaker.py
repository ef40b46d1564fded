"""The poison-rate breaker opens on a wild quarantine rate; a timeout or operator closes it."""

from __future__ import annotations

from depois_stream.filter.breaker import BreakerSettings, CircuitBreaker


def _breaker(**kw) -> CircuitBreaker:
    return CircuitBreaker(BreakerSettings(**{"window": 100, "max_rate": 0.5, "min_samples": 40,
                                             "cooldown_s": 60.0, **kw}))


def test_never_judges_on_too_few_samples() -> None:
    b = _breaker()
    assert not b.observe(30, 30, now=0.0)  # 100 % poisoned, but only 30 < 40 samples
    assert not b.is_open and b.rate == 1.0
    assert b.observe(10, 10, now=1.0)  # 40 samples now: opens
    assert b.is_open and b.trips == 1


def test_opens_only_above_the_limit() -> None:
    b = _breaker()
    assert not b.observe(100, 50, now=0.0)  # exactly 50 % is not above the limit
    assert b.observe(10, 10, now=1.0)  # (50 + 10) / 110 = 55 % > 50 %
    assert b.is_open


def test_old_batches_leave_the_window() -> None:
    b = _breaker()
    assert not b.observe(50, 25, now=0.0)
    for t in range(1, 6):
        assert not b.observe(20, 0, now=float(t))  # clean traffic pushes the bad batch out
    assert b.rate == 0.0
    assert not b.observe(50, 25, now=7.0)  # 25 of 100 in window


def test_cooldown_closes_and_resets_the_window() -> None:
    b = _breaker()
    b.observe(100, 90, now=10.0)
    assert b.is_open
    assert not b.should_close(now=69.0)
    assert b.should_close(now=70.0)
    b.close()
    assert not b.is_open and b.rate == 0.0
    assert not b.observe(20, 20, now=71.0)  # fresh window: below min_samples again


def test_operator_resume_closes_at_once() -> None:
    b = _breaker()
    b.observe(100, 90, now=0.0)
    assert b.should_close(now=0.5, operator_resume=True)
    assert not _breaker().should_close(now=0.5, operator_resume=True)  # nothing to close


def test_observing_while_open_changes_nothing() -> None:
    b = _breaker()
    b.observe(100, 90, now=0.0)
    rate = b.rate
    assert not b.observe(100, 0, now=1.0)
    assert b.rate == rate and b.trips == 1


def test_rate_of_one_disables_the_breaker() -> None:
    b = _breaker(max_rate=1.0)
    assert not b.observe(100, 100, now=0.0)
    assert not b.is_open


def test_an_operator_resume_lets_the_acknowledged_burst_through_then_arms_again() -> None:
    """A campaign above the limit: the operator resumes to keep quarantining it. The batch that
    tripped the breaker comes first after the resume; it must not trip it again, nor anything
    until the rate has been under the limit once (then a new burst trips it as before)."""
    b = _breaker()
    assert b.observe(100, 97, now=0.0)
    assert b.should_close(now=1.0, operator_resume=True)
    b.close(acknowledge=True)
    assert not b.observe(100, 97, now=2.0)  # the held-back batch
    assert not b.observe(100, 90, now=3.0) and not b.is_open  # the campaign goes on
    assert b.acknowledged
    assert not b.observe(100, 10, now=4.0) and not b.acknowledged  # under the limit: armed
    assert b.observe(100, 95, now=5.0) and b.trips == 2  # a new burst trips it again


def test_a_cooldown_resume_is_still_a_probe() -> None:
    b = _breaker()
    b.observe(100, 97, now=0.0)
    assert b.should_close(now=60.0)
    b.close()
    assert not b.acknowledged
    assert b.observe(100, 97, now=61.0)  # the held-back batch trips it again


def test_a_model_change_ends_an_acknowledgement() -> None:
    """The acknowledgement is about one model's verdicts: a new model is judged again."""
    b = _breaker()
    b.observe(100, 97, now=0.0)
    b.close(acknowledge=True)
    assert not b.observe(100, 97, now=1.0)
    assert b.rearm() and not b.acknowledged
    assert b.observe(100, 97, now=2.0)  # the new model quarantines everything: trips
    assert not b.rearm()  # nothing to end
