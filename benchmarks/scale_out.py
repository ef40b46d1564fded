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
import re
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
    from depois_stream.sim.broker import create_topics

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
                 logdir: Path, batch_size: int, exit_when_idle_s: Optional[float] = 2.0) -> None:
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
               "--reload-interval-s", "0", "--lag-interval-s", "1"]
        if exit_when_idle_s is not None:
            cmd += ["--exit-when-idle-s", str(exit_when_idle_s)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.out.open("w"),
                                     stderr=self.err.open("w"))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> str:
        """End the member if it still runs; returns how it ended (for the table)."""
        if self.proc.poll() is not None:
            return "exited"
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
            return "SIGTERM"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "SIGKILL"

    def terminate(self, timeout_s: float = 45.0) -> str:
        """SIGTERM as Kubernetes sends it; how long the member took and its exit code."""
        t0 = time.monotonic()
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"SIGTERM ignored for {timeout_s:.0f} s, SIGKILL"
        return f"SIGTERM: exit {rc} in {time.monotonic() - t0:.1f} s"

    def wait_idle_exit(self, timeout_s: float) -> bool:
        """Whether the member exited by itself (--exit-when-idle-s) within ``timeout_s``."""
        try:
            self.proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

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
        # A drained member exits 2 s after its last record; one still running a minute later
        # is a finding (reported in the table), then ended with SIGTERM like a pod.
        deadline = time.monotonic() + 60
        exited = [m.wait_idle_exit(max(0.1, deadline - time.monotonic())) for m in procs]
    finally:
        endings = [m.stop() for m in procs]
        sampler.close()
    ending = (f"{sum(exited)}/{members} idle exit" + "".join(
        f", {n} {e}" for n, e in collections.Counter(e for e in endings if e != "exited").items()))
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
            f"{first[0]:.1f}", dups, lost, ending, f"{load_before} / {_load1()}"]


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
        # No idle exit: a survivor that drained its own partitions must stay to take over the
        # dead member's once the group notices (a pod does not exit when idle either).
        return Member(f"{prefix}-{name}", bootstrap, topics, prefix, model, logdir, batch_size,
                      exit_when_idle_s=None)

    procs = {name: start(name) for name in ("m1", "m2")}
    try:
        wait_until(lambda: sampler.latest_total() >= add_at * total, timeout_s, "first 25 %")
        procs["m3"] = start("m3")
        wait_until(lambda: sampler.latest_total() >= kill_at * total, timeout_s, "kill point")
        procs["m1"].kill()
        events.append((time.monotonic() - sampler.t0, "SIGKILL m1"))
        wait_until(lambda: sampler.latest_total() >= total, timeout_s, "draining after the kill")
        events.append((time.monotonic() - sampler.t0, "all committed"))
        shutdown = {name: procs[name].terminate() for name in ("m2", "m3")}
    finally:
        endings = {name: m.stop() for name, m in procs.items()}
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
    at = {e: t for t, e in events}
    add_stall = _group_stall(sampler.samples, at["start m3"], at["SIGKILL m1"], total)
    held = _last_assignment(procs["m1"])
    kill_stall = _resume_after(sampler.samples, held, at["SIGKILL m1"], ends)
    timeline = markdown_table(["t (s)", "committed", "lag (records)", "records/s", "event"], rows)
    survivors = "; ".join(f"{n} {shutdown.get(n, endings[n])}" for n in ("m2", "m3"))
    row = [f"{total:,}", f"{routed:,}", dups, lost, f"{add_stall:.1f}",
           f"{kill_stall:.1f} ({', '.join(map(str, held)) or 'none'})",
           "/".join("killed" if (c := procs[n].consumed()) is None else str(c)
                    for n in ("m1", "m2", "m3")), survivors]
    return timeline, row


def _group_stall(samples: list[tuple[float, dict[int, int]]], start: float, stop: float,
                 total: int) -> float:
    """Longest time within [start, stop) in which the whole group committed nothing (lag > 0):
    what an eager rebalance costs, since every member stops for it."""
    longest, since, prev = 0.0, None, None
    for t, c in samples:
        committed = sum(c.values())
        if committed != prev or committed >= total:
            if since is not None and t > start and since < stop:
                longest = max(longest, min(t, stop) - max(since, start))
            since, prev = t, committed
    return longest


