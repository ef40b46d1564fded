"""`depois-stream replay`: look inside the quarantine, judge it, and undo mistakes on the record.

Every command reads the quarantine topic without a consumer group (so it never moves the live
consumer's offsets), narrows it with the same selection (``Selection``, declared once, its flags
generated), then lists, exports, re-scores or releases what is left. Only ``release`` writes
anything to Kafka. Exit codes: 0 done; 1 Kafka or the model failed (one line says what); 2 a
flag is wrong or release lacks --operator, --reason or a selection.
"""

from __future__ import annotations

import math
import os
import signal
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional
from urllib.parse import urlsplit

import typer
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from depois_stream.audit.metrics import ReplayMetrics
from depois_stream.audit.reading import Unread, describe_unread, read_quarantine
from depois_stream.audit.records import (
    Listing,
    MISSING,
    QuarantinedRecord,
    RELEASE_ID_CHARS,
    ReadWindow,
    ReplayError,
    ReplayFilter,
    as_text,
    parse_offsets,
    require_unambiguous_keys,
    select,
    shown,
    summarize,
    unmatched_ids,
)
from depois_stream.audit.release import ReleaseReport, release, require_operator_and_reason
from depois_stream.audit.settings import ReplaySettings, unknown_replay_env
from depois_stream.contract.model import card_path_for, first_line
from depois_stream.filter.config import TOPIC_NAME, describe_errors, flag
from depois_stream.filter.options import command, flags_of, option, reflow
from depois_stream.filter.signals import stop_on

if TYPE_CHECKING:
    from depois_stream.audit.export import RescoreReport

EXIT_FAILED = 1
EXIT_USAGE = 2
LIST_LIMIT = 50  # `replay list` rows by default; --limit 0 prints all

replay_app = typer.Typer(
    name="replay", no_args_is_help=True, rich_markup_mode=None,
    help=reflow(
        "Inspect, export, re-score and release quarantined samples.\n\n"
        "Every command reads the quarantine topic from the beginning (or the window given by "
        "--since/--until or --offsets) with manual partition assignment and no consumer group, "
        "so the live consumer's committed offsets are never touched. The filter options "
        "(--id, --label, --min-score, --max-score, --model-version, --partition, --reason-code) "
        "combine with AND; repeating one option means OR within it.\n\n"
        "Connection settings come from the same DEPOIS_* variables as `depois-stream run`: "
        "DEPOIS_BOOTSTRAP_SERVERS, DEPOIS_QUARANTINE_TOPIC, DEPOIS_CLEAN_TOPIC, "
        "DEPOIS_AUDIT_TOPIC (default depois.audit), DEPOIS_KAFKA (JSON, security options) and "
        "DEPOIS_READ_TIMEOUT_S (default 60: how long one read may take to reach a topic's "
        "end; a broker that does not answer is reported after 30 s of it, or after all of a "
        "shorter one). A DEPOIS_* variable that neither replay nor `run` reads is refused with "
        "exit 2 when it most likely meant one of replay's own settings (a misspelt name: the "
        "error names it and the setting it meant); any other one gets a warning on stderr.\n\n"
        "Exit codes: 0 done; 1 Kafka or a model failed; 2 a flag is wrong."))


