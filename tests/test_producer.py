"""The producer against the real local broker: what it publishes is what the consumer will see."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from depois_stream.cli import app
from depois_stream.sim.datasets import DatasetError
from depois_stream.sim.demo import read_records
from depois_stream.contract.headers import CONTENT_TYPE
from depois_stream.sim.producer import (
    Manifest, SampleSet, attack_by_name, build_records, load_samples, poison, produce,
)
from depois_stream.contract.wire import CONTENT_TYPE_BINARY, CONTENT_TYPE_JSON, decode_batch

pytestmark = pytest.mark.slow


def _digits(digits_arrays) -> SampleSet:
    _, _, xte, yte = digits_arrays
    return SampleSet(xte, yte, "digits/test", 10)


def test_poisoned_stream_reads_back_with_keys_types_and_ground_truth(broker, unique, digits_arrays):
    data = _digits(digits_arrays)
    manifest = produce(broker.bootstrap, unique, data, attack=attack_by_name("random-flip", 10),
                       rate=0.2, seed=3, malformed=6, partitions=2)
    assert manifest.sent == len(data.labels) + 6
    assert len(manifest.poisoned_ids) == round(0.2 * len(data.labels))
    assert set(manifest.malformed.values()) >= {"malformed", "size_mismatch", "shape_mismatch",
                                                "label_out_of_range", "non_finite"}

    records = read_records(broker.bootstrap, unique, manifest.sent)
    assert len(records) == manifest.sent
    assert {r.partition for r in records} == {0, 1}
    keys = [r.key.decode() for r in records]
    assert len(set(keys)) == len(keys)
    content_types = [dict(r.headers)[CONTENT_TYPE].decode() for r in records]
    assert content_types.count(CONTENT_TYPE_BINARY) >= len(data.labels)

    batch = decode_batch([r.value for r in records], content_types, input_shape=(1, 8, 8),
                         num_classes=10)
    assert [keys[i] for i in batch.index.tolist()] == batch.ids
    assert {keys[f.index]: f.reason for f in batch.failures} == manifest.malformed
    labels = dict(zip(batch.ids, batch.labels.tolist()))
    true_labels = {f"digits-test-{k:05d}": int(y) for k, y in enumerate(data.labels)}
    flipped = {i for i in labels if labels[i] != true_labels[i]}
    assert flipped == set(manifest.poisoned_ids)


def test_json_float32_round_trips_the_images_exactly(broker, unique, digits_arrays):
    data = _digits(digits_arrays)
    manifest = produce(broker.bootstrap, unique, data, encoding="json", dtype="float32", limit=40)
    assert manifest.poisoned_ids == [] and manifest.attack is None
    records = read_records(broker.bootstrap, unique, 40)
    assert [dict(r.headers)[CONTENT_TYPE].decode() for r in records] == [CONTENT_TYPE_JSON] * 40
    batch = decode_batch([r.value for r in records], [CONTENT_TYPE_JSON] * 40, input_shape=(1, 8, 8),
                         num_classes=10)
    order = np.argsort(batch.ids)
    np.testing.assert_array_equal(batch.images[order], data.images[:40])
    np.testing.assert_array_equal(batch.labels[order], data.labels[:40])


def test_malformed_records_are_spliced_in_without_reordering_the_samples(digits_arrays):
    data = _digits(digits_arrays)
    records, bad = build_records(data, poison(data, None, 0.0, 0), malformed=9, seed=1)
    keys = [r.key for r in records]
    assert len(records) == len(data.labels) + 9 and set(bad) <= set(keys)
    assert [k for k in keys if k not in bad] == sorted(k for k in keys if k not in bad)
    assert min(keys.index(k) for k in bad) < len(records) - 9, "all malformed records at the end"


def test_npz_source_accepts_uint8_images_without_a_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 5, 5), dtype=np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, images=images, labels=np.arange(12) % 4)
    data = load_samples(npz=path)
    assert data.images.shape == (12, 1, 5, 5) and data.num_classes == 4
    np.testing.assert_array_equal(data.images[:, 0] * 255, images.astype(np.float32))


def test_produce_command_writes_a_manifest_that_matches_the_topic(broker, unique, tmp_path):
    path = tmp_path / "manifest.json"
    result = CliRunner().invoke(app, [
        "produce", "--bootstrap-servers", broker.bootstrap, "--topic", unique,
        "--attack", "backdoor", "--rate", "0.1", "--limit", "100", "--malformed", "2",
        "--manifest", str(path),
    ])
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(path)
    assert (manifest.sent, len(manifest.poisoned_ids), manifest.attack) == (102, 10, "backdoor")
    assert json.loads(path.read_text())["topic"] == unique
    assert len(read_records(broker.bootstrap, unique, 102)) == 102


def test_produce_command_reports_an_unreachable_broker(tmp_path):
    result = CliRunner().invoke(app, [
        "produce", "--bootstrap-servers", "127.0.0.1:1", "--limit", "1",
        "--kafka", "bootstrap_timeout_ms=1000",
    ])
    assert result.exit_code == 1
    assert "127.0.0.1:1" in result.output


def test_npz_source_with_mismatched_arrays_is_refused_with_both_shapes(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match=r"3 images but labels of shape \[2\]"):
        load_samples(npz=path)
