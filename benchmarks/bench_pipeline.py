"""Pipeline throughput vs the raw consume rate of the same client, latency, peak memory.

The question a user asks is "does the filter slow my stream down?", so the baseline is the same
kafka-python consumer, with the same settings, on the same broker and backlog, doing nothing with
the records. A second baseline forwards every record with as many headers as the router adds
(produce with acks=all, flush, commit) but neither decodes nor scores: the ceiling of the client
library for any filter that must re-publish its input. The pipeline is the real ``StreamFilter``
(decode, score, route, produce with acks=all, commit). Each trial runs in its own process (fresh group, fresh output topics) so peak
RSS is that trial's alone. Rates exclude the first batch, which also carries the group join.

Latency is measured at a fixed offered load well below saturation: a paced producer stamps each
record (Kafka CreateTime), a downstream reader of the output topics records when it received it.

\b
    python benchmarks/bench_pipeline.py --model runs/digits/model.onnx --records 100000
    python benchmarks/bench_pipeline.py --dataset digits        # fits a quick model first
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from _common import fmt_rate, load_or_fit, markdown_table, write_report

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)

POISON_RATE = 0.1  # a realistic share of quarantined records, far below the breaker's limit
KAFKA_DEFAULT_FETCH_WAIT_MS = 500
FORWARD_HEADERS = 11  # what the router adds to a scored record (verdict, score, ..., source.*)


@dataclass(frozen=True)
class Trial:
    """What one consuming process measured."""

    records: int
    seconds: float
    cpu_seconds: float  # CPU time of the whole consuming process (all its threads) meanwhile
    peak_rss_mib: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_us_per_record(self) -> float:
        """Contention-proof cost: what one record costs this process, whatever else runs."""
        return 1e6 * self.cpu_seconds / self.records if self.records else float("nan")


def _peak_rss_mib() -> float:
    """This process's own high-water RSS. Not ``getrusage``: Linux carries ``ru_maxrss`` over
    fork + exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _client_settings(batch_size: int) -> dict:
    from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS

    return dict(enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=batch_size,
                session_timeout_ms=TEST_SESSION_TIMEOUT_MS, heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS)


def raw_trial(bootstrap: str, topic: str, n: int, batch_size: int) -> Trial:
    """Consume ``n`` records and touch each value, nothing else (the ceiling for the filter)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:8]}",
                             **_client_settings(batch_size))
    count, first, nbytes = 0, None, 0
    while count < n:
        polled = consumer.poll(timeout_ms=200, max_records=batch_size)
        for records in polled.values():
            count += len(records)
            nbytes += sum(len(r.value) for r in records)
        if first is None and count:
            first = (time.perf_counter(), count, time.process_time())
    end, cpu_end = time.perf_counter(), time.process_time()
    consumer.close(autocommit=False)
    return Trial(count - first[1], end - first[0], cpu_end - first[2], _peak_rss_mib())


def forward_trial(bootstrap: str, topic: str, n: int, batch_size: int, header_count: int,
                  client: str = "kafka-python") -> Trial:
    """Consume, produce every record unchanged plus ``header_count`` headers (acks=all,
    idempotent), flush, commit: the filter's delivery work without decode, score or routing.

    With the kafka-python producer this is the ceiling of the filter's own client library; with
    ``client="confluent-kafka"`` (librdkafka, C) it shows what swapping the producer would buy."""
    from kafka import KafkaConsumer
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from depois_stream.sim.broker import create_topics

    tag = uuid.uuid4().hex[:8]
    out_topic = f"fwd-{tag}"
    create_topics(bootstrap, [out_topic])  # one partition; records keep theirs modulo 1, as the filter does
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"fwd-{tag}",
                             **_client_settings(batch_size))
    send, flush, close = _producer(client, bootstrap)
    headers = [(f"depois.bench.{i}", b"0.123456789") for i in range(header_count)]
    count, first = 0, None
    while count < n:
        polled = consumer.poll(timeout_ms=200, max_records=batch_size)
        offsets = {}
        for tp, records in polled.items():
            for r in records:
                send(out_topic, r.value, r.key, list(r.headers) + headers, 0)
            offsets[TopicPartition(tp.topic, tp.partition)] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
            count += len(records)
        if offsets:
            flush()
            consumer.commit(offsets)
        if first is None and count:
            first = (time.perf_counter(), count, time.process_time())
    end, cpu_end = time.perf_counter(), time.process_time()
    close()
    consumer.close(autocommit=False)
    return Trial(count - first[1], end - first[0], cpu_end - first[2], _peak_rss_mib())


def _producer(client: str, bootstrap: str):
    """(send, flush, close) of an idempotent acks=all producer of the named client library, with
    the filter's own producer settings (explicit partition, large linger: flush() sends)."""
    if client == "confluent-kafka":
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                      "linger.ms": 5})
        return (lambda t, v, k, h, part: p.produce(t, value=v, key=k, headers=h, partition=part)), p.flush, p.flush
    from kafka import KafkaProducer

    kp = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                       linger_ms=1000, batch_size=1 << 20)
    return (lambda t, v, k, h, part: kp.send(t, value=v, key=k, headers=h, partition=part)), kp.flush, kp.close


