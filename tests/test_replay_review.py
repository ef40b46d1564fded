"""`replay export`, `rescore` and the replay settings, against the real local broker.

Each test started as a defect an independent tester found in `replay` (F8, F11, F12): an export
that called five good samples undecodable because of one odd record read first, rescore errors
that named flags only `depois-stream run` has, and a misspelt DEPOIS_* variable that replay
ignored (for release: copies sent to the default clean topic).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from depois_stream.audit.reading import read_audit
from depois_stream.contract.model import card_path_for
from depois_stream.contract.wire import encode_sample
from tests import test_replay_release
from tests.test_replay_release import (
    RELEASE,
    Scratch,
    put,
    quarantine_headers,
    released_copies,
    replay,
    sample,
)

scratch = test_replay_release.scratch  # the same fixture (fresh topics per test), used here too

# Hints that only `depois-stream run` can act on.
RUN_ONLY = ("--model-path", "DEPOIS_MODEL_PATH", "--no-verify-card")


def _put(s: Scratch, values: list[tuple[bytes, bytes]]) -> None:
    put(s.settings.bootstrap_servers, s.settings.quarantine_topic,
        [(k, v, quarantine_headers(s.ingest, i)) for i, (k, v) in enumerate(values)])


def test_export_keeps_the_most_common_shape_when_an_odd_record_comes_first(
        scratch: Scratch, tmp_path: Path) -> None:
    """F8. Before: the first decodable record set the shape, so one 8x8 record read first made
    the five 4x4 samples after it "undecodable", each told it did not match "the model input
    shape" (no model is involved in an export)."""
    odd = encode_sample("odd", np.full((1, 8, 8), 0.5, np.float32), 3, encoding="json")[0]
    _put(scratch, [(b"odd", odd), *((f"s{i}".encode(), sample(f"s{i}")[0]) for i in range(5))])
    out_dir = tmp_path / "review"
    code, out = replay(scratch, "export", "--out", str(out_dir))
    assert code == 0, out
    assert "5 images" in out and "1 undecodable" in out, out
    manifest = {m["id"]: m for m in map(json.loads, (out_dir / "manifest.jsonl").read_text()
                                        .splitlines())}
    assert [manifest[f"s{i}"]["decode_error"] for i in range(5)] == [None] * 5
    error = manifest["odd"]["decode_error"]
    assert manifest["odd"]["npz_index"] is None
    assert "model" not in error and "[1, 8, 8]" in error and "[1, 4, 4]" in error, error
    with np.load(out_dir / "samples.npz") as npz:
        assert npz["images"].shape == (5, 1, 4, 4)
        assert list(npz["ids"]) == [f"s{i}" for i in range(5)]