class Selection(BaseModel):
    """Which records a replay command works on: the same options for every command."""

    bootstrap_servers: str | None = Field(None, description=(
        "Kafka bootstrap servers (default: $DEPOIS_BOOTSTRAP_SERVERS)."))
    topic: str | None = Field(None, pattern=TOPIC_NAME, description=(
        "Topic to read (default: the quarantine topic). Point it at the dead-letter topic to "
        "list or export undecodable records. For list and export only: release and rescore "
        "refuse any topic but the quarantine topic (exit 2)."))
    since: str | None = Field(None, description=(
        "Only records at or after this time: ISO-8601 (2026-11-25T10:00:00Z) or epoch ms."))
    until: str | None = Field(None, description=(
        "Only records before this time (same formats as --since)."))
    offsets: list[str] | None = Field(None, description=(
        "Read only PARTITION:FIRST[-LAST] of the topic (LAST inclusive; repeat per partition), "
        "e.g. --offsets 0:120-180."))
    ids: list[str] | None = Field(None, description=(
        "Release ids (SOURCE_TOPIC:PARTITION:OFFSET, shown by `replay list`) or sample ids (the "
        "message key); repeat or separate with commas. A token of the release-id form matches "
        "release ids only, any other token matches keys. Keys can repeat: release refuses a key "
        "that matches more than one sample (exit 2); name that sample by its release id."),
        json_schema_extra=flag("--id", "--ids"))
    labels: list[int] | None = Field(None, description=(
        "Claimed class label; repeat for several."), json_schema_extra=flag("--label"))
    min_score: float | None = Field(None, description=(
        "Keep records scored at or above this at quarantine time."))
    max_score: float | None = Field(None, description=(
        "Keep records scored at or below this at quarantine time."))
    model_versions: list[str] | None = Field(None, description=(
        "Model version that quarantined the record; repeat for several."),
        json_schema_extra=flag("--model-version"))
    partitions: list[int] | None = Field(None, description=(
        "Partition of the original ingest record; repeat for several."),
        json_schema_extra=flag("--partition"))
    reasons: list[str] | None = Field(None, description=(
        "Why the record is there: the evidence column that fired (depois.reason, e.g. knn or "
        "pixel_agreement), below_boundary for models without evidence columns, or a dead-letter error class such as "
        "malformed; repeat for several."), json_schema_extra=flag("--reason-code"))

    @field_validator("labels", "partitions")
    @classmethod
    def _not_negative(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        """A negative label or partition matches nothing: a typo, not a selection."""
        bad = [x for x in v or () if x < 0]
        if bad:
            raise ValueError(f"{_flag_of(info.field_name)} must be 0 or more, not {bad[0]}")
        return v

    @field_validator("min_score", "max_score")
    @classmethod
    def _a_number(cls, v: float | None, info: ValidationInfo) -> float | None:
        """NaN compares false with every score: the filter would silently match nothing."""
        if v is not None and math.isnan(v):
            raise ValueError(f"{_flag_of(info.field_name)} must be a number, not nan")
        return v

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "Selection":
        """Swapped bounds select nothing, and only after the whole topic was read: a typo."""
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f"--min-score {self.min_score:g} is above --max-score {self.max_score:g}: "
                             "nothing can match; swap them")
        return self

    def window(self) -> ReadWindow:
        since_ms, until_ms = _time_ms(self.since, "--since"), _time_ms(self.until, "--until")
        if since_ms is not None and until_ms is not None and since_ms >= until_ms:
            # like swapped score bounds: nothing can match, found only after a full read
            raise typer.BadParameter(f"{self.since} is not before --until {self.until}: nothing "
                                     "can match; swap them", param_hint="--since")
        try:
            return ReadWindow(since_ms=since_ms, until_ms=until_ms,
                              offsets=parse_offsets(self.offsets) if self.offsets else None)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--offsets") from None

    def filter(self) -> ReplayFilter:
        def opt(values: list[Any] | None) -> frozenset[Any] | None:
            return frozenset(values) if values else None

        ids = [i.strip() for chunk in self.ids or [] for i in chunk.split(",") if i.strip()]
        return ReplayFilter(ids=opt(ids), labels=opt(self.labels), min_score=self.min_score,
                            max_score=self.max_score, model_versions=opt(self.model_versions),
                            source_partitions=opt(self.partitions), reasons=opt(self.reasons))


def _flag_of(field_name: str | None) -> str:
    """The command-line flag of a ``Selection`` field, for its error messages."""
    return flags_of(field_name or "", Selection.model_fields[field_name or ""])[0]


# Kafka record timestamps are epoch ms, and a time index lookup refuses negative ones.
_LATEST_MS = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp() * 1000)