def _confluent_available() -> bool:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return False
    return True


def pipeline_trial(bootstrap: str, topic: str, n: int, batch_size: int, model: Path,
                   linger_ms: int) -> Trial:
    """Run the real StreamFilter until it has routed ``n`` records; time after its first batch."""
    from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS
    from depois_stream.filter.config import ConsumerConfig
    from depois_stream.filter.app import StreamFilter

    tag = uuid.uuid4().hex[:8]
    cfg = ConsumerConfig(
        bootstrap_servers=bootstrap, model_path=model, ingest_topic=topic, group_id=f"pipe-{tag}",
        clean_topic=f"clean-{tag}", quarantine_topic=f"quarantine-{tag}", dlq_topic=f"dlq-{tag}",
        batch_size=batch_size, linger_ms=linger_ms, device="cpu", metrics_port=None,
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS, heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS,
        exit_when_idle_s=30.0,
    )
    filt = StreamFilter(cfg)
    stop = threading.Event()
    marks: list[tuple[float, int, float]] = []

    def watch() -> None:  # stats change once per batch (tens of ms); 5 ms sampling is fine enough
        while not stop.is_set():
            done = filt.stats.consumed
            if done and (not marks or marks[-1][1] != done):
                marks.append((time.perf_counter(), done, time.process_time()))
            if done >= n:
                stop.set()
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    filt.run(stop)
    watcher.join()
    (t0, n0, c0), (t1, n1, c1) = marks[0], marks[-1]
    return Trial(n1 - n0, t1 - t0, c1 - c0, _peak_rss_mib())


