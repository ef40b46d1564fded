"""The paper trail of human decisions about quarantined samples, kept on the audit topic.

Overriding the detector is a decision somebody must be able to answer for later, so every
release leaves one ``AuditRecord`` per sample on ``depois.audit`` (key = sample id). The same
topic is what makes ``replay release`` idempotent: a sample id that already has a release record
there is never published to the clean topic again, whichever operator or machine asks.

A sample is identified by where it entered: the source topic, partition and offset carried in the
quarantine record's provenance headers (``location_id``). The Kafka key (the sample id a producer
chose) is shown to people and can be used to select records, but it identifies nothing: two
distinct samples may share a key, and a sample sent again is a new record that may need its own
release.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_AUDIT_TOPIC = "depois.audit"

AuditAction = Literal["release"]


class RecordLocation(BaseModel):
    """Where a record sits in Kafka: enough to fetch exactly those bytes again."""

    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


def location_id(loc: RecordLocation) -> str:
    """``topic:partition:offset``: names one Kafka record for good (keys are producers' to pick
    and may repeat or be missing; a location never does)."""
    return f"{loc.topic}:{loc.partition}:{loc.offset}"


class AuditRecord(BaseModel):
    """One operator decision about one sample, with the evidence the decision overrode."""

    model_config = ConfigDict(frozen=True)

    sample_id: str = Field(min_length=1)
    action: AuditAction
    operator: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    timestamp: str  # ISO-8601 UTC, when the decision was carried out
    label: int | None = None
    model_version: str | None = None  # the model that quarantined the sample
    score: float | None = None  # its score at quarantine time
    boundary: float | None = None  # the threshold it was compared against
    source: RecordLocation | None = None  # the original ingest record
    quarantine: RecordLocation  # the quarantine record the decision was taken on
    destination_topic: str  # where the sample went (the clean topic for a release)
    replay_count: int = Field(ge=1)  # replay_count of the published copy

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @property
    def release_id(self) -> str:
        """The ingest record the decision was about (the quarantine record if unknown)."""
        return location_id(self.source or self.quarantine)


def parse_audit_values(values: Iterable[bytes | None]) -> tuple[list[AuditRecord], int]:
    """Audit topic values -> (records, number of unreadable values).

    Unreadable values are counted rather than fatal: a foreign or corrupt record on the audit
    topic must not block every later release, but the operator should hear about it.
    """
    records: list[AuditRecord] = []
    bad = 0
    for value in values:
        try:
            records.append(AuditRecord.model_validate_json(value or b""))
        except ValidationError:
            bad += 1
    return records, bad


def released_ids(records: Iterable[AuditRecord]) -> set[str]:
    """Release ids (source record locations) that were released already."""
    return {r.release_id for r in records if r.action == "release"}