def _time_ms(text: str | None, flag_name: str) -> int | None:
    if text is None:
        return None
    if text.isascii() and text.isdigit():
        ms = int(text)
    else:
        iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text  # Python 3.10: no "Z"
        try:
            t = datetime.fromisoformat(iso)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is neither ISO-8601 nor epoch ms",
                                     param_hint=flag_name) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        ms = int(t.timestamp() * 1000)
    if not 0 <= ms <= _LATEST_MS:
        raise typer.BadParameter(f"{text!r} is outside 1970-01-01 .. 9999-12-31 (record times "
                                 "are milliseconds since 1970)", param_hint=flag_name)
    return ms


VERIFY_ENV = "DEPOIS_VERIFY_SIGNATURE"


def _verification_key(flag: Path | None) -> Path | None:
    """``--verify-signature``, else the filter's ``DEPOIS_VERIFY_SIGNATURE``: rescore runs in the
    filter's environment, where that variable means "verify every model" (stop 43: rescore
    ignored it and scored a model signed by another key)."""
    if flag is not None:
        return flag
    value = os.environ.get(VERIFY_ENV)
    if value is None:
        return None
    if not value.strip():
        _fail(f"{VERIFY_ENV} is empty: name the public key, or unset it", EXIT_USAGE)
    return Path(value)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    typer.echo(f"depois-stream replay: {message}", err=True)
    raise typer.Exit(code)


def _settings(sel: Selection) -> ReplaySettings:
    unknown, foreign = unknown_replay_env(os.environ)
    for name in foreign:
        typer.echo(f"depois-stream replay: warning: environment variable {name} sets nothing", err=True)
    if unknown:
        # Ignored, a misspelt DEPOIS_CLEAN_TOPIC would send released copies to the default topic.
        _fail(f"environment variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
              f"set{'' if len(unknown) > 1 else 's'} nothing: `depois-stream replay --help` lists "
              "the DEPOIS_* settings replay reads (those of `depois-stream run` are accepted "
              f"too); correct or unset {'them' if len(unknown) > 1 else 'it'}", EXIT_USAGE)
    given = {"bootstrap_servers": sel.bootstrap_servers} if sel.bootstrap_servers else {}
    try:
        settings = ReplaySettings(**given)
    except ValidationError as exc:
        _fail(f"invalid DEPOIS_* setting: {describe_errors(exc)}", EXIT_USAGE)
    except ValueError as exc:  # pydantic-settings: DEPOIS_KAFKA is not JSON
        _fail(f"invalid DEPOIS_* setting: {first_line(exc)} (DEPOIS_KAFKA is JSON: "
              "DEPOIS_KAFKA='{\"security_protocol\": \"SSL\"}')", EXIT_USAGE)
    return settings


def foreign_topic_problem(command_name: str, topic: str | None, quarantine_topic: str) -> str | None:
    """Why ``command_name`` (release or rescore) refuses ``--topic topic``, or ``None``.

    Only list and export read other topics (docs/replay.md). Release publishes quarantine
    verdicts only: pointed at the dead-letter topic it read everything, skipped every record as
    not_quarantined and exited 0, as if a release had been asked for and done. Rescore of a
    dead letter only counts it undecodable. Refused before anything is read.
    """
    if topic is None or topic == quarantine_topic:
        return None
    return (f"{command_name} works on the quarantine topic ({quarantine_topic}) only, not "
            f"--topic {topic}: --topic is for `replay list` and `replay export` (dead letters "
            "are never released or rescored); leave --topic out")


def _refuse_foreign_topic(command_name: str, sel: Selection, settings: ReplaySettings) -> None:
    problem = foreign_topic_problem(command_name, sel.topic, settings.quarantine_topic)
    if problem is not None:
        _fail(problem, EXIT_USAGE)


def _read(sel: Selection, settings: ReplaySettings) -> tuple[int, list[QuarantinedRecord]]:
    records, chosen = _read_all(sel, settings)
    return len(records), chosen


