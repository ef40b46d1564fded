"""What the peers share: the wire format decoded with plain numpy, and the header set."""

from __future__ import annotations

import numpy as np

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
