"""depois-stream side by side with what a user would run instead, in one run, on one broker.

Every filter reads the same backlog (the data set's test split tiled to --records records, 10 %
of the labels randomly flipped, the binary wire format) from the same local Tansu broker, scores
it with the same ONNX model and writes the same headers; each trial runs in its own
process with a fresh consumer group and fresh output topics, so its CPU time and peak RSS are
its own. Rounds are interleaved (every filter once per round, the order rotated), the table
shows the median of the rounds, and the ratios are taken within this one run.

Filters: raw consume (no processing) with kafka-python and with confluent-kafka; depois-stream
(`StreamFilter`) with each client; a minimal confluent-kafka loop and a Quix Streams app doing
the same decode, score, routing and headers (benchmarks/peers/). Rates start at the first
acknowledged batch (the group join is not the filter's speed). Then p50/p99 end-to-end latency
(record CreateTime -> read back from the output topic) at a fixed offered load.

Quix Streams pins confluent-kafka < 2.13 and depois-stream needs 2.16 or later, so the Quix app
runs under its own interpreter: --quix-python (default .venv-quix/bin/python, which `make bench`
builds with `pip install -e '.[peers]'`), as a user who installs Quix gets it.

\b
    python benchmarks/bench_peers.py --model runs/digits/model.onnx --dataset digits
    python benchmarks/bench_peers.py --model runs/fashion/model.onnx --dataset fashion-mnist \\
        --records 20000 --out docs/perf-run.md
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_rate, markdown_table, write_report  # noqa: E402

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)

KINDS = ("scorer-only", "raw-kafka-python", "raw-confluent", "depois-kafka-python",
         "depois-confluent", "peer-confluent-loop", "peer-quix")
LABELS = {
    "scorer-only": "scorer alone (the filter's Detector on decoded batches of 512, no Kafka)",
    "raw-kafka-python": "raw consume, kafka-python (no processing)",
    "raw-confluent": "raw consume, confluent-kafka (no processing)",
    "depois-kafka-python": "**depois-stream run --client kafka-python**",
    "depois-confluent": "**depois-stream run --client confluent-kafka**",
    "peer-confluent-loop": "minimal confluent-kafka loop (consume 512, score, produce, flush, commit)",
    "peer-quix": "Quix Streams app (one record at a time)",
}
FILTERS = [k for k in KINDS if k.startswith(("depois", "peer"))]
POISON_RATE = 0.1


@dataclass
class Trial:
    records: int
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_seconds / self.records if self.records else float("nan")


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _outputs(bootstrap: str, tag: str) -> tuple[str, str, str]:
    from depois_stream.sim.broker import create_topics

    outs = (f"clean-{tag}", f"quarantine-{tag}", f"dlq-{tag}")
    create_topics(bootstrap, list(outs))
    return outs


def run_filter(kind: str, bootstrap: str, ingest: str, model: str, dataset: str,
               n: int) -> Trial:
    """One trial in this (fresh) process: filter ``n`` records, report rate, CPU, RSS, counts."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    tag = uuid.uuid4().hex[:8]
    group = f"bench-{kind}-{tag}"
    marks: list[tuple[float, int, float]] = []

    def progress(done: int) -> None:
        if not marks or marks[-1][1] != done:
            marks.append((time.perf_counter(), done, time.process_time()))

    counts: dict[str, int] = {}
    if kind == "scorer-only":
        _scorer_only(model, dataset, n, progress)
    elif kind.startswith("raw"):
        _raw_consume(kind, bootstrap, ingest, group, n, progress)
    elif kind.startswith("depois"):
        counts = _depois(_client(kind), bootstrap, ingest, _outputs(bootstrap, tag),
                         group, model, n, progress)
    else:
        counts = _peer(kind).run(bootstrap, ingest, _outputs(bootstrap, tag), group, model, n, progress)
    (t0, n0, c0), (t1, n1, c1) = marks[0], marks[-1]
    return Trial(n1 - n0, t1 - t0, c1 - c0, _peak_rss_mib(), counts)


def _peer(kind: str):
    """The peer's module, imported alone: quixstreams exists only in the Quix environment."""
    import importlib

    return importlib.import_module("peers.confluent_loop" if kind == "peer-confluent-loop"
                                   else "peers.quix_app")


def _client(kind: str) -> str:
    return "confluent-kafka" if kind.endswith("confluent") else "kafka-python"


