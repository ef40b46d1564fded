"""Routing: every record gets exactly one destination, and its headers explain the verdict."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from depois_stream.contract import headers as H
from depois_stream.filter.router import CLEAN, DLQ, QUARANTINE, Provenance, Verdicts, destinations, plan


def _provenance(n: int, topic: str = "in") -> Provenance:
    return Provenance(topics=[topic] * n, partitions=np.arange(n) % 3,
                      offsets=np.arange(100, 100 + n), timestamps_ms=np.full(n, 1_700_000_000_000))


def _verdicts(n: int, index: list[int], poisoned: list[bool], p_value: bool = False) -> Verdicts:
    m = len(index)
    failed = sorted(set(range(n)) - set(index))
    return Verdicts(
        n=n, index=np.array(index, dtype=np.int64), labels=np.arange(m, dtype=np.int64) % 10,
        score=np.linspace(-1.0, 1.0, m, dtype=np.float32), poisoned=np.array(poisoned, dtype=bool),
        threshold=np.full(m, -0.25, dtype=np.float32),
        p_value=np.linspace(0.0, 1.0, m, dtype=np.float32) if p_value else None,
        failures=[(i, "malformed", f"record {i} is not a sample") for i in failed])


def test_destination_per_record() -> None:
    dest = destinations(5, np.array([0, 2, 4]), np.array([False, True, False]))
    assert dest.tolist() == [CLEAN, DLQ, QUARANTINE, DLQ, CLEAN]


def test_scored_headers_carry_verdict_score_boundary_and_provenance() -> None:
    v = _verdicts(4, index=[0, 1, 3], poisoned=[False, True, False], p_value=True)
    routed = plan(v, _provenance(4, "ingest"), "v7", "ab" * 32)
    assert routed.counts() == {"clean": 2, "quarantine": 1, "dlq": 1}
    q = H.as_dict(routed.headers[1])
    assert q[H.VERDICT] == H.VERDICT_QUARANTINE
    assert np.float32(q[H.SCORE]) == v.score[1]  # exact round trip of the float32 score
    assert np.float32(q[H.BOUNDARY]) == np.float32(-0.25)
    assert np.float32(q[H.P_VALUE]) == v.p_value[1]
    assert q[H.LABEL] == "1"
    assert (q[H.MODEL_VERSION], q[H.MODEL_SHA256]) == ("v7", "ab" * 32)
    assert (q[H.SOURCE_TOPIC], q[H.SOURCE_PARTITION], q[H.SOURCE_OFFSET]) == ("ingest", "1", "101")
    assert q[H.SOURCE_TIMESTAMP] == "1700000000000"
    assert H.as_dict(routed.headers[3])[H.VERDICT] == H.VERDICT_CLEAN
    assert H.ERROR not in q


def test_dead_letters_carry_reason_and_no_score() -> None:
    routed = plan(_verdicts(3, index=[0], poisoned=[False]), _provenance(3), "v1", "00" * 32)
    d = H.as_dict(routed.headers[2])
    assert d[H.VERDICT] == H.VERDICT_DLQ
    assert d[H.ERROR_CLASS] == "malformed"
    assert d[H.ERROR] == "record 2 is not a sample"
    assert d[H.SOURCE_OFFSET] == "102"
    assert H.SCORE not in d and H.BOUNDARY not in d


def test_p_value_header_only_when_the_model_has_one() -> None:
    routed = plan(_verdicts(2, index=[0, 1], poisoned=[False, False]), _provenance(2), "v", "s")
    assert all(H.P_VALUE not in H.as_dict(h) for h in routed.headers)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_record_routed_exactly_once(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 60))
    decoded = sorted(data.draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n)) if n else [])
    poisoned = data.draw(st.lists(st.booleans(), min_size=len(decoded), max_size=len(decoded)))
    routed = plan(_verdicts(n, decoded, poisoned), _provenance(n), "v", "s")
    assert len(routed.headers) == len(routed.destination) == n
    assert sum(routed.counts().values()) == n
    for i in range(n):
        verdict = H.as_dict(routed.headers[i])[H.VERDICT]
        expected = (H.VERDICT_DLQ if i not in decoded else
                    H.VERDICT_QUARANTINE if poisoned[decoded.index(i)] else H.VERDICT_CLEAN)
        assert verdict == expected
        assert routed.destination[i] == {H.VERDICT_CLEAN: CLEAN, H.VERDICT_QUARANTINE: QUARANTINE,
                                         H.VERDICT_DLQ: DLQ}[verdict]


def test_the_filters_own_headers_fit_the_allowance_at_every_contract_bound() -> None:
    """pipeline reserves HEADER_ALLOWANCE bytes for the headers the filter adds and forwards a
    record whose own bytes fit the rest: that holds only while each header is bounded. The
    model version and the member names had no bound, so a hand-built model pushed routed
    records over the producer's limit (refused, then dead-lettered instead of routed)."""
    from depois_stream.contract.model import MAX_MEMBER_NAME, MAX_MODEL_VERSION
    from depois_stream.filter.pipeline import HEADER_ALLOWANCE, HEADER_OVERHEAD

    version, member, topic = "v" * MAX_MODEL_VERSION, "m" * MAX_MEMBER_NAME, "t" * 249
    big = np.iinfo(np.int64).min
    verdicts = Verdicts(
        n=2, index=np.array([0]), labels=np.array([-(2**62)]), score=np.array([-1.2345678e-38], np.float32),
        poisoned=np.array([True]), threshold=np.array([-3.4028235e38], np.float32),
        p_value=np.array([1.1754944e-38], np.float32),
        failures=[(1, "x" * 64, "é" * 4000)], reasons=[member])
    prov = Provenance(topics=[topic, topic], partitions=np.array([2**31 - 1] * 2),
                      offsets=np.array([big] * 2), timestamps_ms=np.array([big] * 2))
    for headers in plan(verdicts, prov, version, "f" * 64).headers:
        size = sum(len(k.encode()) + len(v) + HEADER_OVERHEAD for k, v in headers)
        assert size <= HEADER_ALLOWANCE, size
