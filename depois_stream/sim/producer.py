"""Publish a data set to the ingest topic, optionally poisoned, and record which ids are poisons.

This is the attacker-and-honest-source stand-in for the demo, tests and benchmarks: it turns
(images, labels) into wire records, lets a numpy attack from ``depois_stream.sim.attacks`` corrupt a
known subset, mixes in a few records that must be dead-lettered, and writes a manifest of the
ground truth. The manifest is what detection precision/recall is scored against; the records
themselves carry nothing that would reveal which ones are poisoned.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel

from depois_stream.sim import attacks
from depois_stream.sim.datasets import load_dataset, read_npz
from depois_stream.contract.headers import CONTENT_TYPE
from depois_stream.contract.wire import (
    CONTENT_TYPE_BINARY, CONTENT_TYPE_JSON, Dtype, Encoding, encode_batch, encode_sample,
)

Attack = Callable[[attacks.Labeled, float, int], attacks.PoisonedStream]
Split = Literal["train", "test"]

ATTACKS: dict[str, Attack] = {
    "random-flip": attacks.random_flip,
    "systematic-shift": attacks.systematic_shift,
    "targeted-flip": attacks.targeted_flip,
    "backdoor": attacks.backdoor_patch,
    "ood": attacks.ood_injection,
}
LABEL_FLIPS = frozenset({"random-flip", "systematic-shift"})  # a poison = another class's label


@dataclass(frozen=True)
class SampleSet:
    """What gets published: float32 images [N, C, H, W] in [0, 1], int64 labels, a name."""

    images: np.ndarray
    labels: np.ndarray
    name: str
    num_classes: int


@dataclass(frozen=True)
class OutgoingRecord:
    key: str
    value: bytes
    content_type: str


class Manifest(BaseModel):
    """Ground truth of one published stream, written beside it as JSON."""

    topic: str
    source: str
    attack: str | None
    rate: float
    seed: int
    encoding: Encoding
    dtype: Dtype
    sent: int
    samples: int
    poisoned_ids: list[str]
    malformed: dict[str, str]  # id -> the DLQ reason the consumer must report

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.model_dump_json(indent=2))
        return p

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        return cls.model_validate_json(Path(path).read_text())


def load_samples(dataset: str = "digits", split: Split = "test", npz: Path | None = None,
                 data_dir: Path | None = None) -> SampleSet:
    """The samples to publish: an ``.npz`` with ``images`` and ``labels``, or a named data set
    (``depois_stream.sim.datasets``: digits is bundled with scikit-learn, the others are files).

    The ``.npz`` goes through ``read_npz``, the reader every user array goes through, so what is
    published follows the contract's array rules (``contract.arrays``): a file that breaks them
    (float labels, which a cast would truncate, pixels outside [0, 1], a single ``.npy`` array,
    labels shaped [N, 1], ...) raises ``DatasetError`` in one line before anything is sent. The
    model is not known here: the class count is the largest label + 1, the most the file itself
    says about it.
    """
    if npz is not None:
        own = read_npz(npz)
        return SampleSet(own.images, own.labels, Path(npz).name, int(own.labels.max()) + 1)
    splits = load_dataset(dataset, data_dir=data_dir)
    part = splits.train if split == "train" else splits.test
    return SampleSet(part.images, part.labels, f"{splits.name}/{split}", splits.num_classes)


def poison(data: SampleSet, attack: Attack | None, rate: float, seed: int) -> attacks.PoisonedStream:
    """Apply ``attack`` (None = publish the data unchanged, with an all-false poison mask)."""
    if attack is None:
        return attacks.PoisonedStream(data.images, data.labels, np.zeros(len(data.labels), bool),
                                      attack="none")
    return attack(data, rate, seed)


def attack_by_name(name: str, num_classes: int) -> Attack:
    """Look up an attack, binding the class count for the label-flipping ones; ValueError for a
    name not in ATTACKS or a label flip on fewer than 2 classes."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if name in LABEL_FLIPS and num_classes < 2:
        # with one class there is no other label: random-flip cannot draw one, and
        # systematic-shift would "poison" a sample by giving it its own label back
        raise ValueError(f"{name} needs at least 2 classes to flip labels between; the data has "
                         f"{num_classes} (every label is {num_classes - 1})")
    fn = ATTACKS[name]
    if name in ("random-flip", "systematic-shift", "ood"):
        return functools.partial(fn, num_classes=num_classes)
    return fn


