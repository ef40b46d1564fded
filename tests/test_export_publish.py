"""`depois-train export-onnx` publishes a model all or nothing, and in an order a hot-reloading
filter can never catch half-way (found by an operator walkthrough, stop 43): the model used to
land before its card and signature, so a reload in that second was rejected as a forged
signature (an alert whose runbook says "security incident"); a signing failure left the new model
beside the old signature; and a passphrase-protected key crashed inside model-signing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from depois_stream.contract import card_path_for, sha256_file
from training.cli import EXIT_REFUSED, app

pytestmark = [pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test keys")]
TINY = ["--auth-steps", "20", "--gan-steps", "20", "--critic-steps", "5", "--n-synthetic", "100"]


def _fit(tmp_path_factory: pytest.TempPathFactory, seed: int) -> Path:
    out = tmp_path_factory.mktemp(f"publish-{seed}")
    result = CliRunner().invoke(app, ["fit", "--dataset", "digits", "--device", "cpu", "--seed", str(seed),
                                      "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`depois-train fit` on digits with tiny step counts: the detector that serves."""
    return _fit(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def newer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another fit (seed 1): the new version published over the served one."""
    return _fit(tmp_path_factory, 1)


def _keys(folder: Path, password: str | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "team.pem", folder / "team.pub"
    plain = subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout"], check=True,
                           capture_output=True).stdout
    protect = ["-aes256", "-passout", f"pass:{password}"] if password else []
    subprocess.run(["openssl", "ec", "-out", str(private), *protect], input=plain, check=True, capture_output=True)
    pem = private.read_bytes() if not password else plain
    subprocess.run(["openssl", "ec", "-pubout", "-out", str(public)], input=pem, check=True, capture_output=True)
    return private, public


def _export(run: Path, model: Path, *extra: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["export-onnx", "--out", str(run), "--model", str(model), *extra], env=env)


def _served(run: Path, folder: Path, private: Path) -> Path:
    """A signed model in ``folder``, as a filter would serve it."""
    model = folder / "model.onnx"
    result = _export(run, model, "--sign-key", str(private))
    assert result.exit_code == 0, result.output
    return model


def test_a_passphrase_protected_key_signs(run: Path, tmp_path: Path) -> None:
    from depois_stream.contract.signing import verify_model

    private, public = _keys(tmp_path / "keys", password="s3cret")
    model = tmp_path / "served" / "model.onnx"
    result = _export(run, model, "--sign-key", str(private), env={"DEPOIS_SIGN_KEY_PASSWORD": "s3cret"})
    assert result.exit_code == 0, result.output
    assert verify_model(model, public).model_bytes == model.read_bytes()
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".depois-export-")]


def test_a_failed_signing_publishes_nothing(run: Path, newer: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from depois_stream.contract import signing

    private, _ = _keys(tmp_path / "keys")
    model = _served(run, tmp_path / "served", private)
    before = {p.name: p.read_bytes() for p in model.parent.iterdir()}

    def broken(*args: object, **kwargs: object) -> Path:
        raise signing.SignatureError("the signing service is down", "signature")

    monkeypatch.setattr(signing, "sign_model", broken)
    result = _export(newer, model, "--sign-key", str(private))
    assert result.exit_code == EXIT_REFUSED, result.output
    assert "nothing was published" in result.output and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in model.parent.iterdir()} == before


def test_the_model_file_lands_last_so_a_reload_never_sees_it_beside_an_old_card_or_signature(
        run: Path, newer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every rename into the served folder, a filter that reloads when the model's sha256
    changes (``filter.reload``) must find a model that loads with signature verification."""
    from depois_stream import Detector

    private, public = _keys(tmp_path / "keys")
    model = _served(run, tmp_path / "served", private)
    serving = sha256_file(model)
    real_replace, seen = os.replace, []

    def replace_and_reload(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        real_replace(src, dst)
        if Path(dst).parent != model.parent:
            return
        seen.append(Path(dst).name)
        if sha256_file(model) != serving:  # what the filter's watcher would try to load
            Detector.load(model, device="cpu", public_key=public)

    monkeypatch.setattr(os, "replace", replace_and_reload)
    result = _export(newer, model, "--sign-key", str(private))
    assert result.exit_code == 0, result.output
    assert seen == [card_path_for(model).name, "model.sig", "model.onnx"]
    assert sha256_file(model) != serving
