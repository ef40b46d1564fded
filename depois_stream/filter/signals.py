"""Signals, acted on outside their handlers.

Python runs a signal handler in the main thread between two bytecodes, whatever that thread
holds. A handler that logs waited for good when the signal landed inside a log call (the rate
limiter's lock is the main thread's own), and each further signal nested one more waiting handler
until ``RecursionError`` (stop 45: 1,000 SIGHUPs a second ended the filter with exit 3 in about
6 s). So the handler only writes the signal's number to a pipe, which takes no Python lock, and
a relay thread reads it and does the work: log, set the stop flag, ask for a model check. A burst
of the same signal read in one go is acted on once.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

# A second stop signal interrupts the main thread; one that is waiting on a lock or inside a C
# call sees that only when the wait ends (a delivery during a broker outage: over two minutes).
# If the process is still there this long after, it exits as the signal itself would.
STOP_AT_ONCE_S = 2.0

Action = Callable[[signal.Signals], None]


class SignalRelay:
    """One per process (signal dispositions are): ``on(signum, action)`` from the main thread."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._actions: dict[int, Action] = {}
        threading.Thread(target=self._relay, name="depois-signals", daemon=True).start()

    def on(self, signum: signal.Signals, action: Action | None) -> tuple[Any, Action | None]:
        """Relay ``signum`` to ``action``; returns the previous OS handler and relay action.
        ``action=None`` only forgets the relay's action (the caller restores the OS handler)."""
        previous = self._actions.pop(int(signum), None)
        if action is None:
            return signal.getsignal(signum), previous
        self._actions[int(signum)] = action
        return signal.signal(signum, self._handler), previous

    def _handler(self, signum: int, _frame: object) -> None:
        try:
            os.write(self._write_fd, bytes([signum]))
        except OSError:  # the pipe is full: a flood, and this signal is queued there already
            pass

    def _relay(self) -> None:
        while True:
            received = os.read(self._read_fd, 512)
            for signum in dict.fromkeys(received):  # once per burst, in arrival order
                action = self._actions.get(signum)
                if action is None:
                    continue
                try:
                    action(signal.Signals(signum))
                except Exception:  # an action's bug must not end signal handling
                    log.exception("acting on %s failed", signal.Signals(signum).name)


_relay: SignalRelay | None = None


def on_signal(signum: signal.Signals, action: Action | None) -> tuple[Any, Action | None]:
    """Run ``action(signum)`` in the relay thread whenever ``signum`` arrives (main thread only,
    like ``signal.signal``). Returns the previous OS handler and relay action, to restore."""
    global _relay
    if _relay is None:
        _relay = SignalRelay()
    return _relay.on(signum, action)


@contextmanager
def stop_on(signums: Iterable[signal.Signals], says: str) -> Iterator[threading.Event]:
    """An event set when one of ``signums`` arrives (logged with ``says``), for the length of
    the block; the previous handlers come back after it (a command run in-process, by a test
    or a notebook, leaves Ctrl-C as it found it)."""
    stop = threading.Event()
    exits: list[threading.Timer] = []
    lock = threading.Lock()  # closing the block and exiting the process exclude each other
    closed: list[bool] = []

    def exit_now(signum: signal.Signals) -> None:
        with lock:  # held into os._exit: the block cannot end halfway through an exit
            if not closed:
                _exit_as(signum)

    def stop_now(signum: signal.Signals) -> None:
        with lock:
            if closed:  # the block ended: the handlers are being given back
                return
            again = stop.is_set()
            if again and not exits:
                exits.append(threading.Timer(STOP_AT_ONCE_S, exit_now, args=(signum,)))
                exits[0].daemon = True
                exits[0].start()
        if again:  # asked twice: stop at once, as Ctrl-C would without this block
            log.warning("%s received again: stopping at once", signum.name)
            _thread.interrupt_main()
            return
        log.warning("%s received: %s (again to stop at once)", signum.name, says)
        stop.set()

    previous = {s: on_signal(s, stop_now) for s in signums}
    try:
        yield stop
    finally:
        with lock:  # the interrupt ended the block: no exit behind its back, and no new one
            closed.append(True)
            for timer in exits:
                timer.cancel()
        for s, (handler, action) in previous.items():
            if action is not None:  # the relay served it before: give the action back
                on_signal(s, action)
            else:
                on_signal(s, None)
                signal.signal(s, handler)


def _exit_as(signum: signal.Signals) -> None:
    """End the process now, with the status the signal's default action gives (128 + its
    number), after the interrupt did not: the main thread is blocked where no interrupt
    reaches it. One line straight to file descriptor 2: the blocked main thread may hold the
    logging or stdio locks (a write to a full pipe), which would keep this from ever exiting."""
    line = (f"{signum.name}: the main thread is still waiting (on the broker?) "
            f"{STOP_AT_ONCE_S:.0f} s after the interrupt: exiting now, status {128 + signum}\n")
    try:
        os.write(2, line.encode())
    except OSError:  # no stderr: exit all the same
        pass
    os._exit(128 + int(signum))