def _read_all(sel: Selection, settings: ReplaySettings, warn_unmatched: bool = True
              ) -> tuple[list[QuarantinedRecord], list[QuarantinedRecord]]:
    """Every record of the read window, and those the selection's filters keep; a warning names
    the --id tokens that kept nothing (release refuses them instead)."""
    window, flt = sel.window(), sel.filter()
    unread: list[Unread] = []
    try:
        records = read_quarantine(settings, window, sel.topic, unread)
    except ReplayError as exc:
        _fail(str(exc))
    if unread:
        typer.echo(f"depois-stream replay: warning: {describe_unread(unread)}", err=True)
    chosen = select(records, flt)
    if warn_unmatched and (missing := unmatched_ids(flt, chosen)):
        typer.echo(f"depois-stream replay: warning: {_unmatched(missing)}", err=True)
    return records, chosen


def _unmatched(ids: list[str]) -> str:
    more = f" and {len(ids) - 10} more" if len(ids) > 10 else ""
    return (f"--id {', '.join(shown(i, RELEASE_ID_CHARS) for i in ids[:10])}{more} "
            f"match{'es' if len(ids) == 1 else ''} no record of the selection (a typo, or outside "
            "the read window or the other filters; `replay list` shows what there is)")


def _check_outputs(kw: dict[str, Any]) -> None:
    """Refuse a metrics destination that cannot work before anything is read or released: found
    afterwards, the error would hide a release that did happen."""
    url = kw.get("pushgateway")
    if url is not None:
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            ok = False
        if not ok:
            raise typer.BadParameter(f"{url!r} is not a Pushgateway URL such as "
                                     "http://pushgateway:9091", param_hint="--pushgateway")
    textfile = kw.get("metrics_textfile")
    if textfile is not None and not Path(textfile).parent.is_dir():
        raise typer.BadParameter(f"folder {str(Path(textfile).parent)!r} does not exist",
                                 param_hint="--metrics-textfile")


def _publish(metrics: ReplayMetrics, action: str, kw: dict[str, Any]) -> None:
    """Called after the run's report is printed: a metrics failure must not hide what was done."""
    try:
        metrics.publish(action, kw.get("pushgateway"),
                        str(kw["metrics_textfile"]) if kw.get("metrics_textfile") else None)
    except OSError as exc:
        _fail(f"could not publish the replay metrics ({exc}); the {action} itself completed")


def _fmt(x: float | None) -> str:
    return MISSING if x is None else f"{x:.4g}"


AS_JSON = option("as_json", bool, False, "--json", help="Print one JSON document instead of text.")
TEXTFILE = option("metrics_textfile", Optional[Path], None, "--metrics-textfile", help=(
    "Also write this run's depois_replay_* series (only those) in Prometheus text format to "
    "this file (node-exporter textfile collector)."))
PUSHGATEWAY = option("pushgateway", Optional[str], None, "--pushgateway", help=(
    "Push this run's depois_replay_* series to this Prometheus Pushgateway (e.g. "
    "http://localhost:9091), job depois-replay, grouped by action."))
OUTPUTS = [TEXTFILE, PUSHGATEWAY]


def _register(name: str, fn: Callable[..., None], *extra: Any) -> None:
    replay_app.command(name)(command(fn, Selection, extra=list(extra), env=False))


def _split(kw: dict[str, Any]) -> Selection:
    """The selection options out of ``kw``; the metrics destinations in it checked."""
    _check_outputs(kw)
    try:
        return Selection(**{k: kw.pop(k) for k in list(kw) if k in Selection.model_fields})
    except ValidationError as exc:
        raise typer.BadParameter(describe_errors(exc)) from None


