"""Scale-out simulation: N filter processes in one consumer group on a topic of P partitions.

Kafka scales a consumer by adding members of the same group, one partition per member at most;
this measures what that buys on the machine at hand and what membership changes cost. Every
member is a real ``python -m depois_stream run`` process (the same CLI a pod runs) against the
local Tansu broker on loopback, scoring a small contract model (class centroids fitted on sklearn
digits, ``tests/helpers/onnx_models.py``).

1. **Throughput** for N = 1 .. P members, each N on fresh topics with the same backlog. The rate
   is measured on the group's committed offsets (polled by an admin client), from the first
   commit to the last, so the group join (~3 s on Tansu with a 6 s session) and the idle exit
   are not counted.
2. **Membership changes mid-stream**: start with two members, add a third at 25 % of the backlog,
   SIGKILL the first at 55 %. Lag (backlog minus committed) is sampled over time; at the end every
   output topic is read back and each sample id counted: duplicates (an id routed more than once:
   expected after a SIGKILL, at-least-once) and losses (an id routed nowhere: must be 0).

On a 2-core machine P = 4 is plenty: the members, the broker and this driver share the cores, so
the curve flattens at 2 whatever P is. Bounded in time: every wait has a deadline and every
member process is ended (SIGTERM, then SIGKILL) before the script exits.

    python benchmarks/scale_out.py --partitions 4 --records 20000
    python benchmarks/scale_out.py --out docs/performance.md
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from _common import REPO, fmt_rate, markdown_table, write_report

sys.path.insert(0, str(REPO))  # tests.helpers: the contract model and the Kafka read-back helpers

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)

SESSION_TIMEOUT_MS = 6000  # Tansu: a join takes about half of it
HEARTBEAT_INTERVAL_MS = 1000
POISON_RATE = 0.1  # flipped labels: real quarantine traffic, far below the breaker's limit
SAMPLE_S = 0.25


@dataclass(frozen=True)
class TopicSet:
    ingest: str
    clean: str
    quarantine: str
    dlq: str

    def outputs(self) -> tuple[str, str, str]:
        return self.clean, self.quarantine, self.dlq


def make_topics(bootstrap: str, prefix: str, partitions: int) -> TopicSet:
    from depois_stream.broker import create_topics

    t = TopicSet(f"{prefix}-in", f"{prefix}-clean", f"{prefix}-q", f"{prefix}-dlq")
    create_topics(bootstrap, [t.ingest, t.clean, t.quarantine, t.dlq], partitions=partitions)
    return t


def make_model(folder: Path) -> Path:
    """Centroid detector on the digits training split (onnx + scikit-learn needed)."""
    from tests.helpers.onnx_models import build_centroid_model, digits_split

    xtr, ytr, _, _ = digits_split()
    path = folder / "model.onnx"
    build_centroid_model(path, xtr, ytr, num_classes=10, model_version="scale-out-bench")
    return path


def backlog(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The digits test split tiled to ``n`` records, ``POISON_RATE`` of the labels flipped."""
    from tests.helpers.onnx_models import digits_split

    _, _, xte, yte = digits_split()
    rng = np.random.default_rng(seed)
    idx = np.arange(n) % len(yte)
    images, labels = xte[idx], yte[idx].copy()
    flip = rng.random(n) < POISON_RATE
    labels[flip] = (labels[flip] + rng.integers(1, 10, flip.sum())) % 10
    run = uuid.uuid4().hex[:6]
    return [f"{run}-{i}" for i in range(n)], images, labels


