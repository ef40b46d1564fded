"""`replay` as a newcomer meets it after `make demo`, against the real local broker.

Each test started as a defect a newcomer walkthrough found: the demo's last line promised that
`replay list` shows every quarantined record (it prints 50, and piped through grep nothing said
so), the help said every unknown DEPOIS_* variable is refused (most only get a warning), release
accepted the dead-letter topic and named one sample twice, a dead letter's missing label was
printed as Python's None, and the table cut the reason codes and model versions that
--reason-code and --model-version take.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from depois_stream.audit.reading import read_audit
from depois_stream.cli import app
from depois_stream.contract import headers as H
from depois_stream.filter.config import ConsumerConfig
from depois_stream.sim.broker import create_topics
from depois_stream.sim.demo import DemoResult, QuarantineRow, render
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

OPERATOR = ("--operator", "a", "--reason", "b")


def _put_quarantined(s: Scratch, n: int) -> list[str]:
    """``n`` decodable quarantine records keyed k00, k01, ...; their keys."""
    keys = [f"k{i:02d}" for i in range(n)]
    put(s.settings.bootstrap_servers, s.settings.quarantine_topic,
        [(k.encode(), sample(k)[0], quarantine_headers(s.ingest, i)) for i, k in enumerate(keys)])
    return keys


def _rows(out: str) -> list[str]:
    """The table rows of `replay list` text output (keys k00, k01, ...)."""
    return [line for line in out.splitlines() if re.match(r"k\d\d ", line)]


def _dlq(s: Scratch, unique_suffix: str = "dlq") -> str:
    """A dead-letter topic beside the scratch topics, holding what the router writes for two
    copies of one malformed ingest record (at-least-once delivery can dead-letter it twice)."""
    topic = f"{s.settings.quarantine_topic}-{unique_suffix}"
    create_topics(s.settings.bootstrap_servers, [topic])
    headers = [(H.VERDICT, b"dlq"), (H.ERROR, b"not a sample"), (H.ERROR_CLASS, b"malformed"),
               (H.MODEL_VERSION, b"m1"), (H.SOURCE_TOPIC, s.ingest.encode()),
               (H.SOURCE_PARTITION, b"0"), (H.SOURCE_OFFSET, b"999")]
    put(s.settings.bootstrap_servers, topic, [(b"malformed-0000", b"{oops", headers)] * 2)
    return topic


def test_list_says_how_many_rows_it_did_not_show_and_limit_0_shows_all(scratch: Scratch) -> None:
    """Defect 1. Before: `replay list | grep -c KEY` counted 50 of 53 while the totals line read
    "read 53, selected 53": the only hint, "... 3 more (raise --limit or use --json)", was a
    line without the key, and --limit 0 (the value that reads as "no limit") printed no rows."""
    keys = _put_quarantined(scratch, 53)
    code, out = replay(scratch, "list")
    assert code == 0, out
    assert [r.split()[0] for r in _rows(out)] == keys[:50], out
    totals = next(line for line in out.splitlines() if line.startswith("read "))
    assert totals.startswith("read 53, selected 53, shown 50") and "--limit 0" in totals, totals
    assert "3 more not shown" in out and "--limit 0 shows all" in out, out

    code, out = replay(scratch, "list", "--limit", "0")
    assert code == 0, out
    assert [r.split()[0] for r in _rows(out)] == keys, out
    assert "not shown" not in out and "read 53, selected 53\n" in out, out
    code, out = replay(scratch, "list", "--limit", "53")
    assert code == 0 and len(_rows(out)) == 53 and "not shown" not in out, out


def test_the_demos_replay_command_lists_every_quarantined_record(scratch: Scratch) -> None:
    """Defect 1, the demo. Before: its last line said "`depois-stream replay list` shows them
    all"; run as written against a quarantine of 53 records, it listed 50."""
    keys = _put_quarantined(scratch, 53)
    result = DemoResult(
        published=53, poisoned=53, malformed=0, consumed=53, clean=0, quarantined=53,
        dead_lettered=0, dlq_reasons={}, dlq_as_expected=True, precision=1.0, recall=1.0,
        false_positive_rate=0.0, breaker_trips=0, metrics_url=None,
        quarantine_rows=[QuarantineRow(sample_id="k00", label="3", score="-0.5",
                                       boundary="-0.1", source_offset="0",
                                       model_version="m1", truly_poisoned=True)])
    cfg = ConsumerConfig(model_path=Path("model.onnx"), metrics_port=0)
    hint = next(line for line in render(result, cfg, "random-flip", 0.2).splitlines()
                if "shows them all" in line)
    command = shlex.split(re.search(r"`([^`]*)`", hint).group(1))
    assert command[:3] == ["depois-stream", "replay", "list"], hint
    code, out = replay(scratch, *command[2:])
    assert code == 0, out
    assert [r.split()[0] for r in _rows(out)] == keys, (hint, out)