def list_(**kw: Any) -> None:
    """Print the selected quarantine records as a table, then totals by label, reason and model.

    Columns: sample id (the key: it can repeat), release id (the ingest record, which tells two
    samples with the same key apart; release takes it in --id), claimed label, score and the
    boundary it was compared with, reason code, model version, the original ingest record
    (SOURCE partition:offset) and the quarantine record (AT partition:offset) with its time.
    Nothing is written anywhere; whatever a producer wrote is printed escaped, long keys cut
    (reason codes and model versions whole, to copy into --reason-code and --model-version).
    At most --limit rows (50 by default, 0 for all); when rows are left out, a line after the
    table and the totals line say how many.
    """
    sel = _split(kw)
    if kw["limit"] < 0:
        raise typer.BadParameter(f"must be 0 or more, not {kw['limit']}", param_hint="--limit")
    read, chosen = _read(sel, _settings(sel))
    metrics = ReplayMetrics()
    metrics.replay_outcomes.labels(action="list", outcome="listed").inc(len(chosen))
    listing = summarize(read, chosen)
    _print_listing(listing, kw["as_json"], kw["limit"])
    _publish(metrics, "list", kw)


def _print_listing(listing: Listing, as_json: bool, limit: int) -> None:
    if as_json:
        typer.echo(listing.model_dump_json(indent=2))
        return
    typer.echo("\n".join(listing_lines(listing, limit)))


def rows_left_out(selected: int, limit: int) -> int:
    """How many selected rows a table of at most ``limit`` rows leaves out (``limit`` 0: none)."""
    return 0 if limit == 0 else max(selected - limit, 0)


def _when(ms: int | None) -> str:
    return (datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            if ms and ms > 0 else MISSING)


def listing_lines(listing: Listing, limit: int) -> list[str]:
    """The text of `replay list`: the table (at most ``limit`` rows, 0 for all) and its totals.

    Every text cell can hold what a producer wrote, so it goes through ``shown`` (escaped). Keys
    are cut to keep the table narrow (the release id beside them is whole, and --id takes it);
    reason codes and model versions are what --reason-code and --model-version take, so they are
    shown whole (only text longer than any real code or version, ``ID_CHARS``, is cut, with its
    length noted). Those columns and the release id's are as wide as their widest cell, so the
    columns after them stay in line. Rows left out are counted twice: after
    the table, and on the totals line, the one a reader of a long table or of `| grep` sees.
    """
    rows = listing.records if limit == 0 else listing.records[:limit]
    rids = [shown(r.release_id, RELEASE_ID_CHARS) for r in rows]
    reasons = [shown(r.reason) for r in rows]
    models = [shown(as_text(r.model_version)) for r in rows]
    iw = max([30, *map(len, rids)])  # 30 holds the usual ones: depois.ingest:11:123456789
    rw = max([len("REASON"), *map(len, reasons)])
    mw = max([len("MODEL"), *map(len, models)])
    lines = [f"{'ID':<24} {'RELEASE ID':<{iw}} {'LABEL':>5} {'SCORE':>10} {'BOUNDARY':>10} "
             f"{'REASON':<{rw}} {'MODEL':<{mw}} {'SOURCE':>10} {'AT':>10}  TIME"]
    for r, rid, reason, model in zip(rows, rids, reasons, models):
        src = f"{r.source.partition}:{r.source.offset}" if r.source else MISSING
        at = f"{r.quarantine.partition}:{r.quarantine.offset}"
        lines.append(f"{shown(r.id, 23, note=False):<24} {rid:<{iw}} {as_text(r.label):>5} "
                     f"{_fmt(r.score):>10} {_fmt(r.boundary):>10} {reason:<{rw}} {model:<{mw}} "
                     f"{src:>10} {at:>10}  {_when(r.quarantine.timestamp_ms)}")
    left_out = rows_left_out(listing.selected, limit)
    if left_out:
        lines.append(f"... {left_out} more not shown (--limit {limit}): --limit 0 shows all, "
                     "--json prints every record")
    lines.append(f"\nread {listing.read}, selected {listing.selected}"
                 + (f", shown {len(rows)} (--limit 0 shows all)" if left_out else ""))
    for name, counts in (("by label", listing.by_label), ("by reason", listing.by_reason),
                         ("by model version", listing.by_model_version)):
        lines.append(f"{name}: {', '.join(f'{shown(k)}: {v}' for k, v in counts.items()) or MISSING}")
    return lines