class Member:
    """One ``depois-stream run`` process; stdout (its final stats line) and stderr to files."""

    def __init__(self, name: str, bootstrap: str, topics: TopicSet, group: str, model: Path,
                 logdir: Path, batch_size: int) -> None:
        self.name = name
        self.out = logdir / f"{name}.out"
        self.err = logdir / f"{name}.err"
        cmd = [sys.executable, "-m", "depois_stream", "run", "--model-path", str(model),
               "--bootstrap-servers", bootstrap, "--ingest-topic", topics.ingest,
               "--clean-topic", topics.clean, "--quarantine-topic", topics.quarantine,
               "--dlq-topic", topics.dlq, "--group-id", group, "--device", "cpu",
               "--metrics-port", "0", "--batch-size", str(batch_size),
               "--session-timeout-ms", str(SESSION_TIMEOUT_MS),
               "--heartbeat-interval-ms", str(HEARTBEAT_INTERVAL_MS),
               "--exit-when-idle-s", "2", "--reload-interval-s", "0", "--lag-interval-s", "1"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.out.open("w"),
                                     stderr=self.err.open("w"))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_seconds(self) -> float:
        """user + system CPU of the process so far (0 once it has exited)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def consumed(self) -> Optional[int]:
        """From the stats line a clean exit prints; None for a killed member."""
        for token in self.out.read_text().split():
            if token.startswith("consumed="):
                return int(token.split("=", 1)[1])
        return None


@dataclass
class Sampler:
    """Polls the group's committed offsets per partition every ``SAMPLE_S`` in a thread."""

    bootstrap: str
    group: str
    topic: str
    partitions: int
    samples: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # members' CPU seconds at each sample
    members: list["Member"] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        from kafka.admin import KafkaAdminClient

        self._admin = KafkaAdminClient(bootstrap_servers=self.bootstrap,
                                       client_id="scale-out-sampler")
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def committed(self) -> dict[int, int]:
        from kafka import TopicPartition

        parts = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        if hasattr(self._admin, "list_group_offsets"):  # kafka-python >= 3
            offsets = self._admin.list_group_offsets({self.group: parts})[self.group]
        else:
            offsets = self._admin.list_consumer_group_offsets(self.group, partitions=parts)
        return {tp.partition: om.offset for tp, om in offsets.items()
                if tp.topic == self.topic and om.offset is not None and om.offset >= 0}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                committed = self.committed()
                cpu = sum(m.cpu_seconds() for m in self.members)
                self.samples.append((time.monotonic() - self.t0, committed))
                self.cpu.append(cpu)
            except Exception:  # noqa: BLE001  (group not created yet, broker busy: sample later)
                pass
            self._stop.wait(SAMPLE_S)

    def latest_total(self) -> int:
        return sum(self.samples[-1][1].values()) if self.samples else 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._admin.close()


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.1)


def audit(bootstrap: str, topics: TopicSet, ids: list[str]) -> tuple[int, int, int]:
    """(records routed, duplicate ids, lost ids) over clean + quarantine + dlq."""
    from tests.helpers.kafka_io import read_all

    counts: collections.Counter[str] = collections.Counter()
    for t in topics.outputs():
        counts.update(r.key.decode() for r in read_all(bootstrap, t, timeout_s=60))
    expected = set(ids)
    duplicates = sum(c - 1 for k, c in counts.items() if c > 1)
    lost = len(expected - set(counts))
    return sum(counts.values()), duplicates, lost


def publish(bootstrap: str, topic: str, ids, images, labels) -> dict[int, int]:
    from tests.helpers.kafka_io import publish as _publish

    return _publish(bootstrap, topic, ids, images, labels)


def _load1() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def throughput_run(bootstrap: str, model: Path, partitions: int, members: int, records: int,
                   batch_size: int, logdir: Path, timeout_s: float) -> list[object]:
    prefix = f"scale{members}-{uuid.uuid4().hex[:6]}"
    topics = make_topics(bootstrap, prefix, partitions)
    ids, images, labels = backlog(records)
    ends = publish(bootstrap, topics.ingest, ids, images, labels)
    total = sum(ends.values())
    load_before = _load1()
    sampler = Sampler(bootstrap, prefix, topics.ingest, partitions)
    procs = [Member(f"{prefix}-m{i}", bootstrap, topics, prefix, model, logdir, batch_size)
             for i in range(members)]
    sampler.members.extend(procs)
    try:
        wait_until(lambda: sampler.latest_total() >= total, timeout_s, f"{members} member(s) draining")
        for m in procs:
            m.proc.wait(timeout=60)
    finally:
        for m in procs:
            m.stop()
        sampler.close()
    totals = [sum(c.values()) for _, c in sampler.samples]
    i_first = next(i for i, c in enumerate(totals) if c > 0)
    i_done = next(i for i, c in enumerate(totals) if c >= total)
    first, done = (sampler.samples[i_first][0], totals[i_first]), sampler.samples[i_done][0]
    rate = (total - first[1]) / (done - first[0]) if done > first[0] else float("nan")
    # CPU of the members over the same span: scoring + routing, without start-up and join.
    cpu_us = 1e6 * (sampler.cpu[i_done] - sampler.cpu[i_first]) / max(total - first[1], 1)
    per_member = [m.consumed() for m in procs]
    routed, dups, lost = audit(bootstrap, topics, ids)
    return [members, f"{total:,}", f"{done - first[0]:.1f}", fmt_rate(rate),
            "/".join(str(c) for c in per_member), f"{cpu_us:.0f}",
            f"{first[0]:.1f}", dups, lost, f"{load_before} / {_load1()}"]