def _last_assignment(member: "Member") -> list[int]:
    """Partitions last assigned to the member, from its own log (`partitions assigned: [..]`).

    A member killed in the middle of a rebalance has had them revoked without a new assignment
    yet: nobody consumes them until the group notices the death, so they count as its own."""
    held: list[int] = []
    for line in member.err.read_text().splitlines():
        m = re.search(r"partitions assigned: \[([0-9, ]*)\]", line)
        if m:
            held = [int(x) for x in m.group(1).split(",") if x.strip()]
    return held


def _resume_after(samples: list[tuple[float, dict[int, int]]], partitions: list[int],
                  t_kill: float, ends: dict[int, int], settle_s: float = 1.0) -> float:
    """Seconds from the kill until every partition the dead member held committed again.

    A commit the member sent just before SIGKILL can still land after it; the baseline is the
    offset ``settle_s`` after the kill, and only progress past it counts (a new owner's)."""
    worst = 0.0
    for p in partitions:
        base = next((c.get(p, 0) for t, c in samples if t >= t_kill + settle_s), None)
        if base is None or base >= ends.get(p, 0):
            continue  # nothing left to do on it
        resumed = next((t for t, c in samples if t > t_kill + settle_s and c.get(p, 0) > base),
                       None)
        worst = max(worst, (resumed if resumed is not None else samples[-1][0]) - t_kill)
    return worst


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
    skip_throughput: bool = typer.Option(False, help="Only the membership-change runs."),
    out: Optional[Path] = typer.Option(None, help="Append the markdown block to this file."),
    log_dir: Optional[Path] = typer.Option(None, help="Keep every member's stdout/stderr here."),
) -> None:
    """Run both scenarios on a private local broker and print the tables."""
    from depois_stream.sim.broker import LocalBroker

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="depois-scale-") as tmp, \
            LocalBroker(log_path=Path(tmp) / "tansu.log") as broker:
        model = make_model(Path(tmp))
        logdir = log_dir or Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        # Interleaved (1..P, then 1..P again) so a change of load on the machine hits every N.
        rows = [throughput_run(broker.bootstrap, model, partitions, n, records, batch_size,
                               logdir, timeout_s)
                for _ in range(0 if skip_throughput else repeats) for n in range(1, partitions + 1)]
        rows.sort(key=lambda r: r[0])
        rate = lambda r: float(str(r[3]).replace(",", ""))  # noqa: E731
        ones = sorted(rate(r) for r in rows if r[0] == 1)
        for r in rows:
            r.insert(4, f"{rate(r) / ones[len(ones) // 2]:.2f}x")
        table = "" if skip_throughput else markdown_table(
            ["members", "records", "drain s", "records/s", "vs 1 member", "consumed per member",
             "members' CPU us / record", "first commit at s", "duplicate ids", "lost ids",
             "how members ended", "load1 before / after"], rows)
        body = [f"Ingest topic of {partitions} partitions, backlog of {records:,} records per run "
                f"(digits test split tiled, {POISON_RATE:.0%} labels flipped), batch {batch_size}, "
                f"session {SESSION_TIMEOUT_MS} ms; every member a `python -m depois_stream run` "
                "process on the local Tansu broker.", "", table] if not skip_throughput else []
        if not skip_churn:
            runs = [churn_run(broker.bootstrap, model, partitions, churn_records, batch_size,
                              logdir, timeout_s, 0.25, 0.55, seed=k + 1)
                    for k in range(churn_repeats)]
            summary = markdown_table(
                ["run", "records", "routed (all outputs)", "duplicate ids", "lost ids",
                 "whole group stopped after the add (s)",
                 "kill to next commit on m1's partitions (s) (partitions)", "consumed m1/m2/m3",
                 "m2, m3 shutdown after the drain"],
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
