"""`replay release` when something goes wrong part-way, against a real broker where it can be.

Each test here started as a way a review (stop 39) made release lose track of a sample: a copy on
the clean topic with no audit record (so a rerun releases it again), a release the error said had
failed but that went out anyway, a released copy that came back through ingest and was released
a second time, a mistyped audit topic read as "nothing released yet". The rule they pin: after a
release, every selected sample is either released with its audit record or not released, and
whatever is neither is named in the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from depois_stream.audit.reading import read_audit, read_quarantine, read_raw
from depois_stream.audit.records import QuarantinedRecord, ReplayError
from depois_stream.audit.release import ReleaseIncomplete, release
from depois_stream.audit.settings import ReplaySettings
from depois_stream.cli import app
from depois_stream.contract import headers as H
from depois_stream.contract.wire import encode_sample
from depois_stream.sim.broker import create_topics
from tests.helpers.kafka_io import Topics, consumer_config


@dataclass
class Scratch:
    settings: ReplaySettings
    env: dict[str, str]
    ingest: str


@pytest.fixture
def scratch(broker, unique: str) -> Scratch:
    t = {k: f"{unique}-{k}" for k in ("ingest", "clean", "quarantine", "audit")}
    create_topics(broker.bootstrap, list(t.values()))
    settings = ReplaySettings(bootstrap_servers=broker.bootstrap, quarantine_topic=t["quarantine"],
                              clean_topic=t["clean"], audit_topic=t["audit"], read_timeout_s=20)
    env = {"DEPOIS_BOOTSTRAP_SERVERS": broker.bootstrap, "DEPOIS_QUARANTINE_TOPIC": t["quarantine"],
           "DEPOIS_CLEAN_TOPIC": t["clean"], "DEPOIS_AUDIT_TOPIC": t["audit"],
           "DEPOIS_READ_TIMEOUT_S": "20"}
    return Scratch(settings, env, t["ingest"])


def quarantine_headers(ingest: str, offset: int) -> list[tuple[str, bytes]]:
    """What the router writes on a quarantine record (the fields release reads)."""
    return [(H.VERDICT, b"quarantine"), (H.SCORE, b"-0.5"), (H.BOUNDARY, b"-0.1"), (H.LABEL, b"3"),
            (H.MODEL_VERSION, b"m1"), (H.SOURCE_TOPIC, ingest.encode()),
            (H.SOURCE_PARTITION, b"0"), (H.SOURCE_OFFSET, str(offset).encode())]


def sample(sid: str) -> tuple[bytes, str]:
    return encode_sample(sid, np.full((1, 4, 4), 0.5, np.float32), 3, encoding="json")


def put(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list]],
        **producer: object) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **producer)
    try:
        for f in [p.send(topic, key=k, value=v, headers=h) for k, v, h in records]:
            f.get(timeout=20)
    finally:
        p.close()


def released_copies(s: ReplaySettings) -> list[QuarantinedRecord]:
    return [r for r in (QuarantinedRecord.from_kafka(x.topic, x.partition, x.offset, x.timestamp,
                                                     x.key, x.value, x.headers)
                        for x in read_raw(s.bootstrap_servers, s.clean_topic, timeout_s=20))
            if r.verdict == H.VERDICT_RELEASED]


def replay(s: Scratch, *args: str, env: dict[str, str | None] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["replay", *args], env={**s.env, **(env or {})})
    return result.exit_code, result.output


RELEASE = ("release", "--label", "3", "--operator", "alice", "--reason", "ticket 7")


# ---------------------------------------------------------------- real broker

def test_a_sample_too_large_to_release_stops_the_release_before_anything_is_sent(
        broker, scratch: Scratch) -> None:
    """Before: the first sample went out, the second (2 MB, written by a filter configured for
    large records) was refused by the producer, and the error hid that the first was released
    without an audit record, so every rerun released it again."""
    big = [("note", b"x" * 2_000_000)]  # kept on the released copy, as every header is
    put(broker.bootstrap, scratch.settings.quarantine_topic, [
        (b"s0", sample("s0")[0], quarantine_headers(scratch.ingest, 0)),
        (b"s1", sample("s1")[0], quarantine_headers(scratch.ingest, 1) + big),
        (b"s2", sample("s2")[0], quarantine_headers(scratch.ingest, 2))],
        max_request_size=4_000_000)
    for _ in range(2):
        code, out = replay(scratch, *RELEASE)
        assert code == 1, out
        assert "s1" in out and "max_request_size" in out and "nothing was released" in out
        assert released_copies(scratch.settings) == []
        assert read_audit(scratch.settings)[0] == []
    # With the limit raised as the error says, all three go out, each once, each audited.
    code, out = replay(scratch, *RELEASE, env={"DEPOIS_KAFKA": '{"max_request_size": 4000000}'})
    assert code == 0, out
    assert sorted(r.sample_id for r in released_copies(scratch.settings)) == ["s0", "s1", "s2"]
    assert sorted(a.sample_id for a in read_audit(scratch.settings)[0]) == ["s0", "s1", "s2"]


def test_a_null_header_value_is_released_as_an_empty_one(broker, scratch: Scratch) -> None:
    """Null header values are legal in Kafka (the filter forwards them as empty, but any other
    writer of the quarantine topic may keep them). Before: a traceback part-way, the samples
    before it released without audit records, and a duplicate of each on every rerun."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(3):
        headers = quarantine_headers(scratch.ingest, i)
        if i == 1:
            headers = [("x-trace", None), *headers]
        p.produce(scratch.settings.quarantine_topic, key=f"s{i}".encode(),
                  value=sample(f"s{i}")[0], headers=headers)
    assert p.flush(20) == 0
    for _ in range(2):  # the second run must find all three released
        code, out = replay(scratch, *RELEASE)
        assert code == 0, out
    # and say so, not "released 0 sample(s) to ..., audit records on ..." (operator walkthrough, stop 43)
    assert out.startswith("nothing released: every selected sample was skipped"), out
    copies = {r.sample_id: r for r in released_copies(scratch.settings)}
    assert sorted(copies) == ["s0", "s1", "s2"]
    assert ("x-trace", b"") in copies["s1"].headers
    assert sorted(a.sample_id for a in read_audit(scratch.settings)[0]) == ["s0", "s1", "s2"]