def churn_run(bootstrap: str, model: Path, partitions: int, records: int, batch_size: int,
              logdir: Path, timeout_s: float, add_at: float, kill_at: float,
              seed: int = 1) -> tuple[str, list[object]]:
    prefix = f"churn-{uuid.uuid4().hex[:6]}"
    topics = make_topics(bootstrap, prefix, partitions)
    ids, images, labels = backlog(records, seed=seed)
    ends = publish(bootstrap, topics.ingest, ids, images, labels)
    total = sum(ends.values())
    sampler = Sampler(bootstrap, prefix, topics.ingest, partitions)
    events: list[tuple[float, str]] = []

    def start(name: str) -> Member:
        events.append((time.monotonic() - sampler.t0, f"start {name}"))
        return Member(f"{prefix}-{name}", bootstrap, topics, prefix, model, logdir, batch_size)

    procs = {name: start(name) for name in ("m1", "m2")}
    try:
        wait_until(lambda: sampler.latest_total() >= add_at * total, timeout_s, "first 25 %")
        procs["m3"] = start("m3")
        wait_until(lambda: sampler.latest_total() >= kill_at * total, timeout_s, "kill point")
        procs["m1"].kill()
        events.append((time.monotonic() - sampler.t0, "SIGKILL m1"))
        wait_until(lambda: sampler.latest_total() >= total, timeout_s, "draining after the kill")
        events.append((time.monotonic() - sampler.t0, "all committed"))
        for name in ("m2", "m3"):
            procs[name].proc.wait(timeout=60)
    finally:
        for m in procs.values():
            m.stop()
        sampler.close()
    routed, dups, lost = audit(bootstrap, topics, ids)

    # Timeline: one row per second of committed progress, each event on the row that follows it.
    rows: list[list[str]] = []
    next_t, last_total, last_t, shown = 0.0, 0, 0.0, 0
    for t, c in sampler.samples:
        committed = sum(c.values())
        if t < next_t and committed < total:
            continue
        final = committed >= total
        happened = [e for et, e in events[shown:] if et <= t or final]
        shown += len(happened)
        rate = (committed - last_total) / (t - last_t) if rows and t > last_t else 0.0
        rows.append([f"{t:.1f}", f"{committed:,}", f"{total - committed:,}", fmt_rate(rate),
                     ", ".join(happened)])
        last_total, last_t, next_t = committed, t, t + 1.0
        if final:
            break
    stalls = _stalls(sampler.samples, ends)
    at = {e: t for t, e in events}
    add_stall = _longest_stall(stalls, at["start m3"], at["SIGKILL m1"])
    kill_stall = _longest_stall(stalls, at["SIGKILL m1"], float("inf"))
    timeline = markdown_table(["t (s)", "committed", "lag (records)", "records/s", "event"], rows)
    row = [f"{total:,}", f"{routed:,}", dups, lost, f"{add_stall:.1f}", f"{kill_stall:.1f}",
           "/".join("killed" if (c := procs[n].consumed()) is None else str(c)
                    for n in ("m1", "m2", "m3"))]
    return timeline, row


