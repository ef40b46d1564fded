"""Errors a user meets are one line that says what to fix, with the documented exit code.

One test per row of the table in issue 14 (the training CLI's rows live in the training tests).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from depois_stream.contract import card_path_for


def _cli(*args: str, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "depois_stream", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=cwd)


def _one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "pydantic.dev" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("depois-stream")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_depois_kafka_that_is_not_json_is_exit_2(centroid_model: Path) -> None:
    env = {"DEPOIS_KAFKA": "notjson"}
    _one_line(_cli("run", "--model-path", str(centroid_model), env=env), 2, "DEPOIS_KAFKA")
    _one_line(_cli("replay", "list", env=env), 2, "DEPOIS_KAFKA")


def test_produce_refuses_an_owned_kafka_option_before_loading_data() -> None:
    proc = _cli("produce", "--kafka", "acks=1", "--bootstrap-servers", "127.0.0.1:1")
    _one_line(proc, 2, "acks", "produce itself")


def test_device_auto_on_a_cpu_host_prints_no_onnxruntime_error(centroid_model: Path) -> None:
    proc = _cli("run", "--model-path", str(centroid_model), "--bootstrap-servers", "127.0.0.1:1",
                "--startup-timeout-s", "1", "--metrics-port", "0")
    _one_line(proc, 2, "cannot use Kafka")
    assert "[E:onnxruntime" not in proc.stderr and "libcublas" not in proc.stderr


def test_a_card_that_is_not_json_or_was_edited_is_one_line(centroid_model: Path,
                                                           tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(centroid_model, model)
    card = card_path_for(model)
    card.write_text("this is not json")
    _one_line(_cli("run", "--model-path", str(model)), 2, "model card", "not valid")
    data = json.loads(card_path_for(centroid_model).read_text())
    data["metadata"]["num_classes"] = 3  # an edited class count: per-class data no longer fits
    data["metadata"]["boundary"]["per_class"] = [0.0] * 10
    card.write_text(json.dumps(data))
    _one_line(_cli("run", "--model-path", str(model)), 2, "model card", "not valid")


def test_replay_since_accepts_a_z_suffix_and_refuses_garbage() -> None:
    proc = _cli("replay", "list", "--since", "yesterday", "--bootstrap-servers", "127.0.0.1:1")
    assert proc.returncode == 2 and "yesterday" in proc.stderr and "Traceback" not in proc.stderr


def test_a_misspelt_depois_variable_is_named_at_start_up(centroid_model: Path) -> None:
    proc = _cli("run", "--model-path", str(centroid_model), "--bootstrap-servers", "127.0.0.1:1",
                "--startup-timeout-s", "1", "--metrics-port", "0",
                env={"DEPOIS_VERIFY_SIGNATUR": "/keys/team.pub"})
    assert "DEPOIS_VERIFY_SIGNATUR (did you mean DEPOIS_VERIFY_SIGNATURE?)" in proc.stderr


def test_kafka_python_without_a_codec_library_is_refused_at_start_up(centroid_model: Path,
                                                                    tmp_path: Path) -> None:
    """A broken install (a codec library missing) would stall every partition that carries such
    batches; it is refused before joining the group, naming what to install."""
    (tmp_path / "zstandard.py").write_text("raise ImportError('hidden by the test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = _cli("run", "--client", "kafka-python", "--model-path", str(centroid_model),
                "--bootstrap-servers", "127.0.0.1:1", env=env)
    _one_line(proc, 2, "zstd", "pip install 'kafka-python[lz4,snappy,zstd]'")
