"""Audit replay against a real broker: quarantine a known set through the consumer, then review it.

The module fixture streams sklearn-digits test images through ``StreamFilter`` with the centroid
model, a third of them with flipped labels. Which records the consumer quarantines is predicted
independently by scoring the same images with ``Detector``; every replay command is then checked
against that prediction through the real CLI.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from depois_stream.contract import headers as H
from depois_stream.audit.trail import AuditRecord
from depois_stream.sim.broker import (
    TEST_HEARTBEAT_INTERVAL_MS,
    TEST_SESSION_TIMEOUT_MS,
    create_topics,
)
from depois_stream.cli import app
from depois_stream.audit.metrics import ReplayMetrics as Metrics
from depois_stream.audit.reading import read_audit, read_quarantine, read_raw
from depois_stream.audit.records import (
    QuarantinedRecord,
    ReadWindow,
    ReplayError,
    ReplayFilter,
    parse_offsets,
)
from depois_stream.audit.release import plan_release, release, release_headers
from depois_stream.audit.settings import ReplaySettings

N_SAMPLES = 60
INGEST_PARTITIONS = 2


@dataclass
class Quarantine:
    settings: ReplaySettings
    env: dict[str, str]
    ingest_topic: str
    live_group: str  # the consumer group of the StreamFilter that filled the quarantine
    images: dict[str, np.ndarray]  # sample id -> the image that was sent
    labels: dict[str, int]  # sample id -> the label that was sent
    expected: dict[str, float]  # ids the model must quarantine -> their score
    flipped: set[str]


@pytest.fixture(scope="module")
def quarantine(broker, centroid_model: Path, digits_arrays) -> Quarantine:
    from kafka import KafkaProducer

    from depois_stream.filter.config import ConsumerConfig
    from depois_stream.filter.app import StreamFilter
    from depois_stream.contract.wire import encode_sample
    from depois_stream.filter.detector import Detector

    _, _, xte, yte = digits_arrays
    # Quantised as the wire (uint8) will carry them, so the prediction sees what the consumer sees.
    images = (np.round(xte[:N_SAMPLES] * 255) / 255).astype(np.float32)
    labels = yte[:N_SAMPLES].copy()
    flip = np.arange(N_SAMPLES) % 3 == 0
    labels[flip] = (labels[flip] + 1) % 10
    ids = [f"digit-{i:03d}" for i in range(N_SAMPLES)]

    scored = Detector.load(centroid_model, device="cpu").predict(images, labels)
    expected = {ids[i]: float(scored.score[i]) for i in np.flatnonzero(scored.poisoned)}

    tag = uuid.uuid4().hex[:8]
    topics = {k: f"replay-{k}-{tag}" for k in ("ingest", "clean", "quarantine", "dlq", "audit")}
    create_topics(broker.bootstrap, [topics["ingest"]], partitions=INGEST_PARTITIONS)
    create_topics(broker.bootstrap, [t for k, t in topics.items() if k != "ingest"])
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i, sid in enumerate(ids):
        value, ctype = encode_sample(sid, images[i], int(labels[i]),
                                     encoding="binary" if i % 2 else "json")
        producer.send(topics["ingest"], value=value, key=sid.encode(), partition=i % 2,
                      headers=[(H.CONTENT_TYPE, ctype.encode())])
    producer.flush()
    producer.close()

    cfg = ConsumerConfig(
        bootstrap_servers=broker.bootstrap, model_path=centroid_model, device="cpu",
        ingest_topic=topics["ingest"], clean_topic=topics["clean"],
        quarantine_topic=topics["quarantine"], dlq_topic=topics["dlq"], group_id=f"live-{tag}",
        metrics_port=None, breaker_max_rate=1.0, exit_when_idle_s=1.5,
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS)
    stats = StreamFilter(cfg).run()
    assert stats.consumed == N_SAMPLES and stats.quarantined == len(expected)

    env = {"DEPOIS_BOOTSTRAP_SERVERS": broker.bootstrap,
           "DEPOIS_QUARANTINE_TOPIC": topics["quarantine"], "DEPOIS_CLEAN_TOPIC": topics["clean"],
           "DEPOIS_AUDIT_TOPIC": topics["audit"]}
    settings = ReplaySettings(bootstrap_servers=broker.bootstrap,
                              quarantine_topic=topics["quarantine"], clean_topic=topics["clean"],
                              audit_topic=topics["audit"])
    return Quarantine(settings, env, topics["ingest"], cfg.group_id, dict(zip(ids, images)),
                      dict(zip(ids, labels.tolist())), expected,
                      {sid for sid, f in zip(ids, flip) if f})


def replay(q: Quarantine, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["replay", *args], env=q.env)
    return result.exit_code, result.output


def listed(q: Quarantine, *args: str) -> dict:
    code, out = replay(q, "list", "--json", *args)
    assert code == 0, out
    return json.loads(out)


# ---------------------------------------------------------------- list and filters

def test_the_detector_quarantines_mostly_flipped_labels(quarantine: Quarantine) -> None:
    # Guards the premise of the other tests: the quarantine is a meaningful, mixed set.
    caught = set(quarantine.expected) & quarantine.flipped
    assert len(caught) >= 0.8 * len(quarantine.flipped)
    assert len(quarantine.expected) < N_SAMPLES


def test_list_reads_exactly_the_quarantined_ids_with_their_scores(quarantine: Quarantine) -> None:
    doc = listed(quarantine)
    got = {r["id"]: r for r in doc["records"]}
    assert set(got) == set(quarantine.expected)
    for sid, rec in got.items():
        assert rec["score"] == pytest.approx(quarantine.expected[sid], rel=1e-5)
        assert rec["label"] == quarantine.labels[sid]
        assert rec["reason"] == "below_boundary"
        assert rec["source"]["topic"] == quarantine.ingest_topic
    assert doc["selected"] == doc["read"] == len(quarantine.expected)


def test_filters_select_the_matching_subset(quarantine: Quarantine) -> None:
    exp, labels = quarantine.expected, quarantine.labels
    by_label = {labels[s] for s in exp}
    some_label = sorted(by_label)[0]
    ordered = sorted(exp.values())
    median = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two scores
    index = {s: int(s.split("-")[1]) for s in exp}

    def ids(*args: str) -> set[str]:
        return {r["id"] for r in listed(quarantine, *args)["records"]}

    assert ids("--label", str(some_label)) == {s for s in exp if labels[s] == some_label}
    assert ids("--max-score", repr(median)) == {s for s, v in exp.items() if v <= median}
    assert ids("--min-score", repr(median), "--partition", "1") == {
        s for s, v in exp.items() if v >= median and index[s] % 2 == 1}
    assert ids("--model-version", "centroid-test-1") == set(exp)
    assert ids("--model-version", "some-other-model") == set()
    assert ids("--reason-code", "malformed") == set()
    two = sorted(exp)[:2]
    assert ids("--id", ",".join(two)) == set(two)


def test_explicit_offsets_read_only_that_range(quarantine: Quarantine) -> None:
    doc = listed(quarantine, "--offsets", "0:1-3")
    assert sorted(r["quarantine"]["offset"] for r in doc["records"]) == [1, 2, 3]
    assert doc["read"] == 3
    assert listed(quarantine, "--offsets", "0:100000")["read"] == 0  # past the end: empty
    code, out = replay(quarantine, "list", "--offsets", "7:0")
    assert code == 1 and "partitions" in out


def test_time_window_excludes_records_outside_it(quarantine: Quarantine) -> None:
    assert listed(quarantine, "--until", "2000-01-01T00:00:00Z")["read"] == 0
    assert listed(quarantine, "--since", "2000-01-01T00:00:00Z")["read"] == len(
        quarantine.expected)


def test_replay_pushes_only_its_own_series_to_a_real_pushgateway(quarantine: Quarantine,
                                                                 tmp_path: Path) -> None:
    import urllib.request

    from tests.helpers.prometheus import PushgatewayServer, pushgateway_binary

    if pushgateway_binary() is None:
        pytest.skip("prometheus-pushgateway is not installed (CI installs it)")
    prom = tmp_path / "replay.prom"
    with PushgatewayServer(tmp_path / "pgw") as pgw:
        code, out = replay(quarantine, "list", "--pushgateway", pgw.url,
                           "--metrics-textfile", str(prom))
        assert code == 0, out
        with urllib.request.urlopen(f"{pgw.url}/metrics", timeout=5) as r:
            pushed = r.read().decode()
    n = len(quarantine.expected)
    series = ('depois_replay_outcomes_total{action="list",instance="",job="depois-replay",'
              f'outcome="listed"}} {n}')
    assert series in pushed.splitlines(), pushed[-2000:]
    for text in (pushed, prom.read_text()):  # never the consumer's series: no second consumer
        assert "depois_detection_boundary" not in text and "depois_model_info" not in text
    assert "depois_replay_last_run_timestamp_seconds" in prom.read_text()


def test_times_with_a_z_suffix_parse_on_every_python() -> None:
    from depois_stream.audit.cli import _time_ms

    assert _time_ms("2026-11-25T10:00:00Z", "--since") == 1_795_600_800_000
    assert _time_ms("2026-11-25T10:00:00+00:00", "--since") == 1_795_600_800_000
    assert _time_ms("1795600800000", "--since") == 1_795_600_800_000


def test_text_table_prints_totals_and_metrics_file(quarantine: Quarantine, tmp_path: Path) -> None:
    prom = tmp_path / "replay.prom"
    code, out = replay(quarantine, "list", "--metrics-textfile", str(prom))
    assert code == 0, out
    n = len(quarantine.expected)
    assert f"read {n}, selected {n}" in out
    assert f"below_boundary: {n}" in out
    assert f'depois_replay_outcomes_total{{action="list",outcome="listed"}} {float(n)}' in (
        prom.read_text())


# ---------------------------------------------------------------- export and rescore

def test_export_writes_manifest_npz_and_contact_sheets(quarantine: Quarantine,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "review"
    code, text = replay(quarantine, "export", "--out", str(out))
    assert code == 0, text
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    n = len(quarantine.expected)
    assert {m["id"] for m in manifest} == set(quarantine.expected)
    with np.load(out / "samples.npz") as npz:
        assert npz["images"].shape == (n, 1, 8, 8)
        for m in manifest:
            k = m["npz_index"]
            assert npz["ids"][k] == m["id"] and npz["labels"][k] == m["label"]
            assert npz["scores"][k] == pytest.approx(m["score"], rel=1e-6)
            np.testing.assert_allclose(npz["images"][k], quarantine.images[m["id"]], atol=1e-6)
    sheets = sorted(out.glob("contact_*.png"))
    assert len(sheets) == math.ceil(n / 100)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in sheets)
    assert {m["sheet"] for m in manifest} == {p.name for p in sheets}
    assert all(m["model_version"] == "centroid-test-1" and m["provenance"] for m in manifest)


def test_rescore_with_an_admit_all_model_passes_everything(quarantine: Quarantine, digits_arrays,
                                                           tmp_path: Path) -> None:
    from tests.helpers.onnx_models import build_centroid_model

    xtr, ytr, _, _ = digits_arrays
    model = tmp_path / "admit-all.onnx"
    build_centroid_model(model, xtr, ytr, num_classes=10, boundary=-1e9, model_version="admit-all")
    hist = tmp_path / "hist.png"
    code, out = replay(quarantine, "rescore", "--model", str(model), "--device", "cpu",
                       "--histogram", str(hist), "--json")
    assert code == 0, out
    report = json.loads(out)
    n = len(quarantine.expected)
    assert report["model_version"] == "admit-all"
    assert report["selected"] == report["scored"] == report["would_pass"] == n
    assert sum(c["would_pass"] for c in report["by_label"].values()) == n
    assert hist.read_bytes()[:4] == b"\x89PNG"


def test_rescore_with_the_quarantining_model_passes_nothing(quarantine: Quarantine,
                                                            centroid_model: Path,
                                                            tmp_path: Path) -> None:
    code, out = replay(quarantine, "rescore", "--model", str(centroid_model), "--device", "cpu",
                       "--histogram", str(tmp_path / "h.png"), "--json")
    assert code == 0, out
    assert json.loads(out)["would_pass"] == 0


# ---------------------------------------------------------------- release

def test_release_refuses_without_operator_or_reason(quarantine: Quarantine) -> None:
    sid = sorted(quarantine.expected)[0]
    for args in (["--reason", "checked"], ["--operator", "alice"],
                 ["--operator", " ", "--reason", "checked"]):
        code, out = replay(quarantine, "release", "--id", sid, *args)
        assert code == 2
        assert "--operator" in out or "--reason" in out
    code, out = replay(quarantine, "release", "--operator", "alice", "--reason", "checked")
    assert code == 2 and "selection" in out
    assert read_audit(quarantine.settings)[0] == []


def test_an_id_that_matches_nothing_is_named_and_refuses_a_release(quarantine: Quarantine) -> None:
    """An outside drill (stop 50): `release --id good,typo-xyz,in:9:99` printed "would release
    1", exit 0, with no word about the two ids that matched nothing; a reviewer who mistyped
    one id of twenty got no signal. Release publishes only a selection every id of which was
    found (exit 2, nothing sent); list, export and rescore name the unmatched ids on stderr."""
    good = sorted(quarantine.expected)[0]
    before = _released(quarantine)
    typos = ["typo-xyz", "depois.ingest:9:99"]
    for dry in (("--dry-run",), ()):
        code, out = replay(quarantine, "release", "--id", ",".join([good, *typos]),
                           "--operator", "alice", "--reason", "checked", *dry)
        assert code == 2, out
        assert all(t in out for t in typos) and "nothing" in out, out
    assert _released(quarantine) == before
    code, out = replay(quarantine, "list", "--id", ",".join([good, *typos]))
    assert code == 0 and good in out, out
    assert all(t in out for t in typos) and "match" in out, out


def test_release_publishes_exactly_the_chosen_ids_once(quarantine: Quarantine) -> None:
    chosen = sorted(quarantine.expected)[:3]
    before = _released(quarantine)
    code, out = replay(quarantine, "release", "--id", ",".join(chosen), "--operator", "alice",
                       "--reason", "ticket 42: checked by hand", "--dry-run")
    assert code == 0 and "would release 3" in out
    assert _released(quarantine) == before

    code, out = replay(quarantine, "release", "--id", ",".join(chosen), "--operator", "alice",
                       "--reason", "ticket 42: checked by hand")
    assert code == 0, out
    released = {s: r for s, r in _released(quarantine).items() if s not in before}
    assert set(released) == set(chosen)
    originals = {r.sample_id: r for r in read_quarantine(quarantine.settings)}
    for sid, rec in released.items():
        assert rec.value == originals[sid].value and rec.key == sid.encode()
        assert rec.h[H.RELEASED_BY] == "alice"
        assert rec.h[H.RELEASED_REASON] == "ticket 42: checked by hand"
        assert rec.replay_count == 1
        assert rec.source == originals[sid].source
    audit, unreadable = read_audit(quarantine.settings)
    audit = [a for a in audit if a.sample_id not in before]
    assert unreadable == 0
    assert sorted(a.sample_id for a in audit) == chosen
    assert all(a.operator == "alice" and a.quarantine.topic == quarantine.settings.quarantine_topic
               for a in audit)
    n_released, n_audit = len(_released_all(quarantine)), len(read_audit(quarantine.settings)[0])

    # Again, through the API this time, to see the metrics: nothing new, all reported skipped.
    metrics = Metrics()
    selected = [originals[s] for s in chosen]
    report = release(quarantine.settings, selected, "bob", "again", metrics=metrics)
    assert report.released == [] and sorted(report.skipped["already_released"]) == chosen
    assert len(_released_all(quarantine)) == n_released
    assert len(read_audit(quarantine.settings)[0]) == n_audit
    assert metrics.replay_outcomes.labels(action="release",
                                          outcome="skipped_already_released")._value.get() == 3


def test_released_copies_are_never_released_again(quarantine: Quarantine) -> None:
    sid = sorted(quarantine.expected)[-1]
    replay(quarantine, "release", "--id", sid, "--operator", "alice", "--reason", "checked")
    # A released copy routed back into quarantine (say by a misconfigured pipeline) is refused
    # by its replay_count even under a fresh audit topic that has no record of the release.
    copy = _released(quarantine)[sid]
    fresh = quarantine.settings.model_copy(update={"audit_topic": f"audit-{uuid.uuid4().hex[:6]}"})
    create_topics(fresh.bootstrap_servers, [fresh.audit_topic])  # empty: no record of the release
    looped = QuarantinedRecord.from_kafka("q", 0, 0, None, copy.key, copy.value,
                                          list(copy.headers) + [(H.VERDICT, b"quarantine")])
    report = release(fresh, [looped], "alice", "loop", dry_run=True)
    assert report.skipped == {"loop_guard": [sid]}


def test_replay_joins_no_group_and_leaves_the_live_offsets_alone(quarantine: Quarantine) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=quarantine.settings.bootstrap_servers)
    try:
        def snapshot() -> tuple[set[str], dict]:
            groups = {g["group_id"] for g in admin.list_groups()}
            return groups, admin.list_group_offsets({quarantine.live_group: None})

        before = snapshot()
        listed(quarantine, "--topic", quarantine.ingest_topic)
        after = snapshot()
    finally:
        admin.close()
    assert quarantine.live_group in before[0]
    assert sum(o.offset for o in before[1][quarantine.live_group].values()) == N_SAMPLES
    assert after == before


def _released_all(q: Quarantine) -> list[QuarantinedRecord]:
    recs = read_raw(q.settings.bootstrap_servers, q.settings.clean_topic)
    return [r for r in (QuarantinedRecord.from_kafka(x.topic, x.partition, x.offset, x.timestamp,
                                                     x.key, x.value, x.headers) for x in recs)
            if r.verdict == H.VERDICT_RELEASED]


def _released(q: Quarantine) -> dict[str, QuarantinedRecord]:
    return {r.sample_id: r for r in _released_all(q)}


# ---------------------------------------------------------------- pure rules

def _record(sid: str, verdict: str = "quarantine", replay_count: int | None = None,
            source_offset: int = 7, **extra: str) -> QuarantinedRecord:
    hdrs = [(H.VERDICT, verdict.encode()), (H.SCORE, b"-0.5"), (H.BOUNDARY, b"-0.1"),
            (H.LABEL, b"3"), (H.MODEL_VERSION, b"m1"), (H.SOURCE_TOPIC, b"in"),
            (H.SOURCE_PARTITION, b"1"), (H.SOURCE_OFFSET, str(source_offset).encode())]
    if replay_count is not None:
        hdrs.append((H.REPLAY_COUNT, str(replay_count).encode()))
    hdrs += [(k, v.encode()) for k, v in extra.items()]
    return QuarantinedRecord.from_kafka("q", 0, 0, 1000, sid.encode(), b"v", hdrs)


def test_plan_release_refuses_released_looped_dead_letter_and_repeated_records() -> None:
    plan = plan_release(
        [_record("a", source_offset=1), _record("b", source_offset=2),
         _record("c", replay_count=1, source_offset=3),
         _record("d", verdict="dlq", source_offset=4), _record("a", source_offset=1)],
        already_released={"in:1:2"})
    assert [r.sample_id for r in plan.release] == ["a"]
    assert [(r.sample_id, why) for r, why in plan.skipped] == [
        ("b", "already_released"), ("c", "loop_guard"), ("d", "not_quarantined"),
        ("a", "duplicate")]


def test_a_replay_count_the_filter_never_writes_is_skipped_not_fatal() -> None:
    """A quarantine record written by hand with depois.replay_count=-1 made the whole release
    fail on one line (its audit record's count, 0, failed validation): nothing was released.
    The filter forwards no count or a whole number (a producer's 0 included), so any other
    value is a forged record held back by the loop guard; the rest of the selection is released."""
    plan = plan_release(
        [_record("a", source_offset=1), _record("b", source_offset=2, **{H.REPLAY_COUNT: "-1"}),
         _record("c", source_offset=3, **{H.REPLAY_COUNT: "one"})],
        already_released=set())
    assert [r.sample_id for r in plan.release] == ["a"]
    assert [(r.sample_id, why) for r, why in plan.skipped] == [("b", "loop_guard"), ("c", "loop_guard")]


def test_release_headers_keep_provenance_and_replace_the_verdict() -> None:
    hdrs = dict(release_headers(_record("a"), "alice", "why", "2026-01-01T00:00:00+00:00"))
    assert hdrs[H.VERDICT] == b"released" and hdrs[H.REPLAY_COUNT] == b"1"
    assert hdrs[H.SOURCE_OFFSET] == b"7" and hdrs[H.SCORE] == b"-0.5"
    assert hdrs[H.RELEASED_BY] == b"alice" and hdrs[H.RELEASED_REASON] == b"why"


def test_filter_fields_missing_on_a_record_never_match() -> None:
    dlq = QuarantinedRecord.from_kafka("dlq", 0, 0, 0, b"x", b"v", [
        (H.VERDICT, b"dlq"), (H.ERROR_CLASS, b"malformed")])
    assert ReplayFilter(max_score=0.0).matches(dlq) is False
    assert ReplayFilter(source_partitions=frozenset({0})).matches(dlq) is False
    assert ReplayFilter(reasons=frozenset({"malformed"})).matches(dlq) is True
    assert ReplayFilter().selects_everything
    assert not ReplayFilter(labels=frozenset({1})).selects_everything


def test_read_window_and_offset_specs() -> None:
    assert parse_offsets(["0:10-20", "2:5"]) == {0: (10, 20), 2: (5, None)}
    for bad in ("x:1", "0:9-3", "0"):
        with pytest.raises(ValueError):
            parse_offsets([bad])
    w = ReadWindow(since_ms=100, until_ms=200, offsets={0: (5, 9)})
    assert w.contains(0, 5, 100) and w.contains(0, 9, 199)
    assert not w.contains(0, 10, 150) and not w.contains(1, 6, 150)
    assert not w.contains(0, 6, 200) and not w.contains(0, 6, None)


def test_replay_settings_refuse_a_group_id_and_route_options_per_client() -> None:
    from kafka import KafkaConsumer, KafkaProducer

    with pytest.raises(ValueError, match="consumer group"):
        ReplaySettings(kafka={"group_id": "depois-stream"})
    with pytest.raises(ValueError, match="not kafka-python client options"):
        ReplaySettings(kafka={"sasl_mechanisms": "PLAIN"})
    s = ReplaySettings(kafka={"security_protocol": "SSL", "fetch_max_wait_ms": 100, "linger_ms": 5})
    assert s.client_options(KafkaConsumer) == {"security_protocol": "SSL", "fetch_max_wait_ms": 100}
    assert s.client_options(KafkaProducer) == {"security_protocol": "SSL", "linger_ms": 5}


@pytest.mark.parametrize("topics", [
    {"audit_topic": "depois.clean"},  # the audit trail written into the training topic
    {"clean_topic": "depois.quarantine"},  # released copies quarantined again, for ever
    {"audit_topic": "depois.quarantine"},
])
def test_replay_settings_refuse_topics_that_coincide(topics: dict) -> None:
    """`run` refuses an output topic equal to another; replay read the same variables and took
    them, so DEPOIS_AUDIT_TOPIC=depois.clean wrote audit JSON into the training topic."""
    with pytest.raises(ValueError, match="must differ"):
        ReplaySettings(**topics)


def test_audit_record_round_trips() -> None:
    from depois_stream.audit.release import audit_record_for

    rec = audit_record_for(_record("a"), "alice", "why", "2026-01-01T00:00:00+00:00", "clean")
    assert AuditRecord.model_validate_json(rec.to_bytes()) == rec
    assert rec.source is not None and rec.source.offset == 7 and rec.replay_count == 1


def test_missing_topic_is_an_error_that_names_it(broker) -> None:
    settings = ReplaySettings(bootstrap_servers=broker.bootstrap, read_timeout_s=5)
    with pytest.raises(ReplayError, match="no-such-topic"):
        read_quarantine(settings, topic=f"no-such-topic-{uuid.uuid4().hex[:6]}")


def test_export_keeps_undecodable_records_in_the_manifest(tmp_path: Path) -> None:
    from depois_stream.audit.export import export
    from depois_stream.contract.wire import encode_sample

    value, ctype = encode_sample("good", np.full((1, 4, 4), 0.5, np.float32), 3)
    good = QuarantinedRecord.from_kafka("q", 0, 0, 1000, b"good", value, [
        (H.CONTENT_TYPE, ctype.encode()), (H.VERDICT, b"quarantine"), (H.SCORE, b"-2.5")])
    bad = QuarantinedRecord.from_kafka("q", 0, 1, 1000, b"bad", b"{not json", [])
    summary = export([good, bad], tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert (summary.decoded, summary.decode_failed, summary.sheets) == (1, 1, ["contact_000.png"])
    assert [x["npz_index"] for x in lines] == [0, None]
    assert lines[1]["decode_error"].startswith("malformed")
    with np.load(tmp_path / "samples.npz") as npz:
        assert list(npz["ids"]) == ["good"] and npz["scores"][0] == pytest.approx(-2.5)
        np.testing.assert_allclose(npz["images"][0], 128 / 255, atol=1e-6)