def test_rescore_errors_name_its_own_option_and_no_flag_of_run(
        scratch: Scratch, tmp_path: Path, centroid_model: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """F11. Before: a folder given as --model was said not to exist, with "pass --model-path /
    DEPOIS_MODEL_PATH"; a model without its card was told to "pass --no-verify-card"; and the
    unsigned-model warning named DEPOIS_VERIFY_SIGNATURE. rescore has none of those."""
    _put(scratch, [(b"s0", sample("s0")[0])])
    hist = ("--device", "cpu", "--histogram", str(tmp_path / "h.png"))
    no_card = tmp_path / "no-card" / "m.onnx"
    no_card.parent.mkdir()
    shutil.copy(centroid_model, no_card)
    for model, words in ((tmp_path, "folder"), (no_card, "card")):
        code, out = replay(scratch, "rescore", "--model", str(model), *hist)
        assert code == 2, out
        assert len(out.strip().splitlines()) == 1, out
        assert "--model" in out and words in out and str(model) in out, out
        assert "does not exist" not in out and not [w for w in RUN_ONLY if w in out], out

    # A card that does not match: the model is loaded, unsigned, and refused.
    bad = tmp_path / "bad-card" / "m.onnx"
    bad.parent.mkdir()
    shutil.copy(centroid_model, bad)
    card = json.loads(card_path_for(centroid_model).read_text())
    card_path_for(bad).write_text(json.dumps({**card, "onnx_sha256": "0" * 64}))
    with caplog.at_level(logging.WARNING):
        code, out = replay(scratch, "rescore", "--model", str(bad), *hist)
    assert code == 1 and "card" in out and len(out.strip().splitlines()) == 1, out
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "WITHOUT signature verification" in warned and "--verify-signature" in warned, warned
    assert not [w for w in RUN_ONLY if w in out + warned], out + warned


def test_a_misspelt_depois_variable_is_refused_and_a_variable_of_run_is_not(
        scratch: Scratch) -> None:
    """F12. Before: replay ignored a DEPOIS_* variable it did not know, so a release with
    DEPOIS_CLEAN_TOPC set (DEPOIS_CLEAN_TOPIC meant) went to the default clean topic. Replay
    reads the stream filter's environment, so the filter's own variables must not stop it."""
    _put(scratch, [(b"s0", sample("s0")[0])])
    typo = {"DEPOIS_CLEAN_TOPIC": None, "DEPOIS_CLEAN_TOPC": scratch.settings.clean_topic}
    for args in (RELEASE, ("list",)):
        code, out = replay(scratch, *args, env=typo)
        assert code == 2, out
        assert len(out.strip().splitlines()) == 1, out
        assert "DEPOIS_CLEAN_TOPC (did you mean DEPOIS_CLEAN_TOPIC?)" in out, out
        assert "sets nothing" in out, out
    assert released_copies(scratch.settings) == [] and read_audit(scratch.settings)[0] == []

    of_run = {"DEPOIS_BATCH_SIZE": "64", "DEPOIS_MODEL_PATH": "/models/m.onnx"}
    code, out = replay(scratch, *RELEASE, env=of_run)
    assert code == 0 and "released 1 sample(s)" in out, out
    assert [r.sample_id for r in released_copies(scratch.settings)] == ["s0"]


def test_only_a_variable_that_meant_a_replay_setting_is_refused() -> None:
    """Review of the fix: a platform's own DEPOIS_* variables (Kubernetes adds
    DEPOIS_X_SERVICE_HOST for a Service named depois-x) must not stop replay, and names compare
    in any case, as pydantic-settings reads them."""
    from depois_stream.audit.settings import unknown_replay_env

    refused, warned = unknown_replay_env({
        "DEPOIS_CLEAN_TOPC": "x", "depois_quarantine_topc": "y", "DEPOIS_Clean_Topic": "z",
        "DEPOIS_X_SERVICE_HOST": "10.0.0.1", "DEPOIS_BATCH_SIZE": "64", "DEPOIS_AUDIT_TOPIC": "a"})
    assert refused == ["DEPOIS_CLEAN_TOPC (did you mean DEPOIS_CLEAN_TOPIC?)",
                       "depois_quarantine_topc (did you mean DEPOIS_QUARANTINE_TOPIC?)"]
    assert [w.split(" ")[0] for w in warned] == ["DEPOIS_X_SERVICE_HOST"]


def test_rescore_verifies_with_the_filter_s_key_variable(scratch: Scratch, tmp_path: Path,
                                                         centroid_model: Path) -> None:
    """Operator walkthrough (stop 43): with DEPOIS_VERIFY_SIGNATURE set, as in the filter's pod,
    rescore scored a model signed by another key ("loaded WITHOUT signature verification");
    operations.md said the variable verifies in rescore too. An empty one is refused as empty."""
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the test key")
    private, public = tmp_path / "team.pem", tmp_path / "team.pub"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(private)],
                   check=True)
    subprocess.run(["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)], check=True,
                   capture_output=True)
    _put(scratch, [(b"s0", sample("s0")[0])])
    hist = ("--device", "cpu", "--histogram", str(tmp_path / "h.png"))
    code, out = replay(scratch, "rescore", "--model", str(centroid_model), *hist,
                       env={"DEPOIS_VERIFY_SIGNATURE": str(public)})
    assert code != 0 and "unsigned" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "h.png").exists()
    code, out = replay(scratch, "rescore", "--model", str(centroid_model), *hist,
                       env={"DEPOIS_VERIFY_SIGNATURE": ""})
    assert code == 2 and "DEPOIS_VERIFY_SIGNATURE is empty" in out, out


def test_export_of_a_topic_with_a_record_kafka_python_cannot_parse_leaves_out_only_that_record(
        scratch: Scratch, tmp_path: Path) -> None:
    """The README's recalibration starts with `replay export --topic <ingest topic>`. Before: one
    ingest record whose header name is not UTF-8 (the filter dead-letters it and goes on) made
    the whole export exit 1, blaming the connection ("Kafka at ... failed: CorruptRecordError";
    fuzz drill). Now that record is left out, by offset, with a warning, and the rest exported."""
    from tests.test_delivery_fuzz import _RawKey

    for i in range(3):  # one producer each: three record batches
        headers = [(_RawKey(b"trace-\xff\xfe"), b"x")] if i == 1 else []
        put(scratch.settings.bootstrap_servers, scratch.ingest, [(f"s{i}".encode(), sample(f"s{i}")[0], headers)])
    out_dir = tmp_path / "vetted"
    code, out = replay(scratch, "export", "--topic", scratch.ingest, "--out", str(out_dir))
    assert code == 0, out
    assert "2 images" in out, out
    assert f"1 record of {scratch.ingest!r} could not be read" in out and "[0]@1" in out, out
    with np.load(out_dir / "samples.npz") as npz:
        assert list(npz["ids"]) == ["s0", "s2"]

    code, out = replay(scratch, "list", "--topic", scratch.ingest, "--limit", "0")
    assert code == 0 and "[0]@1" in out, out


def test_an_audit_record_kafka_python_cannot_parse_stops_a_release(scratch: Scratch) -> None:
    """Release's memory of earlier releases must be read whole: a record that cannot be read
    may be a whole producer batch of releases (each of which would be released again). Before,
    the read failed blaming the connection; now it names the record, and nothing is released."""
    from depois_stream.audit.records import ReplayError
    from tests.test_delivery_fuzz import _RawKey

    put(scratch.settings.bootstrap_servers, scratch.settings.audit_topic,
        [(b"a", b"{}", [(_RawKey(b"x-\xff"), b"")])])
    with pytest.raises(ReplayError, match=r"audit topic cannot be read whole: 1 record .*\[0\]@0"):
        read_audit(scratch.settings)
