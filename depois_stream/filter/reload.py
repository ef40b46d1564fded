"""Model hot reload: notice a replaced model file between batches, verify it, swap it in.

The watcher looks at the (inode, mtime, ctime, size) of the ONNX file, its model card and its
signature (a store-style swap can keep size and mtime; the inode or ctime still moves), because
a deployment copies them separately: the model alone changing first (sha256 mismatch against the
old card, rejected) must be retried once the card arrives. A candidate goes through the same
``Detector.load`` checks as at start-up; if it fails, the running model stays and the rejection is
logged and counted, so a bad push cannot take the filter down: whatever a candidate fails on,
an unreadable path, a folder in its place or a graph that onnxruntime cannot run, is a rejection.
So is a change of input contract (input shape, number of classes): the stream's records are
shaped for the serving model, and a reload is not how producers and filter change format
together; a restart is.
Only a file whose sha256 differs from the serving model's counts as a new model (touching the file
does nothing). The first poll always compares: a model replaced while the filter was starting
(waiting for the broker, say) is noticed then.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from depois_stream.contract import card_path_for, sha256_file
from depois_stream.contract.signing import signature_path_for
from depois_stream.filter.detector import ModelLoadError, Detector

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int, int] | None, ...]
# Reload lines are rare and each one says which model serves: never rate-limited away
# (``logs.RateLimit``), or after a burst of deploys the last line would name an older model.
_ALWAYS = {"always": True}


def file_signature(*paths: Path) -> Signature:
    """Cheap change detector: (inode, mtime_ns, ctime_ns, size) per file (through symlinks),
    None where a file is absent or cannot be looked at."""
    out: list[tuple[int, int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        except OSError:  # absent, a symlink loop, a folder that cannot be searched
            out.append(None)
    return tuple(out)


class ModelWatcher:
    """Call ``poll()`` between batches; it returns a new ``Detector`` when one was swapped in."""

    def __init__(self, current: Detector, load: Callable[[Path], Detector], interval_s: float,
                 on_outcome: Callable[[str], None] = lambda outcome: None,
                 clock: Callable[[], float] = time.monotonic,
                 now: threading.Event | None = None,
                 on_refused: Callable[[str], None] = lambda reason: None,
                 on_file_state: Callable[[bool], None] = lambda refused: None) -> None:
        """``on_outcome``: "loaded" or "rejected" per candidate. ``on_refused``: the reason code
        of a rejection that ``load`` did not raise as a ``ModelLoadError`` (which its caller
        counts by reason already): a contract change, or an error nobody expected.
        ``on_file_state``: whether the file on disk is a refused (or missing) model, after every
        look at it: a state, unlike the rejection count, so an alert on it lasts as long as the
        bad file does and clears when it is fixed (stop 43: a 30-minute window cleared while the
        bad file stayed, and kept firing after the good one was back)."""
        self.current = current
        self._load = load
        self._interval_s = interval_s
        self._on_outcome = on_outcome
        self._on_refused = on_refused
        self._on_file_state = on_file_state
        self._clock = clock
        self._now = now or threading.Event()  # set: check at the next poll (SIGHUP)
        self._paths = (current.path, card_path_for(current.path),
                       signature_path_for(current.path))
        self._signature: Signature | None = None  # the first poll compares the file's sha256
        self._at_start = file_signature(*self._paths)  # the card's and signature's baseline
        self._next_check = clock() + interval_s
        self._missing = False
        self._refused = False  # the files on disk were refused at the last look

    def poll(self) -> Detector | None:
        now = self._clock()
        asked = self._now.is_set()  # SIGHUP
        if now < self._next_check and not asked:
            return None
        self._now.clear()
        self._next_check = now + self._interval_s
        signature = file_signature(*self._paths)
        # Unchanged files are not looked at again, but for SIGHUP after a refusal: what was
        # refused may be fixed outside them (a public key that could not be read).
        if signature == self._signature and not (asked and self._refused):
            return None
        companions_changed = signature[1:] != (self._signature or self._at_start)[1:]
        self._signature = signature
        why = "absent"
        try:
            sha = sha256_file(self.current.path) if signature[0] is not None else None
        except OSError as exc:  # a folder, FIFO or device in its place, or gone since the stat
            sha, why = None, exc.strerror or str(exc)
        if sha is None:
            if not self._missing:
                log.warning("model file %s is missing or unreadable (%s); keeping version %s "
                            "(%s…), but a restart would fail until a model is back",
                            self.current.path, why, self.current.metadata.model_version,
                            self.current.sha256[:12], extra=_ALWAYS)
            self._missing = True
            self._on_file_state(True)
            return None
        self._missing = False
        if sha == self.current.sha256:
            if companions_changed or self._refused:
                self._check_companions()  # flags a set a restart would refuse, or clears it
            else:
                self._on_file_state(False)
            return None
        try:
            candidate = self._load(self.current.path)
        except Exception as exc:  # ModelLoadError, or anything else: a bad push must not crash
            if isinstance(exc, ModelLoadError):
                return self._reject(str(exc), None)  # counted by reason where it was raised
            return self._reject(f"{type(exc).__name__}: {exc}", "load")
        changed = _contract_change(self.current, candidate)
        if changed:
            return self._reject(
                f"{candidate.metadata.model_version} ({candidate.sha256[:12]}…) changes {changed}; "
                "the stream's records are shaped for the serving model, so every one would be "
                "dead-lettered. A contract change needs a restart with the new model", "contract")
        log.info("model reloaded: %s (%s…) -> %s (%s…)", self.current.metadata.model_version,
                 self.current.sha256[:12], candidate.metadata.model_version, candidate.sha256[:12],
                 extra=_ALWAYS)
        self.current = candidate
        self._on_outcome("loaded")
        self._set_refused(False)
        return candidate

    def _check_companions(self) -> None:
        """The serving model's own file, with its card or signature changed (or a SIGHUP after
        a refusal): verify the set as a restart would. The serving model stays either way, but
        a set that a restart would refuse (a tampered card, a deleted or swapped signature) is
        flagged now, not found by the next pod that fails to start."""
        try:
            self._load(self.current.path)
        except Exception as exc:  # ModelLoadError counted by reason where raised; anything else
            why = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            log.error("the serving model's card or signature changed and a restart would refuse "
                      "them: %s; still serving version %s (%s…)", why,
                      self.current.metadata.model_version, self.current.sha256[:12],
                      extra=_ALWAYS)
            self._on_outcome("rejected")
            self._set_refused(True)
            if not isinstance(exc, ModelLoadError):
                self._on_refused("load")
            return
        if self._refused:
            log.info("the model files verify again (version %s, %s…)",
                     self.current.metadata.model_version, self.current.sha256[:12], extra=_ALWAYS)
        self._set_refused(False)

    def _set_refused(self, refused: bool) -> None:
        self._refused = refused
        self._on_file_state(refused)

    def _reject(self, why: str, uncounted_reason: str | None) -> None:
        """Keep the serving model, say why in one line and count the rejection (by reason too
        when ``load`` did not count it)."""
        log.error("model reload rejected, keeping version %s (%s…): %s",
                  self.current.metadata.model_version, self.current.sha256[:12], why,
                  extra=_ALWAYS)
        self._on_outcome("rejected")
        self._set_refused(True)
        if uncounted_reason is not None:
            self._on_refused(uncounted_reason)


def _contract_change(current: Detector, candidate: Detector) -> str:
    """What a candidate changes in the input contract (input shape, number of classes), or ""."""
    a, b = current.metadata, candidate.metadata
    changes = [f"{name} {x} -> {y}" for name, x, y in (
        ("input_shape", list(a.input_shape), list(b.input_shape)),
        ("num_classes", a.num_classes, b.num_classes)) if x != y]
    return ", ".join(changes)
