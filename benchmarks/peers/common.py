"""What the peers share: the model as a user would load it, the wire format decoded with plain
numpy, and the header set."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

HEADER = np.dtype([("magic", "S4"), ("version", "u1"), ("dtype", "u1"), ("id_len", "<u2"),
                   ("source_len", "<u2"), ("channels", "<u2"), ("height", "<u2"),
                   ("width", "<u2"), ("label", "<i4"), ("payload_len", "<u4"), ("ts", "<f8")])


def decode(value: bytes | None, shape: tuple[int, int, int]) -> tuple[np.ndarray, int] | None:
    """One binary record -> (float32 [C, H, W], label), or None when it is not a uint8 sample
    of the model's shape (a peer would dead-letter it)."""
    if value is None or len(value) < 32:
        return None
    h = np.frombuffer(value, HEADER, count=1)[0]
    n = int(np.prod(shape))
    if (h["magic"] != b"DPOI" or h["dtype"] != 1 or (h["channels"], h["height"], h["width"]) != shape
            or h["payload_len"] != n or len(value) < 32 + n):
        return None
    pixels = np.frombuffer(value, np.uint8, count=n, offset=32).reshape(shape)
    return pixels.astype(np.float32) / np.float32(255), int(h["label"])


def headers(verdict: str, score: float, boundary: float, p_value: float | None, label: int,
            version: str, sha: str, topic: str, partition: int, offset: int,
            timestamp_ms: int) -> list[tuple[str, bytes]]:
    """The verdict and provenance headers depois-stream writes, built per record."""
    out = [("depois.verdict", verdict.encode()), ("depois.score", str(score).encode()),
           ("depois.boundary", str(boundary).encode()), ("depois.label", str(label).encode())]
    if p_value is not None:
        out.append(("depois.p_value", str(p_value).encode()))
    return out + [("depois.model_version", version.encode()), ("depois.model_sha256", sha.encode()),
                  ("depois.source.topic", topic.encode()),
                  ("depois.source.partition", str(partition).encode()),
                  ("depois.source.offset", str(offset).encode()),
                  ("depois.source.timestamp_ms", str(timestamp_ms).encode())]


@dataclass
class PeerModel:
    """An onnxruntime session and the metadata a hand-written filter reads from the model."""

    session: ort.InferenceSession
    shape: tuple[int, int, int]
    boundary: dict[str, Any]
    version: str
    wanted: list[str]  # outputs to fetch: score, poisoned and p_value where the model has it
    sha: str

    def bound(self, label: int) -> float:
        per_class = self.boundary.get("per_class")
        return per_class[label] if per_class else self.boundary["global"]


def load_model(model: str) -> PeerModel:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    with open(model, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return PeerModel(
        session, tuple(int(d) for d in meta["depois.input_shape"].split(",")),
        json.loads(meta["depois.boundary"]), meta["depois.model_version"],
        [o for o in ("score", "poisoned", "p_value") if o in {x.name for x in session.get_outputs()}],
        sha)
