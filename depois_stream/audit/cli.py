"""`depois-stream replay`: look inside the quarantine, judge it, and undo mistakes on the record.

Every command reads the quarantine topic without a consumer group (so it never moves the live
consumer's offsets), narrows it with the same window and filter options, then lists, exports,
re-scores or releases what is left. Only ``release`` writes anything to Kafka.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal, NoReturn, Optional, TypeVar

import typer
from prometheus_client import write_to_textfile
from pydantic import ValidationError

from depois_stream.filter.metrics import Metrics
from depois_stream.audit.replay import (
    QuarantinedRecord,
    ReadWindow,
    ReplayError,
    ReplayFilter,
    ReplaySettings,
    parse_offsets,
    read_quarantine,
    release,
    require_operator_and_reason,
    select,
    summarize,
)

F = TypeVar("F", bound=Callable[..., None])

replay_app = typer.Typer(
    name="replay",
    help=(
        "Inspect, export, re-score and release quarantined samples.\n\n"
        "Every command reads the quarantine topic from the beginning (or the window given by "
        "--since/--until or --offsets) with manual partition assignment and no consumer group, "
        "so the live consumer's committed offsets are never touched. The filter options "
        "(--id, --label, --min-score, --max-score, --model-version, --partition, --reason-code) "
        "combine with AND; repeating one option means OR within it.\n\n"
        "Connection settings come from the same DEPOIS_* variables as `depois-stream run`: "
        "DEPOIS_BOOTSTRAP_SERVERS, DEPOIS_QUARANTINE_TOPIC, DEPOIS_CLEAN_TOPIC, "
        "DEPOIS_AUDIT_TOPIC (default depois.audit) and DEPOIS_KAFKA (JSON, security options)."
    ),
    no_args_is_help=True,
)


def _command(name: str) -> Callable[[F], F]:
    """Register ``fn`` with its docstring reflowed: rich help keeps every source line break."""
    def register(fn: F) -> F:
        paragraphs = (inspect.getdoc(fn) or "").split("\n\n")
        replay_app.command(name, help="\n\n".join(" ".join(p.split()) for p in paragraphs))(fn)
        return fn
    return register

Bootstrap = Annotated[Optional[str], typer.Option(
    "--bootstrap-servers", help="Kafka bootstrap servers (default: $DEPOIS_BOOTSTRAP_SERVERS).")]
Topic = Annotated[Optional[str], typer.Option(
    "--topic", help="Topic to read (default: the quarantine topic). Point it at the dead-letter "
                    "topic to list or export undecodable records; they cannot be released.")]
Since = Annotated[Optional[str], typer.Option(
    "--since", help="Only records at or after this time: ISO-8601 (2026-11-25T10:00:00Z) or "
                    "epoch milliseconds.")]
Until = Annotated[Optional[str], typer.Option(
    "--until", help="Only records before this time (same formats as --since).")]
Offsets = Annotated[Optional[list[str]], typer.Option(
    "--offsets", help="Read only PARTITION:FIRST[-LAST] of the topic (LAST inclusive; "
                      "repeat per partition), e.g. --offsets 0:120-180.")]
Ids = Annotated[Optional[list[str]], typer.Option(
    "--id", "--ids", help="Sample ids (the message key); repeat or separate with commas.")]
Labels = Annotated[Optional[list[int]], typer.Option(
    "--label", help="Claimed class label; repeat for several.")]
MinScore = Annotated[Optional[float], typer.Option(
    "--min-score", help="Keep records scored at or above this at quarantine time.")]
MaxScore = Annotated[Optional[float], typer.Option(
    "--max-score", help="Keep records scored at or below this at quarantine time.")]
ModelVersions = Annotated[Optional[list[str]], typer.Option(
    "--model-version", help="Model version that quarantined the record; repeat for several.")]
Partitions = Annotated[Optional[list[int]], typer.Option(
    "--partition", help="Partition of the original ingest record; repeat for several.")]
Reasons = Annotated[Optional[list[str]], typer.Option(
    "--reason-code", help="Why the record is there: below_boundary for quarantine, or a "
                          "dead-letter error class such as malformed; repeat for several.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")]
MetricsFile = Annotated[Optional[Path], typer.Option(
    "--metrics-textfile", help="Also write depois_replay_outcomes_total in Prometheus text "
                               "format to this file (node-exporter textfile collector).")]


def _time_ms(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither ISO-8601 nor epoch ms",
                                 param_hint=flag) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1000)


def _settings(bootstrap: str | None) -> ReplaySettings:
    try:
        settings = ReplaySettings()
    except ValidationError as exc:
        _fail(f"invalid DEPOIS_* setting: {exc}")
    if bootstrap:
        settings = settings.model_copy(update={"bootstrap_servers": bootstrap})
    return settings


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _read_selected(settings: ReplaySettings, topic: str | None, since: str | None,
                   until: str | None, offsets: list[str] | None,
                   flt: ReplayFilter) -> tuple[int, list[QuarantinedRecord]]:
    try:
        window = ReadWindow(since_ms=_time_ms(since, "--since"),
                            until_ms=_time_ms(until, "--until"),
                            offsets=parse_offsets(offsets) if offsets else None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--offsets") from None
    try:
        records = read_quarantine(settings, window, topic)
    except ReplayError as exc:
        _fail(str(exc))
    return len(records), select(records, flt)


def _filter(ids: list[str] | None, labels: list[int] | None, min_score: float | None,
            max_score: float | None, model_versions: list[str] | None,
            partitions: list[int] | None, reasons: list[str] | None) -> ReplayFilter:
    def opt(values: list | None) -> frozenset | None:
        return frozenset(values) if values else None

    split_ids = [i for chunk in ids or [] for i in chunk.split(",") if i]
    return ReplayFilter(ids=opt(split_ids), labels=opt(labels), min_score=min_score,
                        max_score=max_score, model_versions=opt(model_versions),
                        source_partitions=opt(partitions), reasons=opt(reasons))


def _save_metrics(metrics: Metrics, path: Path | None) -> None:
    if path is not None:
        write_to_textfile(str(path), metrics.registry)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


@_command("list")
def list_(
    bootstrap: Bootstrap = None, topic: Topic = None, since: Since = None, until: Until = None,
    offsets: Offsets = None, ids: Ids = None, label: Labels = None, min_score: MinScore = None,
    max_score: MaxScore = None, model_version: ModelVersions = None,
    partition: Partitions = None, reason_code: Reasons = None,
    limit: Annotated[int, typer.Option(
        help="Print at most this many rows (the totals count all).")] = 50,
    as_json: AsJson = False, metrics_textfile: MetricsFile = None,
) -> None:
    """Print the selected quarantine records as a table, then totals by label, reason and model.

    Columns: sample id, claimed label, score and the boundary it was compared with, reason
    code, model version, the original ingest record (SOURCE partition:offset) and the
    quarantine record (AT partition:offset) with its time. Nothing is written anywhere.
    """
    settings = _settings(bootstrap)
    flt = _filter(ids, label, min_score, max_score, model_version, partition, reason_code)
    read, chosen = _read_selected(settings, topic, since, until, offsets, flt)
    metrics = Metrics()
    metrics.replay_outcomes.labels(action="list", outcome="listed").inc(len(chosen))
    _save_metrics(metrics, metrics_textfile)
    listing = summarize(read, chosen)
    if as_json:
        typer.echo(listing.model_dump_json(indent=2))
        return
    typer.echo(f"{'ID':<24} {'LABEL':>5} {'SCORE':>10} {'BOUNDARY':>10} {'REASON':<15} "
               f"{'MODEL':<18} {'SOURCE':>10} {'AT':>10}  TIME")
    for r in listing.records[:limit]:
        src = f"{r.source.partition}:{r.source.offset}" if r.source else "-"
        at = f"{r.quarantine.partition}:{r.quarantine.offset}"
        ms = r.quarantine.timestamp_ms
        when = (datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                if ms and ms > 0 else "-")
        typer.echo(f"{r.id[:24]:<24} {str(r.label):>5} {_fmt(r.score):>10} "
                   f"{_fmt(r.boundary):>10} {r.reason[:15]:<15} {str(r.model_version)[:18]:<18} "
                   f"{src:>10} {at:>10}  {when}")
    if listing.selected > limit:
        typer.echo(f"... {listing.selected - limit} more (raise --limit or use --json)")
    typer.echo(f"\nread {listing.read}, selected {listing.selected}")
    for name, counts in (("by label", listing.by_label), ("by reason", listing.by_reason),
                         ("by model version", listing.by_model_version)):
        typer.echo(f"{name}: {', '.join(f'{k}: {v}' for k, v in counts.items()) or '-'}")


@_command("export")
def export_(
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder to write (created); default ./replay-export-<UTC time>.")] = None,
    bootstrap: Bootstrap = None, topic: Topic = None, since: Since = None, until: Until = None,
    offsets: Offsets = None, ids: Ids = None, label: Labels = None, min_score: MinScore = None,
    max_score: MaxScore = None, model_version: ModelVersions = None,
    partition: Partitions = None, reason_code: Reasons = None,
    metrics_textfile: MetricsFile = None,
) -> None:
    """Write the selected records to a folder a reviewer can look through offline.

    manifest.jsonl has one line per record (id, label, score, boundary, model version,
    provenance, timestamp, and where its image is); samples.npz holds the decoded images
    (float32 [N,C,H,W] in [0,1]), labels, ids, scores and boundaries; contact_NNN.png show up
    to 100 images each, captioned with cell number, label and score. Records whose bytes do
    not decode stay in the manifest with decode_error set.
    """
    from depois_stream.audit.export import export

    settings = _settings(bootstrap)
    flt = _filter(ids, label, min_score, max_score, model_version, partition, reason_code)
    _, chosen = _read_selected(settings, topic, since, until, offsets, flt)
    folder = out or Path.cwd() / datetime.now(timezone.utc).strftime("replay-export-%Y%m%dT%H%M%SZ")
    metrics = Metrics()
    summary = export(chosen, folder, metrics=metrics)
    _save_metrics(metrics, metrics_textfile)
    typer.echo(f"exported {summary.records} records to {summary.folder}: {summary.decoded} "
               f"images in samples.npz and {len(summary.sheets)} contact sheet(s), "
               f"{summary.decode_failed} undecodable (see decode_error in manifest.jsonl)")


@_command("rescore")
def rescore_(
    model: Annotated[Path, typer.Option(
        "--model", help="ONNX model to try (its model card must sit beside it).")],
    histogram: Annotated[Path, typer.Option(
        help="Where to write the score histogram PNG.")] = Path("rescore-histogram.png"),
    device: Annotated[Literal["auto", "cuda", "cpu"], typer.Option(
        help="Where onnxruntime scores: auto (CUDA when offered), cuda or cpu.")] = "auto",
    bootstrap: Bootstrap = None, topic: Topic = None, since: Since = None, until: Until = None,
    offsets: Offsets = None, ids: Ids = None, label: Labels = None, min_score: MinScore = None,
    max_score: MaxScore = None, model_version: ModelVersions = None,
    partition: Partitions = None, reason_code: Reasons = None,
    as_json: AsJson = False, metrics_textfile: MetricsFile = None,
) -> None:
    """Dry-run the selected samples through another model and count how many would now pass.

    Nothing is published: this answers "would the new model have let these through?" before
    anyone deploys it or releases by hand. Prints the totals and a per-label table (selected /
    would pass) and writes a histogram of the new scores split by the new verdict.
    """
    from depois_stream.audit.export import rescore
    from depois_stream.filter.detector import ModelLoadError, Detector

    settings = _settings(bootstrap)
    flt = _filter(ids, label, min_score, max_score, model_version, partition, reason_code)
    _, chosen = _read_selected(settings, topic, since, until, offsets, flt)
    try:
        detector = Detector.load(model, device=device)
    except ModelLoadError as exc:
        _fail(str(exc))
    metrics = Metrics()
    report = rescore(chosen, detector, histogram, metrics=metrics)
    _save_metrics(metrics, metrics_textfile)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    typer.echo(f"model {report.model_version}: {report.would_pass} of {report.scored} scored "
               f"samples would pass ({report.decode_failed} of {report.selected} undecodable)")
    typer.echo(f"{'LABEL':>5} {'SELECTED':>9} {'PASS':>6}")
    for lab, c in report.by_label.items():
        typer.echo(f"{lab:>5} {c.selected:>9} {c.would_pass:>6}")
    typer.echo(f"histogram: {report.histogram}")


@_command("release")
def release_(
    operator: Annotated[Optional[str], typer.Option(
        help="Who approves the release (goes into headers and the audit topic). Required.")] = None,
    reason: Annotated[Optional[str], typer.Option(
        help="Why the samples are safe, e.g. a ticket reference. Required.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be released and skipped; publish nothing.")] = False,
    bootstrap: Bootstrap = None, topic: Topic = None, since: Since = None, until: Until = None,
    offsets: Offsets = None, ids: Ids = None, label: Labels = None, min_score: MinScore = None,
    max_score: MaxScore = None, model_version: ModelVersions = None,
    partition: Partitions = None, reason_code: Reasons = None,
    as_json: AsJson = False, metrics_textfile: MetricsFile = None,
) -> None:
    """Publish the selected samples to the clean topic, with an audit record for each.

    Needs --operator, --reason and a selection (--id or at least one filter option); it
    refuses with exit code 2 otherwise. Each released copy keeps the original value, key and
    headers (score, model, provenance) and adds depois.verdict=released,
    depois.replay_count, depois.released.by/.at/.reason. Skipped, and reported: ids already
    released (found on the audit topic; a second run publishes nothing), records released
    before (replay_count >= 1), records that are not quarantine verdicts, and repeated ids.
    """
    try:
        operator, reason = require_operator_and_reason(operator, reason)
    except ReplayError as exc:
        _fail(str(exc), code=2)
    flt = _filter(ids, label, min_score, max_score, model_version, partition, reason_code)
    if flt.selects_everything:
        _fail("release needs a selection: name samples with --id or narrow with a filter option "
              "(--label, --min-score, --max-score, --model-version, --partition, --reason-code); "
              "run `replay list` with the same options first to see what it selects", code=2)
    settings = _settings(bootstrap)
    _, chosen = _read_selected(settings, topic, since, until, offsets, flt)
    metrics = Metrics()
    try:
        report = release(settings, chosen, operator, reason, dry_run=dry_run, metrics=metrics)
    except ReplayError as exc:
        _fail(str(exc))
    _save_metrics(metrics, metrics_textfile)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    verb = "would release" if dry_run else "released"
    typer.echo(f"{verb} {len(report.released)} sample(s) to {settings.clean_topic}"
               + ("" if dry_run else f", audit records on {settings.audit_topic}"))
    for sid in report.released:
        typer.echo(f"  {sid}")
    for why, skipped in report.skipped.items():
        typer.echo(f"skipped {len(skipped)} ({why}): {', '.join(skipped[:20])}"
                   + (" ..." if len(skipped) > 20 else ""))
    if report.unreadable_audit_records:
        typer.echo(f"warning: {report.unreadable_audit_records} unreadable record(s) on "
                   f"{settings.audit_topic} were ignored", err=True)