def export_(**kw: Any) -> None:
    """Write the selected records to a folder a reviewer can look through offline.

    manifest.jsonl has one line per record (id, label, score, boundary, reason, model version,
    provenance, timestamp, and where its image is); samples.npz holds the decoded images
    (float32 [N,C,H,W] in [0,1]), labels, ids, scores and boundaries; contact_NNN.png show up
    to 100 images each, in the order the records were read (the manifest's order), each
    captioned "#cell y=label" and its score: the manifest's sheet and cell fields give each
    image's sample id. Records whose bytes do not decode stay in the manifest with
    decode_error set.
    """
    from depois_stream.audit.export import export

    sel = _split(kw)
    folder = kw["out"] or Path.cwd() / datetime.now(timezone.utc).strftime(
        "replay-export-%Y%m%dT%H%M%SZ")
    if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        # Into an earlier export, its contact sheets beyond the new count would stay and mislead.
        raise typer.BadParameter(f"{str(folder)!r} already exists and is not an empty folder; "
                                 "name a new one", param_hint="--out")
    _, chosen = _read(sel, _settings(sel))
    metrics = ReplayMetrics()
    try:
        summary = export(chosen, folder, metrics=metrics)
    except OSError as exc:
        _fail(f"could not write the export to {str(folder)!r}: {exc}")
    failed = (f"{summary.decode_failed} undecodable (see decode_error in manifest.jsonl)"
              if summary.decode_failed else "none undecodable")
    typer.echo(f"exported {summary.records} records to {summary.folder}: {summary.decoded} "
               f"images in samples.npz and {len(summary.sheets)} contact sheet(s), {failed}")
    _publish(metrics, "export", kw)


def rescore_(**kw: Any) -> None:
    """Dry-run the selected samples through another model and count how many would now pass.

    Nothing is published: this answers "would the new model have let these through?" before
    anyone deploys it or releases by hand. Prints the totals and a per-label table (selected /
    would pass) and writes a histogram of the new scores split by the new verdict.
    """
    from depois_stream.audit.export import rescore
    from depois_stream.filter.detector import Detector, ModelLoadError

    sel = _split(kw)
    if kw["device"] not in ("auto", "cuda", "cpu"):
        raise typer.BadParameter("use auto, cuda or cpu", param_hint="--device")
    if not kw["histogram"].parent.is_dir():
        raise typer.BadParameter(f"folder {str(kw['histogram'].parent)!r} does not exist",
                                 param_hint="--histogram")
    if kw["histogram"].suffix.lower() not in (".png", ".svg", ".pdf"):
        raise typer.BadParameter("name a .png, .svg or .pdf file", param_hint="--histogram")
    problem = model_file_problem(kw["model"])
    if problem is not None:
        _fail(problem, EXIT_USAGE)
    key = _verification_key(kw["verify_signature"])
    settings = _settings(sel)
    _refuse_foreign_topic("rescore", sel, settings)
    _, chosen = _read(sel, settings)
    try:
        detector = Detector.load(kw["model"], device=kw["device"], public_key=key,
                                 signature_option=f"--verify-signature / {VERIFY_ENV}")
    except ModelLoadError as exc:
        _fail(str(exc))
    metrics = ReplayMetrics()
    try:
        report = rescore(chosen, detector, kw["histogram"], metrics=metrics)
    except OSError as exc:
        _fail(f"could not write the histogram {str(kw['histogram'])!r}: {exc}")
    _print_rescore(report, kw["as_json"])
    _publish(metrics, "rescore", kw)