def malformed_records(n: int, shape: tuple[int, int, int], num_classes: int,
                      seed: int = 0) -> list[tuple[OutgoingRecord, str]]:
    """``n`` records the consumer must dead-letter, each with the reason it should give.

    They cycle through the mistakes real producers make, so a demo run shows several
    ``error_class`` values rather than one.
    """
    rng = np.random.default_rng(seed)
    good = rng.random(shape, dtype=np.float32)
    wrong_shape = rng.random((shape[0], shape[1] + 1, shape[2]), dtype=np.float32)
    with_nan = good.copy()
    with_nan.flat[0] = np.nan
    kinds: list[tuple[str, Callable[[str], tuple[bytes, str]]]] = [
        ("malformed", lambda i: (b'{"id": "' + i.encode() + b'", "label": ', CONTENT_TYPE_JSON)),
        ("size_mismatch", lambda i: (encode_sample(i, good, 0, encoding="binary")[0][:-3],
                                     CONTENT_TYPE_BINARY)),
        ("shape_mismatch", lambda i: encode_sample(i, wrong_shape, 0)),
        ("label_out_of_range", lambda i: encode_sample(i, good, num_classes, encoding="binary")),
        ("non_finite", lambda i: encode_sample(i, with_nan, 0, dtype="float32")),
        ("unsupported_content_type", lambda i: (b"1,2,3", "text/csv")),
    ]
    out = []
    for k in range(n):
        reason, make = kinds[k % len(kinds)]
        key = f"malformed-{k:04d}"
        value, ct = make(key)
        out.append((OutgoingRecord(key, value, ct), reason))
    return out


def build_records(data: SampleSet, stream: attacks.PoisonedStream, *, encoding: Encoding = "binary",
                  dtype: Dtype = "uint8", malformed: int = 0,
                  seed: int = 0) -> tuple[list[OutgoingRecord], dict[str, str]]:
    """Encode the stream in order and splice the malformed records in at random positions."""
    ids = [f"{data.name.replace('/', '-')}-{k:05d}" for k in range(len(stream.labels))]
    encoded = encode_batch(ids, stream.images, stream.labels, encoding=encoding, dtype=dtype,
                           source=data.name)
    records = [OutgoingRecord(i, v, ct) for i, (v, ct) in zip(ids, encoded)]
    bad = malformed_records(malformed, tuple(stream.images.shape[1:]), data.num_classes, seed)
    positions = np.random.default_rng(seed).integers(0, len(records) + 1, size=len(bad))
    for pos, (rec, _) in sorted(zip(positions.tolist(), bad), key=lambda t: -t[0]):
        records.insert(pos, rec)
    return records, {rec.key: reason for rec, reason in bad}


def send_records(bootstrap_servers: str, topic: str, records: list[OutgoingRecord], *,
                 kafka: dict[str, Any] | None = None) -> int:
    """Send every record (acks=all) and flush; raise if any send failed, so a partial
    publish never passes for a complete one."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5,
                             client_id="depois-produce", **(kafka or {}))
    try:
        futures = [producer.send(topic, key=r.key.encode("utf-8"), value=r.value,
                                 headers=[(CONTENT_TYPE, r.content_type.encode("utf-8"))])
                   for r in records]
        producer.flush()
    finally:
        producer.close()
    errors = [f.exception for f in futures if f.failed()]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(records)} records were not delivered to "
                           f"{topic!r}; first error: {errors[0]!r}")
    return len(records)


def produce(bootstrap_servers: str, topic: str, data: SampleSet, *, attack: Attack | None = None,
            rate: float = 0.0, seed: int = 0,
            encoding: Encoding = "binary", dtype: Dtype = "uint8", malformed: int = 0,
            limit: int | None = None, partitions: int | None = None,
            kafka: dict[str, Any] | None = None) -> Manifest:
    """Poison, encode and publish ``data``; returns the manifest of what was sent.

    ``partitions`` creates the topic first when it does not exist (the local broker cannot add
    partitions later, and its auto-created topics get its own default count).
    """
    if partitions is not None:
        from depois_stream.sim.broker import create_topics

        create_topics(bootstrap_servers, [topic], partitions=partitions)
    if limit is not None:
        data = SampleSet(data.images[:limit], data.labels[:limit], data.name, data.num_classes)
    stream = poison(data, attack, rate, seed)
    records, bad = build_records(data, stream, encoding=encoding, dtype=dtype,
                                 malformed=malformed, seed=seed)
    sent = send_records(bootstrap_servers, topic, records, kafka=kafka)
    sample_ids = [r.key for r in records if r.key not in bad]
    return Manifest(
        topic=topic, source=data.name, attack=None if attack is None else stream.attack,
        rate=0.0 if attack is None else rate, seed=seed, encoding=encoding, dtype=dtype, sent=sent,
        samples=len(sample_ids),
        poisoned_ids=[i for i, p in zip(sample_ids, stream.is_poison.tolist()) if p],
        malformed=bad,
    )