def _raw_consume(kind: str, bootstrap: str, topic: str, group: str, n: int, progress) -> None:
    done = 0
    if kind == "raw-kafka-python":
        from kafka import KafkaConsumer

        c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                          auto_offset_reset="earliest", enable_auto_commit=False,
                          max_poll_records=512)
        while done < n:
            done += sum(len(rs) for rs in c.poll(timeout_ms=1000).values())
            if done:
                progress(done)
        c.close(autocommit=False)
        return
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    while done < n:
        done += len(c.consume(512, 1.0))
        if done:
            progress(done)
    c.close()


def _depois(client: str, bootstrap: str, ingest: str, outs: tuple[str, str, str], group: str,
            model: str, n: int, progress) -> dict[str, int]:
    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.config import ConsumerConfig

    cfg = ConsumerConfig(
        bootstrap_servers=bootstrap, model_path=model, client=client, ingest_topic=ingest,
        clean_topic=outs[0], quarantine_topic=outs[1], dlq_topic=outs[2], group_id=group,
        device="cpu", metrics_port=None, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    flt = StreamFilter(cfg)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            done = flt.stats.consumed
            if done:
                progress(done)
            if done >= n:
                stop.set()
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    flt.run(stop)
    return {"clean": flt.stats.clean, "quarantine": flt.stats.quarantined,
            "dlq": flt.stats.dead_lettered}


CHILD_FLAG = "--as-child"  # argv[1] of this script run as one trial's process
QUIX_PYTHON = Path(__file__).resolve().parents[1] / ".venv-quix" / "bin" / "python"


def _child_command(kind: str, quix_python: Path, what: str, *args: object) -> list[str]:
    """``run_filter`` (``what`` = "trial") or ``_latency_filter`` ("latency") as a fresh
    process, so that its CPU time and peak RSS are its own. The Quix peer runs under its own
    environment's interpreter (a multiprocessing child would inherit this sys.path)."""
    python = quix_python if kind == "peer-quix" else Path(sys.executable)
    return [str(python), str(Path(__file__).resolve()), CHILD_FLAG, what, kind, *map(str, args)]


def _trial(quix_python: Path, kind: str, *args: object) -> Trial:
    import json

    done = subprocess.run(_child_command(kind, quix_python, "trial", *args), check=True,
                          stdout=subprocess.PIPE, text=True)
    return Trial(**json.loads(done.stdout.strip().splitlines()[-1]))


def _environment_of(python: Path) -> str:
    """The Quix environment's versions, for the report (they differ from this process's)."""
    code = ("import importlib.metadata as m; print(', '.join(f'{p} ' + m.version(p) for p in "
            "('quixstreams', 'confluent-kafka')))")
    return subprocess.run([str(python), "-c", code], check=True, stdout=subprocess.PIPE,
                          text=True).stdout.strip()


def _child_main(argv: list[str]) -> None:
    import dataclasses
    import json

    what, kind, bootstrap, ingest, model, dataset, n, *rest = argv
    if what == "trial":
        t = run_filter(kind, bootstrap, ingest, model, dataset, int(n))
        print(json.dumps(dataclasses.asdict(t)), flush=True)
    else:
        _latency_filter(kind, bootstrap, ingest, model, int(n), rest[0])


def publish_backlog(bootstrap: str, topic: str, dataset: str, n: int, rate: float = 0.0) -> None:
    """``n`` records of the test split (10 % flipped labels); ``rate`` > 0 paces them."""
    from confluent_kafka import Producer

    from depois_stream.sim import producer as P

    data = P.load_samples(dataset, "test")
    idx = np.arange(n) % len(data.labels)
    tiled = P.SampleSet(data.images[idx], data.labels[idx], data.name, data.num_classes)
    stream = P.poison(tiled, P.attack_by_name("random-flip", data.num_classes), POISON_RATE, 0)
    records, _ = P.build_records(tiled, stream, encoding="binary")
    prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5 if rate == 0 else 0})
    start = time.perf_counter()
    for k, r in enumerate(records):
        if rate:
            wait = start + k / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        while True:
            try:
                prod.produce(topic, key=r.key.encode(), value=r.value,
                             headers=[("content-type", r.content_type.encode())])
                break
            except BufferError:
                prod.poll(0.05)
        prod.poll(0)
    prod.flush(60)


