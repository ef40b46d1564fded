"""The same filter as a Quix Streams app: one record at a time, the framework's natural shape."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from quixstreams import Application

from peers.common import decode, headers, load_model


def run(bootstrap: str, ingest: str, outs: tuple[str, str, str], group: str, model: str,
        n: int, progress: Callable[[int], None]) -> dict[str, int]:
    pm = load_model(model)
    session, shape, version, wanted, sha = pm.session, pm.shape, pm.version, pm.wanted, pm.sha

    app = Application(broker_address=bootstrap, consumer_group=group,
                      auto_offset_reset="earliest", loglevel=None, auto_create_topics=False,
                      use_changelog_topics=False,
                      consumer_extra_config={"session.timeout.ms": 6000,
                                             "heartbeat.interval.ms": 1000,
                                             "fetch.wait.max.ms": 100})
    source = app.topic(ingest, key_deserializer="bytes", value_deserializer="bytes")
    targets = {name: app.topic(t, key_serializer="bytes", value_serializer="bytes")
               for name, t in zip(("clean", "quarantine", "dlq"), outs)}
    counts = {"clean": 0, "quarantine": 0, "dlq": 0}

    def score(value: bytes, key: bytes, timestamp: int, hdrs: list) -> dict:
        from quixstreams import message_context

        ctx = message_context()
        d = decode(value, shape)
        if d is None:
            out = [("depois.verdict", b"dlq"), ("depois.error_class", b"malformed")]
            dest = "dlq"
        else:
            s, bad, *p = session.run(wanted, {"image": d[0][None],
                                              "label": np.array([d[1]], np.int64)})
            dest = "quarantine" if bad[0] else "clean"
            bound = pm.bound(d[1])
            out = headers(dest, float(s[0]), float(bound), float(p[0][0]) if p else None, d[1],
                          version, sha,
                          ctx.topic, ctx.partition, ctx.offset, timestamp)
        counts[dest] += 1
        return {"raw": value, "dest": dest, "headers": list(hdrs or []) + out}

    def done(_value: object) -> None:
        total = sum(counts.values())
        progress(total)
        if total >= n:
            app.stop()

    sdf = app.dataframe(source)
    sdf = sdf.apply(score, metadata=True)
    sdf = sdf.set_headers(lambda value, key, ts, hdrs: value["headers"])
    routed = sdf.apply(lambda value: value["raw"])
    routed = routed.to_topic(lambda value, key, ts, hdrs: targets[
        dict(hdrs)["depois.verdict"].decode()])
    routed.update(done)
    app.run()
    return counts