def model_file_problem(model: Path) -> str | None:
    """What is wrong with ``--model`` as a file, in rescore's words, or ``None``.

    Checked before the quarantine is read, so a wrong path fails at once rather than after a
    long read. The detector's own errors for these cases name the stream filter's remedies
    (--model-path / DEPOIS_MODEL_PATH, --no-verify-card), which rescore does not have: it takes
    the model from --model only and always checks it against its card.
    """
    card = card_path_for(model)
    try:
        if model.is_dir():
            return (f"--model {str(model)!r} is a folder: name the model file in it (the .onnx "
                    "that `depois-train export-onnx` wrote, its .card.json beside it)")
        if not model.is_file():
            return (f"--model {str(model)!r} does not name a file: give the path of a model "
                    "exported by `depois-train export-onnx`")
        if not card.is_file():
            return (f"--model {str(model)!r} has no model card beside it ({str(card)!r}): "
                    "rescore checks every model against its card; copy the two together "
                    "(`depois-train export-onnx` writes both)")
    except OSError as exc:  # a folder on the way that cannot be searched, say
        return f"--model {str(model)!r} cannot be read ({exc.strerror or exc})"
    return None


def _print_rescore(report: RescoreReport, as_json: bool) -> None:
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    typer.echo(f"model {report.model_version}: {report.would_pass} of {report.scored} scored "
               f"samples would pass ({report.decode_failed} of {report.selected} undecodable)")
    typer.echo(f"{'LABEL':>5} {'SELECTED':>9} {'PASS':>6}")
    for lab, c in report.by_label.items():
        typer.echo(f"{lab:>5} {c.selected:>9} {c.would_pass:>6}")
    typer.echo(f"histogram: {report.histogram}")


def release_(**kw: Any) -> None:
    """Publish the selected samples to the clean topic, with an audit record for each.

    Needs --operator, --reason and a selection (--id or at least one filter option); it refuses
    with exit code 2 otherwise. Each released copy keeps the original value, key and headers
    (score, model, provenance) and adds depois.verdict=released, depois.replay_count,
    depois.released.by/.at/.reason. A sample is identified by the ingest record it came from
    (its release id: source topic, partition, offset), never by its key: a key given to --id
    that matches more than one sample is refused (exit 2), name the sample by its release id.
    Skipped, and reported: samples already released (found on the audit topic; a second run
    publishes nothing), records released before (replay_count >= 1, or a count the filter
    never writes), records that are not quarantine verdicts, records without a value, records
    with a depois.* header more than once (repeated_headers), records whose value the filter
    could not have decoded (undecodable), copies of one ingest record whose values differ (one was forged),
    and a second quarantine copy of the same ingest record. The clean and audit topics must exist (exit 1 otherwise). Only the
    quarantine topic is released from: --topic naming another is refused (exit 2).
    """
    sel = _split(kw)
    try:
        operator, reason = require_operator_and_reason(kw["operator"], kw["reason"])
    except ReplayError as exc:
        _fail(str(exc), code=EXIT_USAGE)
    if sel.filter().selects_everything:
        _fail("release needs a selection: name samples with --id or narrow with a filter option "
              "(--label, --min-score, --max-score, --model-version, --partition, --reason-code); "
              "run `replay list` with the same options first to see what it selects",
              code=EXIT_USAGE)
    settings = _settings(sel)
    _refuse_foreign_topic("release", sel, settings)
    read, chosen = _read_all(sel, settings, warn_unmatched=False)
    try:
        require_unambiguous_keys(sel.filter(), chosen)
    except ReplayError as exc:
        _fail(str(exc), code=EXIT_USAGE)
    if missing := unmatched_ids(sel.filter(), chosen):  # all or nothing
        _fail(f"nothing released: {_unmatched(missing)}; release only what you named, by "
              "fixing or dropping those ids", code=EXIT_USAGE)
    metrics = ReplayMetrics()
    try:
        # Ctrl-C or SIGTERM mid-release: finish the chunk in flight, audit it, report the rest
        # (the default KeyboardInterrupt left copies without audit records, and said nothing)
        with stop_on((signal.SIGINT, signal.SIGTERM), "finishing the chunk in flight (its "
                     "clean copies and their audit records), then stopping") as stop:
            report = release(settings, chosen, operator, reason, dry_run=kw["dry_run"],
                             metrics=metrics, stop=stop, read=read)
    except ReplayError as exc:
        typer.echo(f"depois-stream replay: {exc}", err=True)
        _publish(metrics, "release", kw)  # what did go out is counted
        raise typer.Exit(EXIT_FAILED) from None
    _print_release(report, kw["as_json"], kw["dry_run"], settings)
    _publish(metrics, "release", kw)