def test_a_missing_audit_topic_refuses_the_release_instead_of_forgetting_earlier_ones(
        broker, scratch: Scratch) -> None:
    """Before: a mistyped DEPOIS_AUDIT_TOPIC read as an empty audit trail, and a sample released
    the day before went out a second time."""
    put(broker.bootstrap, scratch.settings.quarantine_topic,
        [(b"s0", sample("s0")[0], quarantine_headers(scratch.ingest, 0))])
    assert replay(scratch, *RELEASE)[0] == 0
    typo = {"DEPOIS_AUDIT_TOPIC": scratch.settings.audit_topic + "-typo"}
    for dry in ((), ("--dry-run",)):
        code, out = replay(scratch, *RELEASE, *dry, env=typo)
        assert code == 1 and "DEPOIS_AUDIT_TOPIC" in out and "-typo" in out, out
    assert [r.sample_id for r in released_copies(scratch.settings)] == ["s0"]


def test_a_missing_clean_topic_refuses_the_release_instead_of_creating_it(
        broker, scratch: Scratch) -> None:
    """F5. Before: a mistyped DEPOIS_CLEAN_TOPIC was created by the broker on the first write,
    the audit trail said released, and the rerun with the right topic skipped the sample as
    already released: it never reached the clean topic."""
    from kafka import KafkaConsumer

    put(broker.bootstrap, scratch.settings.quarantine_topic,
        [(b"s0", sample("s0")[0], quarantine_headers(scratch.ingest, 0))])
    typo = scratch.settings.clean_topic + "-typo"
    for dry in ((), ("--dry-run",), ()):  # the check itself must not create the topic either
        code, out = replay(scratch, *RELEASE, *dry, env={"DEPOIS_CLEAN_TOPIC": typo})
        assert code == 1 and "DEPOIS_CLEAN_TOPIC" in out and typo in out, out
        assert len(out.strip().splitlines()) == 1, out
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        assert typo not in consumer.topics()
    finally:
        consumer.close()
    assert read_audit(scratch.settings)[0] == []
    code, out = replay(scratch, *RELEASE)
    assert code == 0 and "released 1 sample(s)" in out, out
    assert [r.sample_id for r in released_copies(scratch.settings)] == ["s0"]


def test_a_quarantine_record_without_a_value_is_skipped_not_released_as_a_tombstone(
        broker, scratch: Scratch) -> None:
    """F13. A quarantine record with no value (written by hand) was released as a tombstone: on
    a compacted clean topic that deletes the key's sample."""
    put(broker.bootstrap, scratch.settings.quarantine_topic, [
        (b"s0", None, quarantine_headers(scratch.ingest, 0)),
        (b"s1", sample("s1")[0], quarantine_headers(scratch.ingest, 1))])
    code, out = replay(scratch, *RELEASE)
    assert code == 0, out
    assert "skipped 1 (no_value): s0" in out, out
    clean = read_raw(broker.bootstrap, scratch.settings.clean_topic, timeout_s=20)
    assert [(r.key, r.value is None) for r in clean] == [(b"s1", False)]
    assert [a.sample_id for a in read_audit(scratch.settings)[0]] == ["s1"]


