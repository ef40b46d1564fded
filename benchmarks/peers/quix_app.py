"""The same filter as a Quix Streams app: one record at a time, the framework's natural shape."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from quixstreams import Application

from peers.common import decode, headers


def run(bootstrap: str, ingest: str, outs: tuple[str, str, str], group: str, model: str,
        n: int, progress: Callable[[int], None]) -> dict[str, int]:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    shape = tuple(int(d) for d in meta["depois.input_shape"].split(","))
    boundary = json.loads(meta["depois.boundary"])
    per_class = boundary.get("per_class")
    version = meta["depois.model_version"]
    wanted = [o for o in ("score", "poisoned", "p_value")
              if o in {x.name for x in session.get_outputs()}]
    sha = hashlib.sha256(open(model, "rb").read()).hexdigest()

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
            bound = per_class[d[1]] if per_class else boundary["global"]
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