def samples_named_once(sample_ids: list[str], release_ids: list[str]) -> list[str]:
    """Each sample of a report list once, as "key (release id)", in first-seen order, with its
    number of copies when the list holds more than one record of it.

    The lists are per quarantine record, and at-least-once delivery can put two copies of one
    ingest record on the quarantine topic: named once per record, a release run again named the
    one sample twice ("already_released: k (in:0:7), k (in:0:7)"), which reads as two samples.
    """
    copies = Counter(zip(sample_ids, release_ids))  # first-seen order, as a dict keeps it
    return [f"{shown(sid)} ({shown(rid, RELEASE_ID_CHARS)}"
            + (f", {n} copies)" if n > 1 else ")") for (sid, rid), n in copies.items()]


def _print_release(report: ReleaseReport, as_json: bool, dry_run: bool,
                   settings: ReplaySettings) -> None:
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    verb = "would release" if dry_run else "released"
    if not report.released:  # "released 0 sample(s) ..., audit records on ..." read as if some were
        typer.echo(f"nothing {'would be ' if dry_run else ''}released: every selected sample was skipped"
                   if report.skipped else "nothing selected, nothing released")
    else:
        typer.echo(f"{verb} {len(report.released)} sample(s) to {settings.clean_topic}"
                   + ("" if dry_run else f", audit records on {settings.audit_topic}"))
    # Key and release id: two samples may share a key, and only the release id tells them apart.
    for sid, rid in zip(report.released, report.release_ids):
        typer.echo(f"  {shown(sid)}  {shown(rid, RELEASE_ID_CHARS)}")
    for why, skipped in report.skipped.items():
        named = samples_named_once(skipped, report.skipped_release_ids[why])
        typer.echo(f"skipped {len(skipped)} ({why}): {', '.join(named[:20])}"
                   + (" ..." if len(named) > 20 else ""))
    if report.unreadable_audit_records:
        typer.echo(f"warning: {report.unreadable_audit_records} unreadable record(s) on "
                   f"{settings.audit_topic} were ignored", err=True)


_register("list", list_,
          option("limit", int, LIST_LIMIT, "--limit", help="Print at most this many rows; 0 "
                 "prints all of them (the totals always count all)."), AS_JSON, *OUTPUTS)
_register("export", export_,
          option("out", Optional[Path], None, "--out", help="Folder to write: new (created) or "
                 "empty; default ./replay-export-<UTC time>."), *OUTPUTS)
_register("rescore", rescore_,
          option("model", Path, ..., "--model", help="ONNX model to try (its model card must sit "
                 "beside it)."),
          option("histogram", Path, Path("rescore-histogram.png"), "--histogram",
                 help="Where to write the score histogram PNG."),
          option("device", str, "auto", "--device", help="Where onnxruntime scores: auto (CUDA "
                 "when offered), cuda or cpu."),
          option("verify_signature", Optional[Path], None, "--verify-signature", help=(
              "Public key: refuse the model unless its model.sig verifies with it (as "
              "`depois-stream run --verify-signature` does). Default: DEPOIS_VERIFY_SIGNATURE, "
              "the filter's own setting, when it is set.")),
          AS_JSON, *OUTPUTS)
_register("release", release_,
          option("operator", Optional[str], None, "--operator", help="Who approves the release "
                 "(goes into headers and the audit topic). Required."),
          option("reason", Optional[str], None, "--reason", help="Why the samples are safe, e.g. "
                 "a ticket reference. Required."),
          option("dry_run", bool, False, "--dry-run", help="Show what would be released and "
                 "skipped; publish nothing."),
          AS_JSON, *OUTPUTS)
