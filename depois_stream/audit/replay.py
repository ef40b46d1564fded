"""`depois-stream replay` as a Python API: read quarantined records back, select, release.

One import for the documented workflow (docs/replay.md); each part lives in a module of its
own job:

* ``records``: what a quarantined record says, and how a reviewer selects and lists records
  (pure);
* ``settings``: where replay reads and writes (the DEPOIS_* settings it shares with `run`);
* ``reading``: reading topics back without a consumer group, so never moving the live
  consumer's offsets;
* ``release``: the release plan (pure: loop guard, idempotence) and its publication with an
  audit trail.
"""

from __future__ import annotations

from depois_stream.audit.reading import read_audit, read_quarantine, read_raw
from depois_stream.audit.records import (
    QuarantinedRecord, ReadWindow, ReplayError, ReplayFilter, parse_offsets, select, summarize,
)
from depois_stream.audit.release import ReleaseIncomplete, ReleaseReport, plan_release, release
from depois_stream.audit.settings import ReplaySettings

__all__ = [
    "QuarantinedRecord", "ReadWindow", "ReleaseIncomplete", "ReleaseReport", "ReplayError",
    "ReplayFilter", "ReplaySettings", "parse_offsets", "plan_release", "read_audit",
    "read_quarantine", "read_raw", "release", "select", "summarize",
]
