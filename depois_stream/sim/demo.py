"""`python -m depois_stream.sim.demo` (what `make demo` runs): the whole product on the bundled digits.

Train a small De-Pois model, start a local broker, publish a poisoned digits test split with a
few invalid records, filter it until the stream is drained, then score the filter against the
producer's ground truth. Training runs as a `depois-train` subprocess so this process never
imports torch, exactly like a deployment where the model arrives as a file.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import onnxruntime
import typer
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from depois_stream.contract import headers as H
from depois_stream.filter.config import ConsumerConfig
from depois_stream.contract.headers import as_dict
from depois_stream.sim.cli import AttackChoice, EncodingChoice

app = typer.Typer(add_completion=False, help=__doc__)


class QuarantineRow(BaseModel):
    """One quarantined record as its headers describe it, plus the producer's ground truth."""

    sample_id: str
    label: str
    score: str
    boundary: str
    source_offset: str
    model_version: str
    truly_poisoned: bool


# The command the demo's last line names to see every quarantined record: `replay list` alone
# prints its first 50 rows.
REPLAY_LIST_ALL = "depois-stream replay list --limit 0"

# Series worth showing after a run; histograms and per-partition gauges stay on /metrics.
EXCERPT_PREFIXES = ("depois_records_consumed_total", "depois_records_routed_total",
                    "depois_dead_lettered_total", "depois_quarantined_by_label_total",
                    "depois_poison_rate", "depois_commits_total", "depois_detection_boundary")


def metrics_excerpt(registry: CollectorRegistry) -> list[str]:
    """Non-zero samples of the headline series (zero-valued label sets are noise in a demo)."""
    from prometheus_client import generate_latest

    lines = []
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(EXCERPT_PREFIXES) and not line.endswith(" 0.0"):
            lines.append(line)
    return lines


class DemoResult(BaseModel):
    """What the demo prints, also returned so tests can check it."""

    published: int
    poisoned: int
    malformed: int
    consumed: int
    clean: int
    quarantined: int
    dead_lettered: int
    dlq_reasons: dict[str, int]
    dlq_as_expected: bool  # every malformed record dead-lettered with the reason the producer meant
    precision: float  # quarantined samples that were poisoned
    recall: float  # poisoned samples that were quarantined
    false_positive_rate: float  # clean samples that were quarantined
    breaker_trips: int
    metrics_url: str | None
    quarantine_rows: list[QuarantineRow] = []  # the first few, as an operator would see them
    metrics_excerpt: list[str] = []  # the consumer's own counters, in Prometheus text format


