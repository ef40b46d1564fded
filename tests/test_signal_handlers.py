"""Signal handlers that cannot deadlock or nest (stop 45, a reload adversary).

The SIGTERM/SIGINT and SIGHUP handlers used to log. Python runs a handler in the main thread
between two bytecodes, so one that arrived while the main thread held the log rate limiter's
lock waited on its own thread for good (the loop stalled), and each further signal nested one
more handler until ``RecursionError`` ended the filter with exit 3: 1,000 SIGHUPs a second did it
in about 6 s, 50 a second during a reload storm in 12 s. The handlers now only hand the signal
to a relay thread, which logs and acts. The signal is made to land inside a log call, which a
flood only does by chance; each case runs in its own interpreter, bounded, because the failure
is a hang.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import logging, os, signal, sys
    from depois_stream.filter import cli, logs
    logs.configure("INFO")
    checked = []
    class Filter:
        def request_model_check(self):
            checked.append(1)
    cli.check_model_on_sighup(Filter())
    stop = cli.stop_on_signals()
    limiter = logging.getLogger().handlers[0].filters[0]
    with limiter._lock:                  # the main thread is inside a log call ...
        for _ in range(50):              # ... when the signals land (a burst)
            os.kill(os.getpid(), signal.{name})
            for _ in range(1_000):       # bytecodes: a handler runs here
                pass
    if signal.{name} == signal.SIGHUP:
        os.kill(os.getpid(), signal.SIGTERM)
    ok = stop.wait(10)
    sys.exit(0 if ok and (checked or signal.{name} != signal.SIGHUP) else 1)
""")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_signals_landing_inside_a_log_call_are_acted_on(name: str) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT.format(name=name)],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the process hung on a {name} inside a log call: "
                             f"{(exc.stderr or b'')[-2000:]!r}") from None
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{name} received" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_stop_on_gives_back_the_relay_action_it_replaced() -> None:
    """A diff review (stop 45): after `replay release`'s block, a signal the relay served
    before (the filter's stop, run in the same process) still went to the block's stale
    action. And a second signal inside the block stops at once (KeyboardInterrupt)."""
    script = textwrap.dedent("""
        import os, signal, sys, threading, time
        from depois_stream.filter.signals import on_signal, stop_on
        before = threading.Event()
        on_signal(signal.SIGUSR1, lambda s: before.set())
        with stop_on([signal.SIGUSR1], "testing") as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.wait(5) and not before.is_set()
            try:
                os.kill(os.getpid(), signal.SIGUSR1)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # busy: the interrupt lands between bytecodes
                    pass
                sys.exit(3)  # the second signal did not stop at once
            except KeyboardInterrupt:
                pass
        time.sleep(4)  # past the exit deadline: the block's end cancelled it
        os.kill(os.getpid(), signal.SIGUSR1)
        sys.exit(0 if before.wait(5) else 1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_second_signal_stops_at_once_while_the_main_thread_waits(name: str) -> None:
    """`replay release` during a broker outage: its main thread waits on a delivery (a lock,
    up to the delivery timeout plus 10 s) when the operator asks twice. The second signal
    raised KeyboardInterrupt only once that wait ended: 127 to 137 s, where replay.md promises
    a stop at once (an outside drill). If the interrupt has not ended the process within
    STOP_AT_ONCE_S, the process exits as the signal itself would (128 + its number)."""
    script = textwrap.dedent(f"""
        import os, signal, sys, threading
        from depois_stream.filter import logs
        from depois_stream.filter.signals import stop_on
        logs.configure("INFO")
        with stop_on([signal.{name}], "finishing") as stop:
            os.kill(os.getpid(), signal.{name})
            assert stop.wait(5)
            os.kill(os.getpid(), signal.{name})
            threading.Event().wait(60)  # a wait no interrupt wakes
        sys.exit(3)
    """)
    import signal as signal_module
    import time

    t0 = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a second {name} did not stop the process in 30 s") from None
    took = time.monotonic() - t0
    assert done.returncode == 128 + getattr(signal_module, name), (done.returncode, done.stderr)
    assert took < 15, took
    assert f"{name} received again" in done.stderr and "Traceback" not in done.stderr
