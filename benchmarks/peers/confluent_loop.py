"""The filter a user would write with confluent-kafka: consume 512, decode, score, produce, flush,
commit. Serial, one batch at a time, the way the client's examples do it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from confluent_kafka import Consumer, Producer

from peers.common import decode, headers, load_model


def run(bootstrap: str, ingest: str, outs: tuple[str, str, str], group: str, model: str,
        n: int, progress: Callable[[int], None]) -> dict[str, int]:
    pm = load_model(model)
    session, shape, version, wanted, sha = pm.session, pm.shape, pm.version, pm.wanted, pm.sha
    # session.timeout.ms: Tansu makes a join wait about half of it (depois-stream runs with the
    # same value in this benchmark).
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                         "fetch.wait.max.ms": 100})  # as depois-stream: Tansu holds fetches
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 5})
    consumer.subscribe([ingest])
    counts = {"clean": 0, "quarantine": 0, "dlq": 0}
    done = 0
    while done < n:
        msgs = [m for m in consumer.consume(512, 1.0) if m.error() is None]
        if not msgs:
            continue
        decoded = [decode(m.value(), shape) for m in msgs]
        ok = [i for i, d in enumerate(decoded) if d is not None]
        images = np.stack([decoded[i][0] for i in ok]) if ok else np.zeros((0, *shape), np.float32)
        labels = np.array([decoded[i][1] for i in ok], dtype=np.int64)
        score = poisoned = p_value = None
        if ok:
            score, poisoned, *p_value = session.run(wanted, {"image": images, "label": labels})
        verdict = {}
        for row, i in enumerate(ok):
            verdict[i] = row
        for i, m in enumerate(msgs):
            row = verdict.get(i)
            if row is None:
                dest, hdrs = "dlq", [("depois.verdict", b"dlq"),
                                     ("depois.error_class", b"malformed")]
            else:
                label = int(labels[row])
                bound = pm.bound(label)
                dest = "quarantine" if poisoned[row] else "clean"
                hdrs = headers(dest, float(score[row]), float(bound),
                               float(p_value[0][row]) if p_value else None, label,
                               version, sha, m.topic(), m.partition(), m.offset(),
                               m.timestamp()[1])
            counts[dest] += 1
            producer.produce(outs[("clean", "quarantine", "dlq").index(dest)], value=m.value(),
                             key=m.key(), headers=(m.headers() or []) + hdrs)
        producer.flush()
        consumer.commit(asynchronous=False)
        done += len(msgs)
        progress(done)
    consumer.close()
    return counts