def _stalls(samples: list[tuple[float, dict[int, int]]], ends: dict[int, int]) -> list[tuple[float, float]]:
    """(start, end) of every interval in which a partition with lag saw no committed progress."""
    out = []
    for p, end in ends.items():
        since, prev = None, None
        for t, c in samples:
            off = c.get(p, 0)
            if off != prev:
                if since is not None and prev is not None:
                    out.append((since, t))
                since, prev = t, off
            if off >= end:
                break
    return out


def _longest_stall(stalls: list[tuple[float, float]], start: float, stop: float) -> float:
    """Longest stall overlapping [start, stop): what a membership change at ``start`` cost."""
    return max((e - s for s, e in stalls if e > start and s < stop), default=0.0)


@app.command()
def main(
    partitions: int = typer.Option(4, help="Partitions of the ingest topic (= most members that work)."),
    records: int = typer.Option(20000, help="Backlog per throughput run."),
    churn_records: int = typer.Option(60000, help="Backlog of the membership-change run."),
    batch_size: int = typer.Option(512, help="--batch-size of every member."),
    timeout_s: float = typer.Option(300.0, help="Deadline of each wait (the run is bounded)."),
    repeats: int = typer.Option(2, help="Throughput runs per member count (the table shows each)."),
    churn_repeats: int = typer.Option(2, help="Membership-change runs."),
    skip_churn: bool = typer.Option(False, help="Only the throughput table."),
    out: Optional[Path] = typer.Option(None, help="Append the markdown block to this file."),
) -> None:
    """Run both scenarios on a private local broker and print the tables."""
    from depois_stream.broker import LocalBroker

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="depois-scale-") as tmp, \
            LocalBroker(log_path=Path(tmp) / "tansu.log") as broker:
        model = make_model(Path(tmp))
        logdir = Path(tmp)
        # Interleaved (1..P, then 1..P again) so a change of load on the machine hits every N.
        rows = [throughput_run(broker.bootstrap, model, partitions, n, records, batch_size,
                               logdir, timeout_s)
                for _ in range(repeats) for n in range(1, partitions + 1)]
        rows.sort(key=lambda r: r[0])
        rate = lambda r: float(str(r[3]).replace(",", ""))  # noqa: E731
        base = sorted(rate(r) for r in rows if r[0] == 1)[len([r for r in rows if r[0] == 1]) // 2]
        for r in rows:
            r.insert(4, f"{rate(r) / base:.2f}x")
        table = markdown_table(
            ["members", "records", "drain s", "records/s", "vs 1 member", "consumed per member",
             "members' CPU us / record", "first commit at s", "duplicate ids", "lost ids",
             "load1 before / after"], rows)
        body = [f"Ingest topic of {partitions} partitions, backlog of {records:,} records per run "
                f"(digits test split tiled, {POISON_RATE:.0%} labels flipped), batch {batch_size}, "
                f"session {SESSION_TIMEOUT_MS} ms; every member a `python -m depois_stream run` "
                "process on the local Tansu broker.", "", table]
        if not skip_churn:
            runs = [churn_run(broker.bootstrap, model, partitions, churn_records, batch_size,
                              logdir, timeout_s, 0.25, 0.55, seed=k + 1)
                    for k in range(churn_repeats)]
            summary = markdown_table(
                ["run", "records", "routed (all outputs)", "duplicate ids", "lost ids",
                 "longest partition stall after the add (s)",
                 "longest partition stall after the kill (s)", "consumed m1/m2/m3"],
                [[k + 1, *row] for k, (_, row) in enumerate(runs)])
            body += ["", f"Membership changes mid-stream ({churn_records:,} records, "
                     f"{partitions} partitions): two members, a third added at 25 % of the "
                     "backlog committed, the first SIGKILLed at 55 %.", "", summary, "",
                     "Lag over time, run 1 (committed offsets sampled every 0.25 s, one row "
                     "per second):", "", runs[0][0]]
        body += ["", f"Whole run: {time.monotonic() - started:.0f} s."]
    write_report(out, "Scale out: members of one consumer group", "\n".join(body))


if __name__ == "__main__":
    app()