def _scorer_only(model: str, dataset: str, n: int, progress, batch: int = 512) -> None:
    """The ceiling of any pipeline: the filter's own ``Detector`` (same session options, same
    threads) scoring ``n`` already-decoded samples in batches of ``batch``, no Kafka at all.
    Its CPU time per sample, set against a filter's CPU per record, is the filter's overhead."""
    from depois_stream.filter.detector import Detector
    from depois_stream.sim.producer import load_samples

    det = Detector.load(model, device="cpu")
    data = load_samples(dataset, "test")
    idx = np.arange(batch) % len(data.labels)
    x, y = data.images[idx], data.labels[idx]
    for _ in range(3):  # warm-up, as the filters' rates start at their first batch
        det.run(x, y)
    done = 0
    progress(done)
    while done < n:
        det.run(x, y)
        done += batch
        progress(done)


def latency(kind: str, bootstrap: str, model: str, dataset: str, rate: float,
            seconds: float, quix_python: Path = QUIX_PYTHON) -> tuple[float, float, int]:
    """p50, p99 (s) and samples: a filter of ``kind`` at ``rate`` records/s offered."""
    from confluent_kafka import Consumer, TopicPartition

    from depois_stream.sim.broker import create_topics

    tag = uuid.uuid4().hex[:8]
    ingest = f"lat-{tag}"
    create_topics(bootstrap, [ingest])
    n = int(rate * seconds)
    child = subprocess.Popen(_child_command(kind, quix_python, "latency", bootstrap, ingest,
                                            model, dataset, n + 1, tag))
    outs = [f"clean-{tag}", f"quarantine-{tag}", f"dlq-{tag}"]
    create_topics(bootstrap, outs)
    # The reader is assigned the output partitions directly: a group join (seconds on Tansu)
    # would count as latency.
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{tag}",
                       "fetch.wait.max.ms": 10})
    reader.assign([TopicPartition(t, 0, 0) for t in outs])
    lat: list[float] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for m in reader.consume(500, 0.1):
                if m.error() is None:
                    ts = dict(m.headers() or []).get("depois.source.timestamp_ms")
                    if ts:
                        lat.append(time.time() - int(ts) / 1000)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    publish_backlog(bootstrap, ingest, dataset, 1)  # one round trip: the filter has joined
    deadline = time.monotonic() + 90
    while not lat and time.monotonic() < deadline:
        time.sleep(0.05)
    lat.clear()
    publish_backlog(bootstrap, ingest, dataset, n, rate=rate)
    deadline = time.monotonic() + 60
    while len(lat) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    t.join()
    reader.close()
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    warm = np.array(lat[int(0.1 * len(lat)):])  # the first seconds include fetch warm-up
    return float(np.percentile(warm, 50)), float(np.percentile(warm, 99)), len(lat)


