"""depois-train's command line: every expected failure is one line and a documented exit code,
checked before any long work; fit and all share one declaration of every setting."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import EXIT_CODES, EXIT_DATA, EXIT_USAGE, app
from training.config import FitConfig

pytestmark = pytest.mark.serial  # a refusal must come within 10 s, before any training


def _run(args: list[str]):
    started = time.perf_counter()
    result = CliRunner().invoke(app, args)
    return result, time.perf_counter() - started


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_export_onnx_without_a_trained_detector_says_how_to_get_one(tmp_path: Path) -> None:
    result, _ = _run(["export-onnx", "--out", str(tmp_path / "nowhere" / "run")])
    _one_line_error(result, EXIT_USAGE, "no trained detector", "depois-train fit --out")


def test_all_refuses_an_unknown_quantize_value_before_training(tmp_path: Path) -> None:
    result, seconds = _run(["all", "--quantize", "foo", "--out", str(tmp_path / "out")])
    assert result.exit_code == EXIT_USAGE and "--quantize" in result.output
    assert seconds < 10 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--target-fpr", "2"], "--target-fpr"),
    (["--trusted-fraction", "0"], "--trusted-fraction"),
    (["--dataset", "cifar"], "unknown data set"),
    (["--members", "critic,oracle"], "--members"),
    (["--folds", "0"], "--folds"),
])
def test_fit_rejects_bad_option_values_in_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    result, seconds = _run(["fit", "--out", str(tmp_path / "out"), *args])
    _one_line_error(result, EXIT_USAGE, needle)
    assert seconds < 10 and not (tmp_path / "out").exists()


def test_fit_reports_missing_data_files_as_a_data_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result, _ = _run(["fit", "--dataset", "mnist", "--data-dir", str(empty), "--offline", "--out", str(tmp_path / "o")])
    _one_line_error(result, EXIT_DATA, "train-images-idx3-ubyte.gz")


def test_fit_refuses_an_output_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    result, _ = _run(["fit", "--out", str(target), "--device", "cpu"])
    _one_line_error(result, EXIT_USAGE, "not a folder")


def test_fit_refuses_more_folds_than_trusted_samples(tmp_path: Path) -> None:
    result, _ = _run(["fit", "--trusted-fraction", "0.005", "--folds", "20", "--device", "cpu",
                      "--out", str(tmp_path / "o")])
    _one_line_error(result, EXIT_USAGE, "--trusted-fraction")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a host without CUDA")
def test_fit_refuses_cuda_on_a_host_without_it(tmp_path: Path) -> None:
    result, _ = _run(["fit", "--device", "cuda", "--out", str(tmp_path / "o")])
    _one_line_error(result, EXIT_USAGE, "--device cpu")


def test_export_onnx_reports_an_unreadable_detector_as_a_data_error(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "detector"
    folder.mkdir(parents=True)
    (folder / "detector.json").write_text("{}")
    (folder / "detector.pt").write_bytes(b"not torch")
    result, _ = _run(["export-onnx", "--out", str(tmp_path / "run")])
    _one_line_error(result, EXIT_DATA, "cannot read the detector")


@pytest.mark.parametrize(("args", "needle"), [
    (["--rates", "abc"], "--rates"),
    (["--rates", "1.5"], "--rates"),
    (["--seeds", "x"], "--seeds"),
    (["--dataset", "cifar"], "unknown data set"),
    (["--attacks", "random_flip,teleport"], "teleport"),
    (["--attacks", "heldout,teleport"], "teleport"),
    (["--detector-dir", "/nonexistent/detector"], "no trained detector"),
])
def test_evaluate_rejects_bad_options_in_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    result, seconds = _run(["evaluate", "--out", str(tmp_path / "eval"), *args])
    _one_line_error(result, EXIT_USAGE, needle)
    assert seconds < 10


def test_help_documents_every_exit_code() -> None:
    result, _ = _run(["--help"])
    text = " ".join(result.output.split())
    for code in EXIT_CODES:
        assert f"{code} =" in text


def test_fit_and_all_take_every_fit_config_field_once_with_its_default() -> None:
    """One source of truth: each FitConfig field is an option of both commands, with the
    field's own default (``--out`` aside, whose CLI default is a folder)."""
    from typer.main import get_command

    click_app = get_command(app)
    for name in ("fit", "all"):
        params = {p.name: p for p in click_app.commands[name].params}
        for field, info in FitConfig.model_fields.items():
            assert field in params, f"{name} lacks {field}"
            default = info.default if not isinstance(info.default, tuple) else ",".join(info.default)
            if field != "out_dir":
                assert params[field].default == default, (name, field)
            assert (info.description or "") in (params[field].help or "")
    extra = {p.name for p in click_app.commands["all"].params} - set(FitConfig.model_fields)
    assert extra == {"quantize", "sign_key"}


def test_layout_baseline_rename_export_signature_and_no_import_cycle() -> None:
    import training.baselines as baselines
    from training.export import export_onnx

    assert hasattr(baselines, "Baseline") and not hasattr(baselines, "Scorer")
    assert "quantize" not in inspect.signature(export_onnx).parameters
    code = "import sys, training.eval_report; assert 'training.evaluate' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_bad_signing_key_is_refused_before_training(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    result, seconds = _run(["all", "--sign-key", str(key), "--out", str(tmp_path / "out")])
    _one_line_error(result, EXIT_USAGE, "--sign-key", "not a PEM private key")
    assert seconds < 10 and not (tmp_path / "out" / "detector").exists()


def test_a_class_left_out_of_a_fold_is_told_to_use_more_folds_not_fewer(tmp_path: Path) -> None:
    """The helper's case: 3 % of digits' train split in 2 folds leaves a class without a training
    sample in one fold; the message said "lower --folds", which makes it worse (the same pool
    trains with the default 10 folds)."""
    result, _ = _run(["fit", "--dataset", "digits", "--trusted-fraction", "0.03", "--seed", "7",
                      "--folds", "2", "--device", "cpu", "--out", str(tmp_path / "o")])
    _one_line_error(result, EXIT_USAGE, "raise --trusted-fraction or --folds")


def test_a_class_with_one_trusted_sample_is_told_only_to_raise_the_pool(tmp_path: Path) -> None:
    """Its one sample calibrates some fold whatever --folds is, so "or --folds" would send the
    user round in circles (review of the fix above)."""
    result, _ = _run(["fit", "--dataset", "digits", "--trusted-fraction", "0.02", "--seed", "1",
                      "--device", "cpu", "--out", str(tmp_path / "o")])
    _one_line_error(result, EXIT_USAGE, "raise --trusted-fraction (a class has 1 trusted sample)")
    assert "--folds" not in result.output
