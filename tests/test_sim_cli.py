"""`depois-stream produce --npz`: a file the stream filter would refuse is refused before anything
is published, in one line with exit code 2 (it once published float labels truncated, 7.7 as 7,
and answered other bad files with a Python traceback or a bare "Aborted!")."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from kafka import KafkaConsumer
from typer.testing import CliRunner

from depois_stream.cli import app

pytestmark = pytest.mark.slow  # the real local broker: a file that slips through gets published


def _images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).random((n, 8, 8), dtype=np.float32)


def _float_labels(path: Path) -> None:
    np.savez(path, images=_images(), labels=np.array([7.7, 1.0, 2.0, 3.0, 4.2]))


def _no_images(path: Path) -> None:
    np.savez(path, pixels=_images(), labels=np.arange(5))


def _single_array(path: Path) -> None:
    np.save(path, _images())


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _column_labels(path: Path) -> None:
    np.savez(path, images=_images(), labels=np.arange(5)[:, None])


def _pixels_out_of_range(path: Path) -> None:
    np.savez(path, images=_images() * 255, labels=np.arange(5))


BAD_FILES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "float labels": ("float.npz", _float_labels, "labels are float64"),
    "no images array": ("noimages.npz", _no_images, "has no 'images' and 'labels' arrays"),
    "a .npy file": ("single.npy", _single_array, "is a single array, not an .npz file"),
    "an empty file": ("empty.npz", _empty, "cannot read"),
    "labels [N, 1]": ("column.npz", _column_labels, "labels of shape [5, 1]"),
    "float pixels 0..255": ("range.npz", _pixels_out_of_range, "must be finite and scaled to [0, 1]"),
}


def _topics(bootstrap: str) -> set[str]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return consumer.topics()
    finally:
        consumer.close()


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_produce_refuses_a_bad_npz_in_one_line_with_exit_2_and_publishes_nothing(
        case: str, broker, unique: str, tmp_path: Path) -> None:
    name, write, says = BAD_FILES[case]
    path = tmp_path / name
    write(path)
    result = CliRunner().invoke(app, ["produce", "--bootstrap-servers", broker.bootstrap,
                                      "--topic", unique, "--npz", str(path)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("depois-stream produce: "), result.output
    assert str(path) in lines[0] and says in lines[0], result.output
    assert unique not in _topics(broker.bootstrap), "the refused file was published"


def test_produce_help_documents_the_exit_codes() -> None:
    result = CliRunner().invoke(app, ["produce", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Exit codes: 0" in text and "2 a flag or the data is wrong" in text, text


@pytest.mark.parametrize("attack", ["random-flip", "systematic-shift"])
def test_a_label_flip_on_one_class_is_refused_with_exit_2(attack: str, broker, unique: str,
                                                         tmp_path: Path) -> None:
    """One class leaves no other label to flip to: random-flip failed with numpy's "low >= high"
    (exit 1), systematic-shift "poisoned" samples by giving them back their own label."""
    path = tmp_path / "one-class.npz"
    np.savez(path, images=_images(), labels=np.zeros(5, np.int64))
    result = CliRunner().invoke(app, ["produce", "--bootstrap-servers", broker.bootstrap,
                                      "--topic", unique, "--npz", str(path), "--attack", attack,
                                      "--manifest", str(tmp_path / "m.json")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and f"{attack} needs at least 2 classes" in lines[0], result.output
    assert not (tmp_path / "m.json").exists()
    assert unique not in _topics(broker.bootstrap), "the stream was published"