def test_a_released_copy_that_comes_back_through_ingest_is_not_released_again(
        broker, unique: str, centroid_model: Path, digits_arrays) -> None:
    """docs/replay.md: a released copy routed back into ingest is never released a second time,
    audit topic or not. Before: the filter dropped every depois.* header from ingest, the count
    with them, and the copy, quarantined again under a new source offset, was released again."""
    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.detector import Detector

    _, _, xte, yte = digits_arrays
    images = (np.round(xte[:40] * 255) / 255).astype(np.float32)
    flipped = (yte[:40] + 1) % 10
    verdict = Detector.load(centroid_model, device="cpu").predict(images, flipped)
    i = int(np.flatnonzero(verdict.poisoned)[0])
    topics = Topics.create(broker.bootstrap, unique)
    audit = f"{unique}-audit"
    create_topics(broker.bootstrap, [audit])
    value, ctype = encode_sample("digit-x", images[i], int(flipped[i]))
    put(broker.bootstrap, topics.ingest, [(b"digit-x", value, [(H.CONTENT_TYPE, ctype.encode())])])
    cfg = consumer_config(broker.bootstrap, topics, unique, centroid_model)
    StreamFilter(cfg).run()
    settings = ReplaySettings(bootstrap_servers=broker.bootstrap, quarantine_topic=topics.quarantine,
                              clean_topic=topics.clean, audit_topic=audit, read_timeout_s=20)
    first = release(settings, read_quarantine(settings), "alice", "ticket 1")
    assert first.released == ["digit-x"]

    (copy,) = released_copies(settings)
    put(broker.bootstrap, topics.ingest, [(copy.key, copy.value, list(copy.headers))])
    StreamFilter(cfg).run()
    again = [r for r in read_quarantine(settings) if r.source and r.source.offset == 1]
    assert len(again) == 1 and again[0].replay_count == 1
    for audit_topic in (audit, f"{unique}-fresh-audit"):  # with or without the audit trail
        create_topics(broker.bootstrap, [audit_topic])
        s = settings.model_copy(update={"audit_topic": audit_topic})
        report = release(s, again, "bob", "ticket 2")
        assert report.released == [] and report.skipped == {"loop_guard": ["digit-x"]}
    assert len(released_copies(settings)) == 1


# ---------------------------------------------------------------- scripted producer

class _Future:
    def __init__(self, outcome: str) -> None:
        self.outcome = outcome

    @property
    def is_done(self) -> bool:
        return self.outcome != "pending"

    def succeeded(self) -> bool:
        return self.outcome == "ok"

    @property
    def exception(self) -> Exception | None:
        from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

        return {"expired": KafkaTimeoutError("Expiring 1 record(s): 60000 ms has passed"),
                "refused": MessageSizeTooLargeError("too large")}.get(self.outcome)


class _Producer:
    """kafka-python's producer as a broker that stops answering mid-release would drive it.

    ``plan`` gives the outcome of each clean copy in order ("ok"; "refused" for good; "expired":
    sent, then timed out, so maybe written; "pending": no answer before the flush deadline);
    audit records are acknowledged. ``sent`` is what the client took. As kafka-python's, its
    close(timeout=0) raises when answers are missing.
    """

    plan: list[str] = []
    sent: dict[str, list[bytes | None]] = {}

    def __init__(self, **_: object) -> None:
        self.closed_with: object = "not closed"

    def send(self, topic: str, key=None, value=None, headers=None) -> _Future:
        _Producer.sent.setdefault(topic, []).append(key)
        if topic.endswith("clean"):
            return _Future(_Producer.plan[len(_Producer.sent[topic]) - 1])
        return _Future("ok")

    def flush(self, timeout=None) -> None:
        from kafka.errors import KafkaTimeoutError

        if "pending" in _Producer.plan:
            raise KafkaTimeoutError("Failed to flush buffered records within timeout")

    def close(self, timeout=None) -> None:
        from kafka.errors import KafkaTimeoutError

        self.closed_with = timeout
        if timeout == 0 and "pending" in _Producer.plan:
            raise KafkaTimeoutError("Timeout waiting for future")


def _quarantined(n: int) -> list[QuarantinedRecord]:
    return [QuarantinedRecord.from_kafka("q", 0, i, 1000, f"s{i}".encode(), sample(f"s{i}")[0],
                                         quarantine_headers("in", i)) for i in range(n)]


@pytest.mark.parametrize("plan, audited, named", [
    (["ok", "pending", "ok"], ["s0", "s2"], "possibly on clean"),
    (["ok", "expired", "ok"], ["s0", "s2"], "possibly on clean"),
    (["ok", "refused", "ok"], ["s0", "s2"], "not released (MessageSizeTooLargeError"),
])
def test_a_release_that_stops_part_way_audits_exactly_what_went_out(
        monkeypatch: pytest.MonkeyPatch, plan: list[str], audited: list[str], named: str) -> None:
    """Before: a flush that timed out (a broker frozen for 40 s) raised at once, the audit step
    never ran, and the producer's close() then delivered the copies anyway: released, not
    audited, and released again by the rerun the error invited. A review of the first fix found
    two more ways to that end: an expired batch (sent, maybe written) called "not released", and
    kafka-python's close(timeout=0) raising over the detailed message."""
    import depois_stream.audit.release as release_module

    monkeypatch.setattr(release_module, "KafkaProducer", _Producer)
    monkeypatch.setattr(release_module, "read_audit", lambda s: ([], 0))
    monkeypatch.setattr(release_module, "require_topic", lambda *_: None)  # no broker here
    monkeypatch.setattr(_Producer, "plan", plan)
    monkeypatch.setattr(_Producer, "sent", {})
    settings = ReplaySettings(bootstrap_servers="127.0.0.1:1", clean_topic="clean",
                              audit_topic="audit")
    with pytest.raises(ReleaseIncomplete) as caught:
        release(settings, _quarantined(3), "alice", "ticket 7")
    assert [k.decode() for k in _Producer.sent["audit"]] == audited
    assert [r.sample_id for r in caught.value.released] == audited
    message = str(caught.value).replace("\n", " ")
    assert named in message and "s1" in message.split(named)[1]
    assert "released 2 of 3 with their audit records" in message


