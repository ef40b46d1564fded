"""Replay under keys an attacker chose: shared, shaped like a release id, huge, or unprintable.

A record's key is the producer's to pick, so nothing replay decides may rest on it, and nothing
replay prints may be forged by it. Each test here started as a defect an independent tester
found in `replay` (F1-F4, F7), and runs against the real local broker through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from depois_stream.audit.reading import read_audit, read_raw
from depois_stream.contract import headers as H
from tests import test_replay_release
from tests.test_replay_release import (
    Scratch,
    put,
    quarantine_headers,
    released_copies,
    replay,
    sample,
)

scratch = test_replay_release.scratch  # the same fixture (fresh topics per test), used here too

OPERATOR = ("--operator", "alice", "--reason", "ticket 7")


def _put_keys(s: Scratch, keys: list[bytes]) -> list[str]:
    """One decodable quarantine record per key, ingest offsets 0, 1, ...; their release ids."""
    put(s.settings.bootstrap_servers, s.settings.quarantine_topic,
        [(k, sample(f"s{i}")[0], quarantine_headers(s.ingest, i)) for i, k in enumerate(keys)])
    return [f"{s.ingest}:0:{i}" for i in range(len(keys))]


def _nothing_released(s: Scratch) -> None:
    assert read_raw(s.settings.bootstrap_servers, s.settings.clean_topic, timeout_s=20) == []
    assert read_audit(s.settings) == ([], 0)


def test_release_refuses_a_key_shared_by_different_samples(scratch: Scratch) -> None:
    """F1. Before: `--id k` released every record keyed k, the attacker's copy with the sample
    under review, and printed the key twice, so the two looked like one sample."""
    ids = _put_keys(scratch, [b"k", b"k", b"other"])
    for dry in ((), ("--dry-run",)):
        code, out = replay(scratch, "release", "--id", "k", *OPERATOR, *dry)
        assert code == 2, out
        assert "'k'" in out and "2 different samples" in out and "release id" in out, out
        assert ids[0] in out and ids[1] in out and ids[2] not in out, out
        assert len(out.strip().splitlines()) == 1, out
    _nothing_released(scratch)

    # list and export still select by key; list shows each copy's release id to tell them apart
    code, out = replay(scratch, "list", "--id", "k")
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("k ")]
    assert len(rows) == 2 and ids[0] in rows[0] and ids[1] in rows[1], out
    code, out = replay(scratch, "list", "--id", "k", "--json")
    assert [r["release_id"] for r in json.loads(out)["records"]] == ids[:2]

    # by release id, exactly that copy goes out, and the output says which one it was
    code, out = replay(scratch, "release", "--id", ids[1], *OPERATOR)
    assert code == 0, out
    assert f"k  {ids[1]}" in out, out
    assert [r.release_id for r in released_copies(scratch.settings)] == [ids[1]]
    code, out = replay(scratch, "release", "--id", ids[1], *OPERATOR, "--json")
    assert json.loads(out)["skipped_release_ids"] == {"already_released": [ids[1]]}
    # a key with one sample behind it (another copy of the same ingest record is no choice)
    code, out = replay(scratch, "release", "--id", "other", *OPERATOR)
    assert code == 0 and f"other  {ids[2]}" in out, out


def test_a_key_shaped_like_a_release_id_does_not_join_a_selection_by_release_id(
        scratch: Scratch) -> None:
    """F2. Before: a record whose key is `TOPIC:0:0` was selected by `--id TOPIC:0:0` along with
    the real ingest record 0:0, and released with it."""
    real = f"{scratch.ingest}:0:0"
    ids = _put_keys(scratch, [b"genuine", real.encode()])
    assert ids[0] == real
    code, out = replay(scratch, "release", "--id", real, *OPERATOR)
    assert code == 0, out
    assert [r.sample_id for r in released_copies(scratch.settings)] == ["genuine"]
    code, out = replay(scratch, "list", "--id", real, "--json")
    assert code == 0, out
    assert [(r["id"], r["release_id"]) for r in json.loads(out)["records"]] == [("genuine", real)]
    # any other token is a key, even one with colons
    code, out = replay(scratch, "list", "--id", "a:b", "--json")
    warning, _, doc = out.partition("\n{")  # the runner shows stderr's warning, then stdout
    assert code == 0 and "--id a:b matches no record" in warning, out
    assert json.loads("{" + doc)["selected"] == 0, out


def test_release_id_tokens_match_release_ids_only_and_other_tokens_keys() -> None:
    """F2, the rule itself (``ReplayFilter`` is pure)."""
    from depois_stream.audit import records as r

    forged = r.QuarantinedRecord.from_kafka("q", 0, 5, 1000, b"in:0:1", b"v",
                                            quarantine_headers("in", 7))
    assert forged.release_id == "in:0:7"
    assert not r.ReplayFilter(ids=frozenset({"in:0:1"})).matches(forged)
    assert r.ReplayFilter(ids=frozenset({"in:0:7"})).matches(forged)
    assert r.ReplayFilter(ids=frozenset({"a:b", "in:0:1:2"})).key_ids == {"a:b", "in:0:1:2"}
    tokens = ("in:0:1", "a b:0:1", "in:0:x", "in:-1:2", "in:0:1:2", "orders:01:002", "in:10:0")
    assert [r.is_release_id(t) for t in tokens] == [True, False, False, False, False, False, True]


def test_a_keyless_record_is_counted_among_the_samples_its_key_token_names() -> None:
    """Review of the fix: a keyless record whose hand-written provenance is not of release-id
    shape is named by that text, a key token, which also matches a keyed record: two samples,
    so release must refuse, as for two keys."""
    from depois_stream.audit import records as r

    odd = [(k, v) for k, v in quarantine_headers("in", 3) if k != H.SOURCE_TOPIC] + [(H.SOURCE_TOPIC, b"bad topic")]
    keyless = r.QuarantinedRecord.from_kafka("q", 0, 5, 1000, None, b"v", odd)
    keyed = r.QuarantinedRecord.from_kafka("q", 0, 6, 1000, b"bad topic:0:3", b"v", quarantine_headers("in", 4))
    flt = r.ReplayFilter(ids=frozenset({"bad topic:0:3"}))
    assert flt.matches(keyless) and flt.matches(keyed)
    assert r.ambiguous_keys(flt, [keyless, keyed]) == {"bad topic:0:3": ["bad topic:0:3", "in:0:4"]}


def test_shown_never_cuts_an_escape_in_half() -> None:
    """Review of the fix: cut after escaping, ``\\x1b`` could end as ``\\x``."""
    from depois_stream.audit.records import shown

    assert shown("a" * 78 + "\x1b[2J", 80) == "a" * 78 + "… (82 characters)"
    assert shown("\x1b" * 10, 5, note=False) == "\\x1b…"
    assert shown("ab\\cd", 3) == "ab… (5 characters)"
    assert shown("short") == "short" and shown("tab\t") == "tab\\t"


def test_a_sample_whose_audit_record_is_too_large_stops_the_release_before_anything_is_sent(
        scratch: Scratch) -> None:
    """F3. The audit record carries the key twice (Kafka key and sample_id): a 600,000-character
    key fits the clean copy in 1 MiB but not its audit record. Before: all clean copies went out,
    the audit records from that sample on were refused, every rerun released them again, and the
    error line carried the key (600 KB)."""
    huge = b"K" * 600_000
    _put_keys(scratch, [b"s0", huge, b"s2"])
    # the dry run refuses too (review of the fix: it said "would release 3", then the release
    # refused), then the real run twice
    for dry in (("--dry-run",), (), ()):
        code, out = replay(scratch, "release", "--label", "3", *OPERATOR, *dry)
        assert code == 1, out[:2000]
        assert "audit record" in out and "nothing was released" in out, out[:2000]
        assert "KKKK" in out and "600000 characters" in out and len(out) < 1000, out[:2000]
        _nothing_released(scratch)


def test_export_memory_does_not_grow_with_the_longest_key(scratch: Scratch,
                                                          tmp_path: Path) -> None:
    """F4. Before: samples.npz's ids padded every id to the longest one (a fixed-width unicode
    array): 1,000 records and one 900,000-character key took 3.6 GB to write and to load."""
    huge = "K" * 900_000
    _put_keys(scratch, [b"s0", huge.encode(), b"s2"])
    out = tmp_path / "review"
    code, text = replay(scratch, "export", "--out", str(out))
    assert code == 0, text
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == ["s0", huge, "s2"]  # the manifest keeps them whole
    with np.load(out / "samples.npz") as npz:  # plain np.load: no pickles
        assert npz["ids"].dtype.kind == "U" and npz["ids"].dtype.itemsize <= 256 * 4
        assert [npz["ids"][m["npz_index"]] for m in manifest] == ["s0", huge[:256], "s2"]
    assert (out / "samples.npz").stat().st_size < 100_000


def test_unprintable_keys_cannot_forge_rows_or_drive_the_terminal(scratch: Scratch) -> None:
    """F7. Before: a key with a newline and an escape sequence reached the terminal as is: a
    forged row in `list`, a cleared screen in `release` output and in error lines."""
    evil = "evil\n\x1b[2Jforged 9 -0.1"
    ids = _put_keys(scratch, [evil.encode(), evil.encode()])
    outputs = [replay(scratch, "list")[1],
               replay(scratch, "release", "--id", evil, *OPERATOR)[1],  # ambiguous: an error
               replay(scratch, "release", "--id", ids[0], *OPERATOR)[1]]
    # the totals lines print header text too (review of the fix): a hostile model version
    put(scratch.settings.bootstrap_servers, scratch.settings.quarantine_topic,
        [(b"m", sample("m")[0], [*quarantine_headers(scratch.ingest, 9)[:4],
                                 (H.MODEL_VERSION, evil.encode()), *quarantine_headers(scratch.ingest, 9)[5:]])])
    outputs.append(replay(scratch, "list")[1])
    for out in outputs:
        assert "\x1b" not in out and not any(line.startswith("forged") for line in
                                             out.splitlines()), out
        assert "evil\\n\\x1b[2Jforged" in out, out