def _latency_filter(kind: str, bootstrap: str, ingest: str, model: str, n: int, tag: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    outs = (f"clean-{tag}", f"quarantine-{tag}", f"dlq-{tag}")
    group = f"lat-{kind}-{tag}"
    if kind.startswith("depois"):
        _depois(_client(kind), bootstrap, ingest, outs, group, model, n, lambda d: None)
    else:
        _peer(kind).run(bootstrap, ingest, outs, group, model, n, lambda d: None)


def _overhead_notes(rate: dict[str, float], cpu: dict[str, float]) -> list[str]:
    """How close each depois-stream run comes to the scorer alone, by CPU and by wall clock.

    By CPU (scorer CPU per sample / filter CPU per record) is the filter's own overhead: decode,
    route, the Kafka client. By wall clock it also carries the broker and the backlog, which on
    a small machine share the cores that the scorer-only run has to itself."""
    if "scorer-only" not in rate:
        return []
    notes = [f"- scorer alone at batch 512: {rate['scorer-only']:,.0f} samples/s, "
             f"{cpu['scorer-only']:.1f} CPU us/sample"]
    for k in (k for k in rate if k.startswith("depois")):
        notes.append(f"- {k}: {cpu['scorer-only'] / cpu[k]:.2f}x the scorer alone by CPU "
                     f"(filter overhead {cpu[k] - cpu['scorer-only']:.1f} us/record), "
                     f"{rate[k] / rate['scorer-only']:.2f}x by wall clock")
    return notes


@app.command()
def main(
    model: Path = typer.Option(..., exists=True, help="ONNX model (with its card beside it)."),
    dataset: str = typer.Option("digits", help="Data set whose test split is the backlog."),
    records: int = typer.Option(30000, help="Backlog size."),
    rounds: int = typer.Option(3, help="Interleaved rounds (median shown)."),
    kinds: str = typer.Option(",".join(KINDS), help="Comma-separated subset of the filters."),
    latency_rate: float = typer.Option(1000.0, help="Offered records/s for the latency test."),
    latency_seconds: float = typer.Option(20.0, help="How long the latency load lasts."),
    skip_latency: bool = typer.Option(False, help="Only the throughput table."),
    out: Path | None = typer.Option(None, help="Append the markdown report to this file."),
    quix_python: Path = typer.Option(QUIX_PYTHON, help=(
        "Interpreter of an environment with quixstreams installed (`pip install -e "
        "'.[peers]'`), for the Quix peer; if it is missing, peer-quix is left out.")),
) -> None:
    """Throughput (median of interleaved rounds), CPU per record, peak RSS, verdict check;
    then latency at a fixed offered load."""
    from depois_stream.sim.broker import LocalBroker, create_topics

    chosen = [k for k in kinds.split(",") if k]
    quix_env = ""
    if "peer-quix" in chosen:
        if quix_python.exists():
            quix_env = _environment_of(quix_python)
        else:
            print(f"peer-quix left out: {quix_python} does not exist (make bench builds it)")
            chosen.remove("peer-quix")
    if not chosen:
        raise typer.BadParameter("no filter left to run", param_hint="--kinds")
    trials: dict[str, list[Trial]] = {k: [] for k in chosen}
    with LocalBroker() as broker:
        ingest = f"backlog-{uuid.uuid4().hex[:6]}"
        create_topics(broker.bootstrap, [ingest], partitions=2)
        publish_backlog(broker.bootstrap, ingest, dataset, records)
        for r in range(rounds):
            order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
            for kind in order:
                t = _trial(quix_python, kind, broker.bootstrap, ingest, str(model), dataset,
                           records)
                trials[kind].append(t)
                print(f"round {r + 1} {kind}: {t.rate:,.0f} rec/s, {t.cpu_us:.1f} us/rec, "
                      f"{t.peak_rss_mib:.0f} MiB, {t.counts}", flush=True)
        lat = {}
        if not skip_latency:
            for kind in [k for k in chosen if k in FILTERS]:
                lat[kind] = latency(kind, broker.bootstrap, str(model), dataset, latency_rate,
                                    latency_seconds, quix_python)
                print(f"latency {kind}: p50 {lat[kind][0] * 1e3:.0f} ms, "
                      f"p99 {lat[kind][1] * 1e3:.0f} ms", flush=True)
    med = {k: statistics.median(t.rate for t in v) for k, v in trials.items()}
    cpu = {k: statistics.median(t.cpu_us for t in v) for k, v in trials.items()}
    rss = {k: max(t.peak_rss_mib for t in v) for k, v in trials.items()}
    verdicts = {k: v[0].counts for k, v in trials.items() if v[0].counts}
    same = len({tuple(sorted(c.items())) for c in verdicts.values()}) <= 1
    ref = {"vs confluent loop": med.get("peer-confluent-loop"), "vs Quix": med.get("peer-quix")}
    rows = []
    for k in chosen:
        rows.append([LABELS[k], fmt_rate(med[k]), " / ".join(fmt_rate(t.rate) for t in trials[k]),
                     f"{cpu[k]:.1f}", f"{rss[k]:.0f}",
                     *(f"{med[k] / v:.2f}x" if v and k in FILTERS else "-"
                       for v in ref.values())])
    table = markdown_table(["filter", "records/s (median)", "rounds", "CPU us/record",
                            "peak RSS MiB", *ref], rows)
    notes = [f"- backlog: {records:,} records of {dataset} (test split tiled, {POISON_RATE:.0%} "
             f"labels flipped), 2 partitions; {rounds} interleaved rounds",
             *([f"- the Quix Streams app ran under {quix_python}: {quix_env}"] if quix_env else []),
             f"- verdicts identical across filters: {same} ({verdicts})",
             *_overhead_notes(med, cpu)]
    if lat:
        notes.append(f"- latency at {latency_rate:,.0f} records/s offered for "
                     f"{latency_seconds:.0f} s (after 10 % warm-up): " + "; ".join(
                         f"{LABELS[k].strip('*')} p50 {v[0] * 1e3:.0f} ms / p99 {v[1] * 1e3:.0f} ms"
                         for k, v in lat.items()))
    write_report(out, f"Side by side on {dataset}", table + "\n\n" + "\n".join(notes))


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD_FLAG]:
        _child_main(sys.argv[2:])
    else:
        app()
