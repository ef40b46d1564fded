"""Model hot reload: notice a replaced model file between batches, verify it, swap it in.

The watcher looks at the (mtime, size) of the ONNX file, its model card and its signature,
because a deployment copies them separately: the model alone changing first (sha256 mismatch against the
old card, rejected) must be retried once the card arrives. A candidate goes through the same
``Detector.load`` checks as at start-up; if it fails, the running model stays and the rejection is
logged and counted, so a bad push cannot take the filter down. Only a file whose sha256 differs
from the serving model's counts as a new model (touching the file does nothing).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from depois_stream.contract import card_path_for, sha256_file
from depois_stream.contract.signing import signature_path_for
from depois_stream.filter.detector import ModelLoadError, Detector

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int] | None, ...]


def file_signature(*paths: Path) -> Signature:
    """Cheap change detector: (mtime_ns, size) per file, None where a file is absent."""
    out: list[tuple[int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


class ModelWatcher:
    """Call ``poll()`` between batches; it returns a new ``Detector`` when one was swapped in."""

    def __init__(self, current: Detector, load: Callable[[Path], Detector], interval_s: float,
                 on_outcome: Callable[[str], None] = lambda outcome: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.current = current
        self._load = load
        self._interval_s = interval_s
        self._on_outcome = on_outcome
        self._clock = clock
        self._paths = (current.path, card_path_for(current.path),
                       signature_path_for(current.path))
        self._signature = file_signature(*self._paths)
        self._next_check = clock() + interval_s

    def poll(self) -> Detector | None:
        now = self._clock()
        if now < self._next_check:
            return None
        self._next_check = now + self._interval_s
        signature = file_signature(*self._paths)
        if signature == self._signature:
            return None
        self._signature = signature
        if signature[0] is None or sha256_file(self.current.path) == self.current.sha256:
            return None
        try:
            candidate = self._load(self.current.path)
        except ModelLoadError as exc:
            log.error("model reload rejected, keeping version %s (%s…): %s",
                      self.current.metadata.model_version, self.current.sha256[:12], exc)
            self._on_outcome("rejected")
            return None
        log.info("model reloaded: %s (%s…) -> %s (%s…)", self.current.metadata.model_version,
                 self.current.sha256[:12], candidate.metadata.model_version, candidate.sha256[:12])
        self.current = candidate
        self._on_outcome("loaded")
        return candidate