def train_model(out_dir: Path, dataset: str = "digits", seed: int = 0) -> Path:
    """Run `depois-train all` and return the ONNX file it exported."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "training", "all", "--dataset", dataset, "--seed", str(seed),
           "--out", str(out_dir)]
    typer.echo(f"training: {' '.join(cmd[2:])}")
    code = subprocess.run(cmd).returncode
    if code != 0:
        typer.echo(f"depois-train exited with code {code}; the demo needs its model (is the "
                   "train extra installed? `pip install -e '.[train]'`)", err=True)
        raise typer.Exit(1)
    models = sorted(out_dir.rglob("*.onnx"), key=lambda p: p.stat().st_mtime)
    if not models:
        typer.echo(f"depois-train finished but wrote no .onnx file under {out_dir}", err=True)
        raise typer.Exit(1)
    return models[-1]


def read_records(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Every record of ``topic`` from its start, waiting until ``expected`` have arrived."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def run_demo(cfg: ConsumerConfig, *, attack: str = "random-flip", rate: float = 0.2,
             malformed: int = 6, encoding: str = "binary", seed: int = 0,
             manifest_path: Path | None = None) -> DemoResult:
    """Publish a poisoned digits test split to ``cfg.ingest_topic``, filter it, score the result.

    The broker named by ``cfg.bootstrap_servers`` must be running; the output topics are read
    back from the broker rather than taken from the consumer's counters, so the numbers are
    what a downstream reader would actually see.
    """
    from depois_stream.sim.broker import create_topics
    from depois_stream.filter.app import StreamFilter
    from depois_stream.sim.producer import attack_by_name, load_samples, produce

    create_topics(cfg.bootstrap_servers, [cfg.ingest_topic, cfg.clean_topic, cfg.quarantine_topic,
                                          cfg.dlq_topic])
    data = load_samples("digits", "test")
    chosen = None if attack == "none" else attack_by_name(attack, data.num_classes)
    manifest = produce(cfg.bootstrap_servers, cfg.ingest_topic, data, attack=chosen, rate=rate,
                       seed=seed, encoding=encoding, malformed=malformed)
    if manifest_path is not None:
        manifest.write(manifest_path)
    flt = StreamFilter(cfg)
    stats = flt.run()
    metrics_url = "http://{}:{}/metrics".format(*flt.http_address) if flt.http_address else None

    q_records = read_records(cfg.bootstrap_servers, cfg.quarantine_topic, stats.quarantined)
    quarantined = {r.key.decode() for r in q_records}
    dead = read_records(cfg.bootstrap_servers, cfg.dlq_topic, stats.dead_lettered)
    clean = read_records(cfg.bootstrap_servers, cfg.clean_topic, stats.clean)
    dlq_reasons = {r.key.decode(): as_dict(r.headers).get(H.ERROR_CLASS, "") for r in dead}
    poisoned = set(manifest.poisoned_ids)
    honest = manifest.samples - len(poisoned)
    rows = []
    for r in q_records[:8]:
        h = as_dict(r.headers)
        rows.append(QuarantineRow(
            sample_id=r.key.decode(), label=h.get(H.LABEL, "?"), score=h.get(H.SCORE, "?"),
            boundary=h.get(H.BOUNDARY, "?"), source_offset=h.get(H.SOURCE_OFFSET, "?"),
            model_version=h.get(H.MODEL_VERSION, "?"), truly_poisoned=r.key.decode() in poisoned))
    return DemoResult(
        published=manifest.sent, poisoned=len(poisoned), malformed=len(manifest.malformed),
        consumed=stats.consumed, clean=len(clean), quarantined=len(quarantined),
        dead_lettered=len(dead), dlq_reasons=dict(Counter(dlq_reasons.values())),
        dlq_as_expected=dlq_reasons == manifest.malformed,
        precision=_ratio(len(quarantined & poisoned), len(quarantined)),
        recall=_ratio(len(quarantined & poisoned), len(poisoned)),
        false_positive_rate=_ratio(len(quarantined - poisoned), honest),
        breaker_trips=stats.breaker_trips, metrics_url=metrics_url,
        quarantine_rows=rows, metrics_excerpt=metrics_excerpt(flt.metrics.registry),
    )


def _short(number: str) -> str:
    try:
        return f"{float(number):.3f}"
    except ValueError:
        return number


def render(result: DemoResult, cfg: ConsumerConfig, attack: str, rate: float) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.dlq_reasons.items())) or "none"
    lines = [
        f"published      {result.published} records to {cfg.ingest_topic}: {result.poisoned} "
        f"poisoned ({attack}, {rate:.0%}), {result.malformed} malformed",
        f"consumed       {result.consumed}",
        f"clean          {result.clean:5d}  -> {cfg.clean_topic}",
        f"quarantined    {result.quarantined:5d}  -> {cfg.quarantine_topic}",
        f"dead-lettered  {result.dead_lettered:5d}  -> {cfg.dlq_topic} ({reasons})",
        f"precision      {result.precision:.3f}  (quarantined samples that were poisoned)",
        f"recall         {result.recall:.3f}  (poisoned samples that were quarantined)",
        f"false alarms   {result.false_positive_rate:.3f}  (honest samples that were quarantined)",
        f"metrics        served at {result.metrics_url or '(disabled)'} while the consumer ran",
    ]
    if result.quarantine_rows:
        lines += ["", f"first quarantined records (headers of {cfg.quarantine_topic}; "
                  "'poisoned' is the producer's ground truth):",
                  f"  {'id':<18} {'label':>5} {'score':>9} {'boundary':>9} {'offset':>6}  poisoned"]
        for row in result.quarantine_rows:
            lines.append(f"  {row.sample_id:<18} {row.label:>5} {_short(row.score):>9} "
                         f"{_short(row.boundary):>9} {row.source_offset:>6}  "
                         f"{'yes' if row.truly_poisoned else 'NO (false alarm)'}")
        # The demo's broker is in memory and stops with it: point at a broker that stays up.
        lines.append(f"  model version {result.quarantine_rows[0].model_version}; the demo's "
                     "broker stopped with it: against one that stays up (README, \"Using it\") "
                     f"`{REPLAY_LIST_ALL}` shows them all")
    if result.metrics_excerpt:
        lines += ["", "consumer metrics (non-zero counters at exit):"]
        lines += [f"  {line}" for line in result.metrics_excerpt]
    if not result.dlq_as_expected:
        lines.append("WARNING: the dead-letter topic does not match the malformed records sent")
    if result.breaker_trips:
        lines.append(f"WARNING: the circuit breaker tripped {result.breaker_trips} time(s): the "
                     "model quarantined more than the limit allows, so part of the stream was "
                     "left unconsumed (see docs/consumer.md)")
    return "\n".join(lines)


@app.command()
def main(
    out: Path = typer.Option(Path("artifacts/demo"), help="Where the model, the ground-truth manifest and the broker log go."),
    model: Optional[Path] = typer.Option(
        None, help="Use this exported ONNX model (its model.card.json beside it) instead of training."),
    attack: AttackChoice = typer.Option(AttackChoice.random_flip, help="Attack applied to the published stream."),
    rate: float = typer.Option(0.2, min=0.0, max=1.0, help="Fraction of samples poisoned."),
    malformed: int = typer.Option(6, min=0, help="Invalid records mixed in (must be dead-lettered)."),
    encoding: EncodingChoice = typer.Option(EncodingChoice.binary, help="Wire encoding of the published records."),
    metrics_port: int = typer.Option(0, help="Port of the consumer's /metrics endpoint (0 = a free one)."),
    seed: int = typer.Option(0, help="Seed of training and of the attack."),
    verbose: bool = typer.Option(False, help="Show the consumer's log."),
) -> None:
    """Train, publish a poisoned stream, filter it, and print how well the poisons were caught."""
    from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS, LocalBroker

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    # onnxruntime-gpu prints a CUDA-library error on CPU-only machines before falling back; the
    # scorer already logs which provider it really uses, so the C++ noise only confuses a demo.
    onnxruntime.set_default_logger_severity(4)
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    model_path = model or train_model(out, seed=seed)
    with LocalBroker(log_path=out / "tansu.log") as broker:
        typer.echo(f"model          {model_path}")
        typer.echo(f"broker         {broker.bootstrap} (Tansu, in memory)")
        cfg = ConsumerConfig(
            bootstrap_servers=broker.bootstrap, model_path=model_path, metrics_port=metrics_port,
            session_timeout_ms=TEST_SESSION_TIMEOUT_MS, heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS,
            exit_when_idle_s=3.0)
        result = run_demo(cfg, attack=attack.value, rate=rate, malformed=malformed,
                          encoding=encoding.value, seed=seed, manifest_path=out / "manifest.json")
    typer.echo(render(result, cfg, attack.value, rate))
    typer.echo(f"ground truth   {out / 'manifest.json'}")
    typer.echo(f"took           {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    app()