def test_replay_help_says_which_unknown_variables_are_refused_and_which_warned(
        scratch: Scratch) -> None:
    """Defect 2. Before: the help said any DEPOIS_* variable that neither replay nor `run` reads
    "is refused with exit 2"; replay refuses only one that most likely meant its own setting,
    and warns about the others (a platform's DEPOIS_X_SERVICE_HOST must not stop it)."""
    result = CliRunner().invoke(app, ["replay", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "most likely meant one of replay's own settings" in text, text
    assert "warning" in text, text
    assert "(a misspelt name) is refused with exit 2" not in text, text

    # ... and that is what replay does
    _put_quarantined(scratch, 1)
    code, out = replay(scratch, "list", env={"DEPOIS_X_SERVICE_HOST": "10.0.0.1"})
    assert code == 0 and "warning" in out and "DEPOIS_X_SERVICE_HOST" in out, out
    code, out = replay(scratch, "list", env={"DEPOIS_QUARANTINE_TOPC": "x"})
    assert code == 2 and "did you mean DEPOIS_QUARANTINE_TOPIC?" in out, out


def test_release_and_rescore_refuse_another_topic_before_reading_anything(
        scratch: Scratch, centroid_model: Path, tmp_path: Path) -> None:
    """Defect 3. Before: `release --topic DLQ --reason-code malformed` read the dead letters,
    skipped each as not_quarantined and exited 0, though --topic is for list and export only
    (docs/replay.md); rescore read them too, only to call them undecodable."""
    dlq = _dlq(scratch)
    release = ("release", "--topic", dlq, "--reason-code", "malformed", *OPERATOR)
    rescore = ("rescore", "--topic", dlq, "--model", str(centroid_model), "--device", "cpu",
               "--histogram", str(tmp_path / "h.png"))
    for args in (release, (*release, "--dry-run"), rescore):
        code, out = replay(scratch, *args)
        assert code == 2, out
        assert len(out.strip().splitlines()) == 1, out
        assert f"--topic {dlq}" in out and "list" in out and "export" in out, out
        # refused before anything is read: a broker that is not there is never asked
        code, out = replay(scratch, *args, env={"DEPOIS_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                                                "DEPOIS_READ_TIMEOUT_S": "1"})
        assert code == 2 and f"--topic {dlq}" in out, out
    assert not (tmp_path / "h.png").exists()
    assert released_copies(scratch.settings) == [] and read_audit(scratch.settings) == ([], 0)

    # the dead letters are still there to list, and naming the quarantine topic itself is fine
    code, out = replay(scratch, "list", "--topic", dlq, "--reason-code", "malformed")
    assert code == 0 and "read 2, selected 2" in out, out
    _put_quarantined(scratch, 1)
    code, out = replay(scratch, "release", "--topic", scratch.settings.quarantine_topic,
                       "--label", "3", *OPERATOR)
    assert code == 0 and "released 1 sample(s)" in out, out


def test_release_names_each_skipped_sample_once(scratch: Scratch) -> None:
    """Defect 3, the skipped line. Before: two quarantine copies of one ingest record (at-least-
    once delivery writes them), released once, were reported by the next run as "skipped 2
    (already_released): k00 (X), k00 (X)": one sample that reads as two."""
    rid = f"{scratch.ingest}:0:0"
    put(scratch.settings.bootstrap_servers, scratch.settings.quarantine_topic,
        [(b"k00", sample("k00")[0], quarantine_headers(scratch.ingest, 0))] * 2)
    code, out = replay(scratch, "release", "--label", "3", *OPERATOR)
    assert code == 0, out
    assert f"k00  {rid}" in out and f"skipped 1 (duplicate): k00 ({rid})" in out, out

    code, out = replay(scratch, "release", "--label", "3", *OPERATOR)
    assert code == 0, out
    skipped = [line for line in out.splitlines() if line.startswith("skipped")]
    assert skipped == [f"skipped 2 (already_released): k00 ({rid}, 2 copies)"], out
    # --json stays one entry per record
    code, out = replay(scratch, "release", "--label", "3", *OPERATOR, "--json")
    assert json.loads(out)["skipped_release_ids"] == {"already_released": [rid, rid]}, out
    assert [r.release_id for r in released_copies(scratch.settings)] == [rid]


def test_list_shows_a_missing_label_as_a_dash_not_none(scratch: Scratch) -> None:
    """Defect 4. Before: `list --topic DLQ` printed LABEL `None` and `by label: None: 2`, and
    --json counted them under the key "None"."""
    dlq = _dlq(scratch)
    code, out = replay(scratch, "list", "--topic", dlq)
    assert code == 0, out
    assert "None" not in out, out
    rows = [line for line in out.splitlines() if line.startswith("malformed-0000")]
    assert len(rows) == 2 and all(row.split()[2] == "-" for row in rows), out
    assert "by label: -: 2" in out, out
    code, out = replay(scratch, "list", "--topic", dlq, "--json")
    listing = json.loads(out)
    assert listing["by_label"] == {"-": 2} and "None" not in out, out
    assert [r["label"] for r in listing["records"]] == [None, None]  # JSON's own null


def test_list_shows_reason_codes_and_model_versions_whole_to_copy_into_filters(
        scratch: Scratch) -> None:
    """Defect 5. Before: the table cut `label_agreement` to `label_agreemen…` and
    `digits-seed0-62789fb57c70` to `digits-seed0-6278…`, values --reason-code and
    --model-version take whole; copied from the table, they selected nothing. Hostile header
    text stays escaped and long keys stay cut."""
    version, reason = "digits-seed0-62789fb57c70", "label_agreement"
    long_key = "x" * 60
    evil_version = "v\n\x1b[2Jforged"

    def headers(offset: int, model: str) -> list[tuple[str, bytes]]:
        kept = [(k, v) for k, v in quarantine_headers(scratch.ingest, offset)
                if k != H.MODEL_VERSION]
        return [*kept, (H.MODEL_VERSION, model.encode()), (H.REASON, reason.encode())]

    put(scratch.settings.bootstrap_servers, scratch.settings.quarantine_topic, [
        (long_key.encode(), sample("a")[0], headers(0, version)),
        (b"evil", sample("b")[0], headers(1, evil_version))])
    code, out = replay(scratch, "list")
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("x"))
    cells = row.split()
    assert reason in cells and version in cells, row
    assert long_key not in row and "…" in cells[0], row  # keys are still cut
    assert "\x1b" not in out and "v\\n\\x1b[2Jforged" in out, out
    assert not any(line.startswith("forged") for line in out.splitlines()), out
    # the columns still line up: every row's SOURCE cell ends where the header's SOURCE does
    header = next(line for line in out.splitlines() if line.startswith("ID "))
    end = header.index("SOURCE") + len("SOURCE")
    rows = [line for line in out.splitlines() if line.startswith(("x", "evil"))]
    assert len(rows) == 2 and all(re.search(r" 0:[01]$", line[:end]) for line in rows), out

    # copied from the table, each value selects its record
    for flag, value in (("--reason-code", reason), ("--model-version", version)):
        code, out = replay(scratch, "list", flag, value, "--json")
        assert code == 0 and json.loads(out)["selected"] >= 1, out