def test_the_reader_skips_records_of_aborted_transactions(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exactly-once filter aborts a batch it then writes again; read_uncommitted, replay saw
    the aborted quarantine copy and released a sample that was already on the clean topic.
    (Tansu shows aborted records to read_committed readers too, so this is checked on the
    client settings; Apache Kafka honours them.)"""
    import depois_stream.audit.reading as reading_module

    seen: dict[str, object] = {}

    class Consumer:
        def __init__(self, **kwargs: object) -> None:
            seen.update(kwargs)

    monkeypatch.setattr(reading_module, "KafkaConsumer", Consumer)
    reading_module._consumer("127.0.0.1:1", {})
    assert seen["isolation_level"] == "read_committed"
    reading_module._consumer("127.0.0.1:1", {"isolation_level": "read_uncommitted"})
    assert seen["isolation_level"] == "read_uncommitted"  # DEPOIS_KAFKA still decides


def test_a_short_read_timeout_also_bounds_the_wait_for_a_broker_that_is_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-python waits 30 s for a first broker whatever DEPOIS_READ_TIMEOUT_S said: a down
    broker took 30 s to report with a 3 s read timeout. The bootstrap wait is now the shorter of
    the two, and DEPOIS_KAFKA's own bootstrap_timeout_ms still decides."""
    import depois_stream.audit.reading as reading_module

    seen: dict[str, object] = {}

    class Consumer:
        DEFAULT_CONFIG = reading_module.KafkaConsumer.DEFAULT_CONFIG

        def __init__(self, **kwargs: object) -> None:
            seen.update(kwargs)
            raise OSError("no broker")

    monkeypatch.setattr(reading_module, "KafkaConsumer", Consumer)
    for kafka, timeout_s, expected in (({}, 3.0, 3000), ({}, 600.0, 30000),
                                       ({"bootstrap_timeout_ms": 7000}, 3.0, 7000)):
        seen.clear()
        with pytest.raises(Exception):
            reading_module.read_raw("127.0.0.1:1", "t", kafka=kafka, timeout_s=timeout_s)
        assert seen["bootstrap_timeout_ms"] == expected, (kafka, timeout_s, seen)


@pytest.mark.timeout(90)
def test_a_tls_setting_against_a_plaintext_listener_is_reported_not_waited_on(broker) -> None:
    """kafka-python's first bootstrap waits on a TLS handshake the broker never answers (a
    plaintext listener reads the hello as a request and waits for the rest of it), past its own
    bootstrap_timeout_ms: `DEPOIS_KAFKA='{"security_protocol": "SSL"}' replay list` printed
    nothing for 400 s (an outside drill). The wait is bounded like a silent broker's."""
    import time

    t0 = time.monotonic()
    with pytest.raises(ReplayError, match="no answer|bootstrap") as caught:
        read_raw(broker.bootstrap, "depois.quarantine", kafka={"security_protocol": "SSL"},
                 timeout_s=5)
    took = time.monotonic() - t0
    assert took < 20, f"gave up after {took:.0f} s with a 5 s read timeout"
    assert "security" in str(caught.value), caught.value  # the likely cause is named


# ---------------------------------------------------------------- command line, no broker

@pytest.mark.parametrize("args, flag", [
    (("list", "--since", "1969-12-31T23:59:59Z"), "--since"),
    (("list", "--until", "99999999999999999999"), "--until"),
    (("list", "--offsets", "0:1", "--offsets", "0:5-9"), "--offsets"),
    (("list", "--pushgateway", "http://127.0.0.1:x"), "--pushgateway"),
    (("list", "--metrics-textfile", "/nonexistent/x.prom"), "--metrics-textfile"),
    (("rescore", "--model", "m.onnx", "--histogram", "/nonexistent/h.png"), "--histogram"),
    (("release", "--id", "s0", "--operator", "al\udcffce", "--reason", "r"), "--operator"),
    (("list", "--limit", "-3"), "--limit"),
    (("list", "--label", "-1"), "--label"),
    (("list", "--partition", "-2"), "--partition"),
    (("list", "--min-score", "nan"), "--min-score"),
    (("release", "--max-score", "nan", "--operator", "a", "--reason", "r"), "--max-score"),
    (("list", "--min-score", "0.5", "--max-score", "-0.5"), "--min-score"),
    # stop 45: a reversed time window selected nothing, silently, after a full read
    (("list", "--since", "2026-02-01T00:00:00Z", "--until", "2026-01-01T00:00:00Z"), "--since"),
])
def test_bad_options_are_one_line_and_exit_2_before_anything_is_read(
        args: tuple[str, ...], flag: str) -> None:
    """Before: tracebacks (negative or huge times, a non-UTF-8 operator, a Pushgateway URL with
    no port number, missing folders) or, for repeated --offsets, a silently narrower read; and
    (F10) a negative --limit printed rows and "... -N more", a negative --label or --partition
    or a NaN score bound silently selected nothing; and a --min-score above --max-score selected
    nothing after a full read of the topic (swapped bounds are a typo, not a selection)."""
    result = CliRunner().invoke(app, ["replay", *args],
                                env={"DEPOIS_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert flag in result.output and "Traceback" not in result.output
    assert "Value error" not in result.output, result.output  # pydantic's prefix, not ours


def test_export_refuses_a_folder_that_holds_an_earlier_export(tmp_path: Path) -> None:
    """An earlier export's contact sheets beyond the new count stayed and read as this one's."""
    (tmp_path / "contact_004.png").write_bytes(b"old")
    for out in (tmp_path, tmp_path / "contact_004.png"):
        result = CliRunner().invoke(app, ["replay", "export", "--out", str(out)],
                                    env={"DEPOIS_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
        assert result.exit_code == 2 and "--out" in result.output, result.output


def test_a_repeated_header_reads_as_its_first_value_as_the_filter_reads_it() -> None:
    """The filter decodes by the first content-type header; replay took the last, and called
    undecodable a sample the detector had scored."""
    assert H.as_dict([(H.CONTENT_TYPE, b"a"), (H.CONTENT_TYPE, b"b")]) == {H.CONTENT_TYPE: "a"}



def test_a_sample_that_cannot_be_audited_stops_the_release_before_anything_is_sent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarantine record written by something other than the filter, that the audit schema
    refuses: before, its copy went out and the audit step failed with a traceback. The case
    found then, a replay count of -1, is held back by the loop guard since stop 46 (planned out,
    test_replay.py); the guard stays for whatever else the schema refuses, played here by an
    audit record built with an empty operator for that one sample."""
    import depois_stream.audit.release as release_module

    monkeypatch.setattr(release_module, "KafkaProducer", _Producer)
    monkeypatch.setattr(release_module, "read_audit", lambda s: ([], 0))
    monkeypatch.setattr(release_module, "require_topic", lambda *_: None)  # no broker here
    monkeypatch.setattr(_Producer, "plan", ["ok", "ok"])
    monkeypatch.setattr(_Producer, "sent", {})
    audit_record_for = release_module.audit_record_for

    def refused_for_s1(r, operator, *args):
        return audit_record_for(r, "" if r.sample_id == "s1" else operator, *args)

    monkeypatch.setattr(release_module, "audit_record_for", refused_for_s1)
    odd = QuarantinedRecord.from_kafka("q", 0, 1, 1000, b"s1", sample("s1")[0],
                                       quarantine_headers("in", 1))
    settings = ReplaySettings(bootstrap_servers="127.0.0.1:1", clean_topic="clean",
                              audit_topic="audit")
    with pytest.raises(ReplayError, match=r"s1 \(in:0:1\) cannot be audited"):
        release(settings, [_quarantined(1)[0], odd], "alice", "ticket 7")
    assert _Producer.sent == {}


# ---------------------------------------------------------------- chunks (F6) and a stall (F9)

def test_a_release_stopped_in_a_later_chunk_reports_every_sample_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """F6. A selection larger than one chunk goes out chunk by chunk (copies acknowledged, then
    their audit records); the broker stops answering one copy of the second chunk. Released with
    audit records: the first chunk and the rest of the second; possibly on clean: that one; not
    released: the third chunk, never handed over. Before: every copy went out before any audit
    record, so the third chunk was on the clean topic too."""
    import depois_stream.audit.release as release_module

    n, chunk = 250, release_module.RELEASE_CHUNK
    assert n > 2 * chunk
    monkeypatch.setattr(release_module, "KafkaProducer", _Producer)
    monkeypatch.setattr(release_module, "read_audit", lambda s: ([], 0))
    monkeypatch.setattr(release_module, "require_topic", lambda *_: None)  # no broker here
    stalled = chunk + 49
    monkeypatch.setattr(_Producer, "plan", ["pending" if i == stalled else "ok" for i in range(n)])
    monkeypatch.setattr(_Producer, "sent", {})
    settings = ReplaySettings(bootstrap_servers="127.0.0.1:1", clean_topic="clean",
                              audit_topic="audit")
    with pytest.raises(ReleaseIncomplete) as caught:
        release(settings, _quarantined(n), "alice", "ticket 7")
    audited = [f"s{i}" for i in range(2 * chunk) if i != stalled]
    assert [k.decode() for k in _Producer.sent["audit"]] == audited
    assert len(_Producer.sent["clean"]) == 2 * chunk
    assert [r.sample_id for r in caught.value.released] == audited
    message = str(caught.value)
    assert f"released {len(audited)} of {n} with their audit records" in message
    assert "WITHOUT A CONFIRMED AUDIT RECORD" not in message
    unknown = message.split("possibly on clean")[1]
    assert f"s{stalled}" in unknown and f"s{stalled + 1}," not in unknown
    # the later chunks were never sent: said so, not filed under another sample's error (review)
    assert "not released (" not in message
    not_sent = message.split("not sent (")[1].split(";")[0]
    assert all(f"s{i}" in not_sent for i in range(2 * chunk, n))
    assert f"s{2 * chunk - 1}," not in not_sent


class _Killed(BaseException):
    """The process dying (kill -9) at a chosen point of a release."""


def test_a_release_killed_part_way_leaves_at_most_one_chunk_without_audit_records(
        broker, scratch: Scratch, monkeypatch: pytest.MonkeyPatch) -> None:
    """F6. Before: release sent every clean copy, then every audit record; killed between the two
    (1,800 selected, kill -9 at 1.6 s), the rerun released 298 samples a second time. The release
    here dies as it hands its 150th record to a real producer; what it handed over before is
    delivered (the worst a kill can leave). At most one chunk may lack audit records."""
    from collections import Counter

    from kafka import KafkaProducer

    import depois_stream.audit.release as release_module
    from depois_stream.audit.trail import released_ids

    n, s = 250, scratch.settings
    put(broker.bootstrap, s.quarantine_topic,
        [(f"s{i}".encode(), sample(f"s{i}")[0], quarantine_headers(scratch.ingest, i))
         for i in range(n)])

    class DiesAt(KafkaProducer):
        sends = 0

        def send(self, topic, **kwargs):  # type: ignore[no-untyped-def]
            DiesAt.sends += 1
            if DiesAt.sends == 150:
                raise _Killed
            return super().send(topic, **kwargs)

    monkeypatch.setattr(release_module, "KafkaProducer", DiesAt)
    with pytest.raises(_Killed):
        release(s, read_quarantine(s), "alice", "ticket 7")
    monkeypatch.undo()
    unaudited = {r.release_id for r in released_copies(s)} - released_ids(read_audit(s)[0])
    assert 0 < len(unaudited) <= release_module.RELEASE_CHUNK, len(unaudited)
    code, out = replay(scratch, *RELEASE)
    assert code == 0, out
    copies = Counter(r.release_id for r in released_copies(s))
    assert len(copies) == n
    assert {rid for rid, k in copies.items() if k > 1} == unaudited


def test_a_release_cut_by_a_frozen_broker_leaves_nothing_to_print_at_exit(
        tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """F9. The broker freezes (SIGSTOP) as the first audit record is handed over. Before:
    the one-line error was followed, at exit, by "Exception ignored in: KafkaProducer.__del__
    ... KafkaTimeoutError": kafka-python's close(timeout=0) raised inside its flush, before it
    force-closed, so the producer stayed open and its __del__ closed it again."""
    import gc
    import sys
    import weakref

    from kafka import KafkaProducer

    import depois_stream.audit.release as release_module
    from depois_stream.sim.broker import LocalBroker

    with LocalBroker(log_path=tmp_path / "tansu.log") as own:
        t = {k: f"{unique}-{k}" for k in ("clean", "quarantine", "audit")}
        create_topics(own.bootstrap, list(t.values()))
        put(own.bootstrap, t["quarantine"],
            [(f"s{i}".encode(), sample(f"s{i}")[0], quarantine_headers("in", i)) for i in range(5)])
        settings = ReplaySettings(
            bootstrap_servers=own.bootstrap, quarantine_topic=t["quarantine"],
            clean_topic=t["clean"], audit_topic=t["audit"], read_timeout_s=20,
            kafka={"delivery_timeout_ms": 8000, "request_timeout_ms": 5000})
        made: list[weakref.ref] = []

        class FreezesTheBroker(KafkaProducer):
            def send(self, topic, **kwargs):  # type: ignore[no-untyped-def]
                if topic == settings.audit_topic and not made:
                    made.append(weakref.ref(self))
                    own.freeze()
                return super().send(topic, **kwargs)

        unraisable: list[object] = []
        monkeypatch.setattr(release_module, "KafkaProducer", FreezesTheBroker)
        monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
        records = read_quarantine(settings)
        try:
            with pytest.raises(ReleaseIncomplete, match="WITHOUT A CONFIRMED AUDIT RECORD"):
                release(settings, records, "alice", "ticket 7")
        finally:
            own.thaw()
        gc.collect()
        assert made and made[0]() is None  # collected: its __del__ has run
        assert [str(getattr(u, "exc_value", u)) for u in unraisable] == []


def test_a_read_does_not_stop_inside_a_large_last_batch(broker, unique: str) -> None:
    """Stop 45, a replay adversary: Tansu reports a partition's end offset as the base offset of
    its last batch (1 record, then 20,000 in one batch: end offset 2). The read took that for its
    end and stopped 0.5 s after reaching it, while the big batch was still being read: `list`
    said 16,000 of 20,001 and `release` released part of the selection, both with exit 0.
    Records written before the read began belong to it, whatever the end offset says."""
    from kafka import KafkaProducer

    topic = f"{unique}-big"
    create_topics(broker.bootstrap, [topic])
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=1000, batch_size=4_000_000,
                      max_request_size=8_000_000)
    try:
        p.send(topic, b"first").get(timeout=20)
        for i in range(20_000):
            p.send(topic, str(i).encode() * 20)
        p.flush(timeout=30)
    finally:
        p.close()
    # one record a poll: reading the batch takes far longer than the grace after the end offset
    got = read_raw(broker.bootstrap, topic, kafka={"max_poll_records": 1}, timeout_s=60)
    assert len(got) == 20_001


def test_ctrl_c_mid_release_finishes_the_chunk_audits_it_and_reports_the_rest(
        broker, scratch: Scratch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop 45, a replay adversary: Ctrl-C or SIGTERM during a release exited 130/143 with
    nothing printed, and in 4 of 5 trials left a chunk of clean copies without audit records,
    which the rerun released a second time. Now the chunk in flight finishes with its audit
    records, the release stops there and says what was not sent (exit 1), and the rerun
    releases exactly the rest. The SIGINT is sent as the 150th copy is handed over."""
    import os
    import signal
    from collections import Counter

    from kafka import KafkaProducer

    import depois_stream.audit.release as release_module
    from depois_stream.audit.trail import released_ids

    n, s = 1000, scratch.settings
    put(broker.bootstrap, s.quarantine_topic,
        [(f"s{i}".encode(), sample(f"s{i}")[0], quarantine_headers(scratch.ingest, i))
         for i in range(n)])

    class InterruptedAt(KafkaProducer):
        sends = 0

        def send(self, topic, **kwargs):  # type: ignore[no-untyped-def]
            InterruptedAt.sends += 1
            if InterruptedAt.sends == 150:
                os.kill(os.getpid(), signal.SIGINT)
            return super().send(topic, **kwargs)

    monkeypatch.setattr(release_module, "KafkaProducer", InterruptedAt)
    found = signal.getsignal(signal.SIGINT)  # another in-process command may have set one
    code, out = replay(scratch, *RELEASE)
    monkeypatch.undo()
    assert code == 1, out
    assert "release stopped part-way" in out and "stopped on request" in out, out
    copies = {r.release_id for r in released_copies(s)}
    audited = released_ids(read_audit(s)[0])
    assert copies == audited and 0 < len(copies) < n, (len(copies), len(audited))
    assert signal.getsignal(signal.SIGINT) == found  # left as found
    code, out = replay(scratch, *RELEASE)
    assert code == 0, out
    again = Counter(r.release_id for r in released_copies(s))
    assert len(again) == n and max(again.values()) == 1


def test_a_quarantine_record_the_filter_could_not_have_decoded_is_skipped_not_released(
        broker, scratch: Scratch) -> None:
    """Stop 45, a replay adversary: records written straight to the quarantine topic with
    garbage bytes, NaN or out-of-range pixels, an odd shape, or a value whose label is not its
    depois.label header were released to the clean (training) topic: the filter would have
    dead-lettered each. Release decodes what it publishes and skips the rest as
    `undecodable`."""
    import json

    s = scratch.settings
    good = [(f"s{i}".encode(), sample(f"s{i}")[0], quarantine_headers(scratch.ingest, i))
            for i in range(5)]
    nan = json.dumps({"id": "nan", "label": 3, "shape": [1, 4, 4],
                      "pixels": [0.5] * 15 + [float("nan")]}).encode()
    big = json.dumps({"id": "big", "label": 3, "shape": [1, 4, 4], "pixels": [7.0] * 16}).encode()
    wrong_label = encode_sample("lab", np.full((1, 4, 4), 0.5, np.float32), 9, encoding="json")[0]
    odd_shape = encode_sample("odd", np.full((1, 6, 6), 0.5, np.float32), 3, encoding="json")[0]
    bad = [(b"garbage", b"\x00\x01not a sample", quarantine_headers(scratch.ingest, 10)),
           (b"nan", nan, quarantine_headers(scratch.ingest, 11)),
           (b"big", big, quarantine_headers(scratch.ingest, 12)),
           (b"lab", wrong_label, quarantine_headers(scratch.ingest, 13)),
           (b"odd", odd_shape, quarantine_headers(scratch.ingest, 14))]
    put(broker.bootstrap, s.quarantine_topic, good + bad)
    code, out = replay(scratch, *RELEASE)
    assert code == 0, out
    assert {r.sample_id for r in released_copies(s)} == {f"s{i}" for i in range(5)}, out
    assert "skipped 5 (undecodable)" in out, out


def test_a_label_header_that_is_not_a_number_is_undecodable_not_a_missing_label() -> None:
    """An outside drill (stop 50): a hand-written quarantine record whose depois.label header is
    `abc` was released (audited with label null): the header read as absent, so its agreement
    with the value's label was never checked. The filter writes the value's label there; a
    header that is present and says anything else is not the filter's."""
    from depois_stream.audit.release import undecodable_records

    def record(label: bytes | None) -> QuarantinedRecord:
        headers = [(k, v) for k, v in quarantine_headers("in", 1) if k != H.LABEL]
        if label is not None:
            headers.append((H.LABEL, label))
        return QuarantinedRecord.from_kafka("q", 0, 5, 1000, b"s1", sample("s1")[0], headers)

    cases = [b"3", b"abc", b"", b"3.0", b"9", None]
    assert undecodable_records([record(c) for c in cases]) == {1, 2, 3, 4}


def test_a_record_with_a_repeated_router_header_is_not_released() -> None:
    """An outside drill (stop 50): a hand-written quarantine record with two
    depois.source.offset headers was released by the first, while its clean copy forwarded
    both, so a consumer that reads the last (Java's lastHeader) took another sample's
    provenance. The filter writes each depois.* header once and drops producers' own."""
    from depois_stream.audit.release import plan_release

    ok = QuarantinedRecord.from_kafka("q", 0, 5, 1000, b"s1", sample("s1")[0],
                                      quarantine_headers("in", 1))
    twice = QuarantinedRecord.from_kafka("q", 0, 6, 1000, b"s2", sample("s2")[0],
                                         [*quarantine_headers("in", 2), (H.SOURCE_OFFSET, b"1")])
    other = QuarantinedRecord.from_kafka("q", 0, 7, 1000, b"s3", sample("s3")[0],
                                         [*quarantine_headers("in", 3), ("trace", b"a"),
                                          ("trace", b"b")])  # not the router's: forwarded as is
    plan = plan_release([ok, twice, other], set())
    assert [r.sample_id for r in plan.release] == ["s1", "s3"]
    assert [(r.sample_id, why) for r, why in plan.skipped] == [("s2", "repeated_headers")]


def test_copies_of_one_ingest_record_that_disagree_are_not_released() -> None:
    """Stop 45, a replay adversary: a forged quarantine record naming a real record's
    provenance, with an older timestamp, was released in place of the genuine one (reported as
    the `duplicate`). At-least-once delivery writes identical copies; copies whose bytes differ
    mean one was not written by the filter, and neither is released."""
    from depois_stream.audit.release import plan_release

    genuine = QuarantinedRecord.from_kafka("q", 0, 5, 2000, b"s1", sample("s1")[0],
                                           quarantine_headers("in", 1))
    forged = QuarantinedRecord.from_kafka("q", 0, 9, 1000, b"s1", sample("evil")[0],
                                          quarantine_headers("in", 1))
    again = QuarantinedRecord.from_kafka("q", 0, 7, 2001, b"s1", sample("s1")[0],
                                         quarantine_headers("in", 1))
    other = QuarantinedRecord.from_kafka("q", 0, 6, 1500, b"s2", sample("s2")[0],
                                         quarantine_headers("in", 2))
    plan = plan_release([forged, genuine, other], set())
    assert [r.sample_id for r in plan.release] == ["s2"]
    assert sorted(why for _, why in plan.skipped) == ["conflicting_copies"] * 2
    plan = plan_release([genuine, again, other], set())  # identical copies: one goes out
    assert [r.location for r in plan.release] == [genuine.location, other.location]
    assert [why for _, why in plan.skipped] == ["duplicate"]


def test_a_read_cut_by_a_broker_that_went_away_says_so() -> None:
    """Stop 45, a replay adversary: the broker killed mid-list, the read ended after its timeout
    advising to raise DEPOIS_READ_TIMEOUT_S, which cannot help. When no bootstrap server accepts
    a connection any more, the error says the broker is gone. (A consumer that never catches up
    plays the read; the bootstrap address is a closed port.)"""
    import socket

    from kafka import TopicPartition

    from depois_stream.audit.reading import _drain

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connections refused

        class Stuck:
            def poll(self, timeout_ms: int) -> dict:
                return {}

            def position(self, tp) -> int:
                return 0

        tp = TopicPartition("q", 0)
        from depois_stream.audit.records import ReadWindow

        with pytest.raises(ReplayError) as err:
            _drain(Stuck(), [tp], {tp: 10}, ReadWindow(), 0.3, 0.5, bootstrap=closed)
    assert "no longer accepts connections" in str(err.value)
    assert "DEPOIS_READ_TIMEOUT_S" not in str(err.value)


def test_a_filter_option_cannot_select_a_forged_copy_without_its_genuine_twin() -> None:
    """A diff review (stop 45): the conflict check saw only the selection, so `--label 7` (or a
    score bound) could select a forged copy whose headers say 7 and leave the genuine copy out;
    the forged one was released and the genuine one later skipped as already released."""
    from depois_stream.audit.release import plan_release

    genuine = QuarantinedRecord.from_kafka("q", 0, 5, 2000, b"s1", sample("s1")[0],
                                           quarantine_headers("in", 1))
    forged = QuarantinedRecord.from_kafka("q", 0, 9, 1000, b"s1", sample("evil")[0],
                                          quarantine_headers("in", 1))
    plan = plan_release([forged], set(), copies=[genuine, forged])
    assert plan.release == [] and [why for _, why in plan.skipped] == ["conflicting_copies"]