def _in_child(fn, *args) -> Trial:
    """Run one trial in a fresh spawned process so its RSS and its CPU caches are its own."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def publish_backlog(bootstrap: str, topic: str, dataset: str, n: int, encoding: str) -> float:
    """Publish ``n`` records (a 10 % random label flip of the test split, tiled); returns s."""
    from depois_stream.sim import producer as P

    data = P.load_samples(dataset, "test")
    idx = np.arange(n) % len(data.labels)
    tiled = P.SampleSet(data.images[idx], data.labels[idx], data.name, data.num_classes)
    stream = P.poison(tiled, P.attack_by_name("random-flip", data.num_classes), POISON_RATE, seed=0)
    records, _ = P.build_records(tiled, stream, encoding=encoding)
    t0 = time.perf_counter()
    P.send_records(bootstrap, topic, records)
    return time.perf_counter() - t0


def latency_run(bootstrap: str, dataset: str, model: Path, rate: float, seconds: float,
                batch_size: int, linger_ms: int, fetch_max_wait_ms: int) -> np.ndarray:
    """End-to-end latencies (s): ingest CreateTime -> received by a reader of the output topics."""
    from kafka import KafkaConsumer, KafkaProducer

    from depois_stream.contract import headers as H
    from depois_stream.sim import producer as P
    from depois_stream.sim.broker import create_topics

    tag = uuid.uuid4().hex[:8]
    ingest, outs = f"lat-ingest-{tag}", [f"clean-{tag}", f"quarantine-{tag}", f"dlq-{tag}"]
    create_topics(bootstrap, [ingest, *outs])
    data = P.load_samples(dataset, "test")
    n = int(rate * seconds)
    idx = np.arange(n) % len(data.labels)
    tiled = P.SampleSet(data.images[idx], data.labels[idx], data.name, data.num_classes)
    records, _ = P.build_records(tiled, P.poison(tiled, None, 0.0, 0), encoding="binary")

    proc = mp.get_context("spawn").Process(
        target=_run_filter,
        args=(bootstrap, ingest, outs, tag, model, batch_size, linger_ms, fetch_max_wait_ms, seconds + 90))
    proc.start()
    reader = KafkaConsumer(*outs, bootstrap_servers=bootstrap, group_id=f"reader-{tag}",
                           fetch_max_wait_ms=10, **_client_settings(4096))
    latencies: list[float] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set() and proc.is_alive():
            polled = reader.poll(timeout_ms=100)
            now_ms = time.time() * 1000
            for rs in polled.values():
                latencies.extend((now_ms - int(H.as_dict(r.headers)[H.SOURCE_TIMESTAMP])) / 1000 for r in rs)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)

    def send(r: P.OutgoingRecord) -> None:
        prod.send(ingest, key=r.key.encode(), value=r.value,
                  headers=[(H.CONTENT_TYPE, r.content_type.encode())])

    send(records[0])  # a round trip proves the filter and the reader have joined their groups
    deadline = time.monotonic() + 60
    while not latencies and time.monotonic() < deadline:
        time.sleep(0.05)
    latencies.clear()
    per_tick = max(1, int(rate * 0.01))
    start = time.perf_counter()
    for k in range(0, n, per_tick):
        for r in records[k:k + per_tick]:
            send(r)
        time.sleep(max(0.0, start + (k + per_tick) / rate - time.perf_counter()))
    prod.flush()
    deadline = time.monotonic() + 30
    while len(latencies) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    t.join()
    proc.terminate()
    proc.join()
    reader.close()
    prod.close()
    return np.asarray(latencies)


def _run_filter(bootstrap: str, ingest: str, outs: list[str], tag: str, model: Path,
                batch_size: int, linger_ms: int, fetch_max_wait_ms: int, lifetime_s: float) -> None:
    from depois_stream.sim.broker import TEST_HEARTBEAT_INTERVAL_MS, TEST_SESSION_TIMEOUT_MS
    from depois_stream.filter.config import ConsumerConfig
    from depois_stream.filter.app import StreamFilter

    cfg = ConsumerConfig(
        bootstrap_servers=bootstrap, model_path=model, ingest_topic=ingest, group_id=f"lat-{tag}",
        clean_topic=outs[0], quarantine_topic=outs[1], dlq_topic=outs[2], batch_size=batch_size,
        linger_ms=linger_ms, device="cpu", metrics_port=None,
        kafka={} if fetch_max_wait_ms == KAFKA_DEFAULT_FETCH_WAIT_MS else {"fetch_max_wait_ms": fetch_max_wait_ms},
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS, heartbeat_interval_ms=TEST_HEARTBEAT_INTERVAL_MS)
    stop = threading.Event()
    threading.Timer(lifetime_s, stop.set).start()
    StreamFilter(cfg).run(stop)


@app.command(help=__doc__)
def main(
    model: Optional[Path] = typer.Option(
        None, help="Exported ONNX model (with its .card.json). Without it a detector is fitted "
                   "(--detector-dir or --dataset) and exported to a temporary folder."),
    detector_dir: Optional[Path] = typer.Option(None, help="Trained detector directory to export "
                                                            "(OUT/detector of `depois-train all --out OUT`)."),
    dataset: str = typer.Option("digits", help="Data set whose test split is published (and "
                                               "fitted on, without --model)."),
    records: int = typer.Option(50_000, help="Backlog size per encoding."),
    encodings: str = typer.Option("binary,json", help="Comma-separated wire encodings to measure."),
    batch_size: int = typer.Option(512, help="max_poll_records of both clients = the filter's batch."),
    linger_ms: int = typer.Option(50, help="The filter's batch linger."),
    offered_rate: float = typer.Option(1000.0, help="Records/s offered in the latency run (0 skips it)."),
    latency_seconds: float = typer.Option(10.0, help="Duration of each latency run."),
    fetch_waits: str = typer.Option(
        "500,20", help="Comma-separated fetch_max_wait_ms of the filter's consumer, one latency run "
                       "each (500 is the kafka-python default; Tansu holds a fetch that long "
                       "even when records are waiting)."),
    out: Optional[Path] = typer.Option(None, help="Append the result block to this markdown file."),
) -> None:
    """Raw consume vs full pipeline on the local Tansu broker, then latency at a fixed load."""
    from depois_stream.sim.broker import LocalBroker, create_topics

    with tempfile.TemporaryDirectory() as tmp, LocalBroker(log_path=Path(tmp) / "tansu.log") as broker:
        if model is None:
            from training.export import export_onnx

            det = load_or_fit(detector_dir, dataset, "quick")
            model = Path(tmp) / "model.onnx"
            export_onnx(det, model)
        rows = []
        for enc in encodings.split(","):
            topic = f"backlog-{enc}-{uuid.uuid4().hex[:6]}"
            create_topics(broker.bootstrap, [topic])
            pub_s = publish_backlog(broker.bootstrap, topic, dataset, records, enc)
            raw = _in_child(raw_trial, broker.bootstrap, topic, records, batch_size)
            fwd = _in_child(forward_trial, broker.bootstrap, topic, records, batch_size, FORWARD_HEADERS)
            pipe = _in_child(pipeline_trial, broker.bootstrap, topic, records, batch_size, model, linger_ms)
            c_fwd = (_in_child(forward_trial, broker.bootstrap, topic, records, batch_size, FORWARD_HEADERS,
                               "confluent-kafka") if _confluent_available() else None)
            rows.append([enc, records, fmt_rate(records / pub_s), fmt_rate(raw.rate), fmt_rate(fwd.rate),
                         fmt_rate(c_fwd.rate) if c_fwd else "n/a", fmt_rate(pipe.rate),
                         f"{pipe.rate / raw.rate:.2f}x", f"{pipe.rate / fwd.rate:.2f}x",
                         *(f"{t.cpu_us_per_record:.0f}" for t in (raw, fwd, pipe)),
                         f"{raw.peak_rss_mib:.0f}", f"{pipe.peak_rss_mib:.0f}"])
        body = markdown_table(
            ["encoding", "records", "publish rec/s", "raw consume rec/s", "consume+forward rec/s",
             "consume+forward, confluent-kafka producer rec/s", "pipeline rec/s", "pipeline / raw",
             "pipeline / forward", "raw CPU us/rec", "forward CPU us/rec", "pipeline CPU us/rec",
             "raw peak RSS MiB", "pipeline peak RSS MiB"], rows)
        if offered_rate > 0:
            expected = int(offered_rate * latency_seconds)
            lat_rows = []
            for wait in (int(w) for w in fetch_waits.split(",")):
                lat = latency_run(broker.bootstrap, dataset, model, offered_rate, latency_seconds,
                                  batch_size, linger_ms, wait)
                pct = [f"{np.percentile(lat, q) * 1e3:.1f}" for q in (50, 99, 100)] if len(lat) else ["-"] * 3
                lat_rows.append([fmt_rate(offered_rate), wait, f"{len(lat)}/{expected}", *pct])
            body += "\n\n" + markdown_table(
                ["offered rec/s", "fetch_max_wait_ms", "received", "p50 ms", "p99 ms", "max ms"], lat_rows)
        notes = (f"- model {model.name}, data set {dataset}, batch {batch_size}, linger {linger_ms} ms, "
                 f"1 partition, local Tansu broker on loopback; {POISON_RATE:.0%} random label flips")
        write_report(out, "Pipeline vs raw consume (local broker)", notes + "\n\n" + body)


if __name__ == "__main__":
    app()
