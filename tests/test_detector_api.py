"""The in-process API: `from depois_stream import Detector`, as in the README."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def test_readme_example_runs_on_numpy_arrays(centroid_model: Path, digits_arrays) -> None:
    from depois_stream import Detector

    _, _, xte, yte = digits_arrays
    det = Detector.load(centroid_model)
    flipped = (yte + 1) % 10
    honest, attacked = det.predict(xte, yte), det.predict(xte, flipped)
    assert attacked.poisoned.mean() > 0.6 > 0.15 > honest.poisoned.mean()
    np.testing.assert_array_equal(honest.poisoned, honest.score < honest.threshold)
    np.testing.assert_array_equal(det.score(xte, yte), honest.score)
    assert det.metadata.num_classes == 10 and det.metadata.input_shape == (1, 8, 8)
    reasons = attacked.reasons
    assert {r for r, bad in zip(reasons, attacked.poisoned) if bad} == {"below_boundary"}
    assert all(r == "" for r, bad in zip(reasons, attacked.poisoned) if not bad)


def test_uint8_and_channel_less_images_are_accepted(centroid_model: Path, digits_arrays) -> None:
    from depois_stream import Detector

    _, _, xte, yte = digits_arrays
    det = Detector.load(centroid_model)
    as_uint8 = np.round(xte[:, 0] * 255).astype(np.uint8)  # [N, H, W] 0..255
    np.testing.assert_allclose(det.predict(as_uint8, yte).score,
                               det.predict(np.round(xte * 255) / 255, yte).score, rtol=1e-5)


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((2, 1, 9, 9), np.float32), np.zeros(2, np.int64), "images must be"),
    (np.zeros((2, 1, 8, 8), np.float32), np.zeros(3, np.int64), "labels must be 2"),
    (np.zeros((2, 1, 8, 8), np.float32), np.array([0, 10]), "labels must be in 0..9"),
    (np.full((2, 1, 8, 8), 2.0, np.float32), np.zeros(2, np.int64), "scaled to"),
])
def test_bad_inputs_are_value_errors_that_say_what_to_pass(centroid_model: Path, images, labels,
                                                           message: str) -> None:
    from depois_stream import Detector

    with pytest.raises(ValueError, match=message):
        Detector.load(centroid_model).predict(images, labels)


def test_importing_the_package_loads_no_onnxruntime_until_detector_is_used() -> None:
    code = ("import sys, depois_stream, depois_stream.contract\n"
            "assert 'onnxruntime' not in sys.modules\n"
            "from depois_stream import Detector\n"
            "assert 'onnxruntime' in sys.modules and Detector.__name__ == 'Detector'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_scoring_threads_are_the_callers_choice_and_the_filters_setting(centroid_model: Path,
                                                                         digits_arrays) -> None:
    """Outside review: no way to bound onnxruntime's threads on a shared host (its default is one
    per core it sees, in a container possibly the node's). Detector.load(threads=...) and
    `depois-stream run --scorer-threads` / DEPOIS_SCORER_THREADS set them; 0 keeps the default."""
    from depois_stream import Detector
    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.config import ConfigError, load_config
    from depois_stream.filter.detector import ModelLoadError

    _, _, xte, yte = digits_arrays
    default, one = Detector.load(centroid_model), Detector.load(centroid_model, threads=1)
    assert default.session.get_session_options().intra_op_num_threads == 0
    assert one.session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_array_equal(one.predict(xte, yte).score, default.predict(xte, yte).score)
    with pytest.raises(ModelLoadError, match="threads must be 0"):
        Detector.load(centroid_model, threads=-1)
    flt = StreamFilter(load_config(model_path=centroid_model, device="cpu", metrics_port=None,
                                   scorer_threads=2))
    assert flt.detector.session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(ConfigError, match="scorer_threads"):
        load_config(model_path=centroid_model, scorer_threads=-1)


def test_uint8_images_on_a_small_scale_are_scored_but_warned_about(centroid_model: Path,
                                                                    digits_arrays) -> None:
    """Outside review: scikit-learn's digits cast to uint8 (0..16) were read as near-black 0..255
    images and every one flagged, without a word. They are still read by the contract's rule
    (uint8 is 0..255), with a warning that names the likely fix; full-range uint8 is silent."""
    import warnings

    from depois_stream import Detector
    from depois_stream.contract.arrays import LowRangeWarning

    _, _, xte, yte = digits_arrays
    det = Detector.load(centroid_model)
    with pytest.warns(LowRangeWarning, match="peak at 16.*images / 16.0"):
        det.predict(np.round(xte * 16).astype(np.uint8), yte)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.predict(np.round(xte * 255).astype(np.uint8), yte)
        det.predict(np.zeros_like(xte, dtype=np.uint8), yte)  # all black: nothing to say
