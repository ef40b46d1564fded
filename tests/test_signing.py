"""Signed models: every way to get a model past the card check is refused by the signature.

The attacks are the ones the card's sha256 alone does not stop: a rewritten card, an ONNX file
whose metadata boundary was edited (with the card's sha recomputed to match), another model's
weights with their own valid card, a signature made with someone else's key, a forged statement,
and plainly unsigned files. Keys are real prime256v1 keys made by ``openssl ecparam``; models are
real ONNX files built by ``tests.helpers.onnx_models``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("model_signing", reason="needs the signing extra: pip install '.[signing]'")
onnx = pytest.importorskip("onnx", reason="building test models needs onnx (the train extra)")

from depois_stream.contract import ModelCard, ModelMetadata, card_path_for, sha256_file  # noqa: E402
from depois_stream.contract.signing import (  # noqa: E402
    SignatureError, key_id, sign_model, signature_path_for, verify_model, verify_or_warn,
)
from tests.helpers.onnx_models import build_centroid_model  # noqa: E402

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl makes the test keys")


def _keypair(folder: Path, name: str, curve: str = "prime256v1") -> tuple[Path, Path]:
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    # Without -noout: the file starts with an EC PARAMETERS block, as the recipe makes it.
    subprocess.run([OPENSSL, "ecparam", "-name", curve, "-genkey", "-out", str(private)],
                   check=True, capture_output=True)
    subprocess.run([OPENSSL, "ec", "-in", str(private), "-pubout", "-out", str(public)],
                   check=True, capture_output=True)
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {"team": _keypair(folder, "team"), "attacker": _keypair(folder, "attacker")}


def _data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(60) % 3
    images = (rng.random((60, 1, 8, 8)) * 0.3 + labels[:, None, None, None] * 0.3)
    return images.astype(np.float32), labels.astype(np.int64)


def _model(folder: Path, seed: int = 0, version: str = "signed-test-1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    build_centroid_model(path, *_data(seed), num_classes=3, model_version=version)
    return path


@pytest.fixture
def signed(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> Path:
    path = _model(tmp_path / "model")
    sign_model(path, keys["team"][0])
    return path


def _refused(model: Path, public: Path, kind: str, *needles: str) -> SignatureError:
    with pytest.raises(SignatureError) as info:
        verify_model(model, public)
    err = info.value
    assert err.kind == kind, str(err)
    message = str(err)
    assert "\n" not in message, "a refusal is one line"
    for needle in needles:
        assert needle in message, message
    return err


def _set_boundary_in_onnx(path: Path, boundary: float) -> None:
    """Edit the depois.boundary metadata of an ONNX file in place (graph untouched)."""
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "depois.boundary":
            prop.value = json.dumps({"global": boundary})
    onnx.save(model, str(path))


def _rewrite_card(model: Path, **metadata_changes: object) -> None:
    card_path = card_path_for(model)
    card = json.loads(card_path.read_text())
    card["onnx_sha256"] = sha256_file(model)
    card["metadata"].update(metadata_changes)
    card_path.write_text(json.dumps(card, indent=2))


# --- the accepted path ------------------------------------------------------------------------

def test_a_signed_model_verifies_and_loads_from_the_verified_bytes(
        signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    import onnxruntime as ort

    assert signature_path_for(signed) == signed.with_name("model.sig")
    assert signature_path_for(signed).is_file()
    verified = verify_model(signed, keys["team"][1])
    assert verified.model_sha256 == sha256_file(signed)
    assert verified.card_sha256 == sha256_file(card_path_for(signed))
    assert verified.model_bytes == signed.read_bytes()
    assert verified.key_id == key_id(keys["team"][1])
    verified.check(sha256_file(signed), sha256_file(card_path_for(signed)))

    session = ort.InferenceSession(verified.model_bytes, providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    card = ModelCard.model_validate_json(verified.card_bytes)
    assert card.onnx_sha256 == verified.model_sha256 and meta.model_version == "signed-test-1"
    images, labels = _data(0)
    scores = session.run(["score"], {"image": images[:4], "label": labels[:4]})[0]
    assert scores.shape == (4,)


def test_the_bundle_is_standard_model_signing_and_covers_only_model_and_card(
        signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    import model_signing

    (signed.parent / "README.md").write_text("free to change: not part of what the runtime loads")
    # model-signing's own verifier accepts it on the real folder (other files ignored) ...
    model_signing.verifying.Config().use_elliptic_key_verifier(
        public_key=keys["team"][1]).set_ignore_unsigned_files(True).verify(
        signed.parent, signature_path_for(signed))
    # ... and the statement names exactly the two files the runtime loads.
    bundle = json.loads(signature_path_for(signed).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert sorted(r["name"] for r in statement["predicate"]["resources"]) == [
        "model.card.json", "model.onnx"]
    verify_model(signed, keys["team"][1])  # the README beside it does not matter


def test_a_384_bit_key_and_an_explicit_signature_path_work(tmp_path: Path) -> None:
    private, public = _keypair(tmp_path, "p384", curve="secp384r1")
    model = _model(tmp_path / "m")
    sig = sign_model(model, private, tmp_path / "elsewhere" / "detector.sig")
    assert sig == tmp_path / "elsewhere" / "detector.sig" and not signature_path_for(model).exists()
    assert verify_model(model, public, sig).model_sha256 == sha256_file(model)


# --- refusals ----------------------------------------------------------------------------------

def test_unsigned_model_is_refused(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    model = _model(tmp_path / "model")
    _refused(model, keys["team"][1], "unsigned", "unsigned", "model.sig", "--sign-key")


def test_rewritten_card_is_refused(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    _rewrite_card(signed, boundary={"global": -99.0})  # everything would pass as clean
    ModelCard.model_validate_json(card_path_for(signed).read_text())  # a valid card, to the card check
    _refused(signed, keys["team"][1], "modified", "model.card.json changed since signing")


def test_edited_onnx_boundary_with_recomputed_card_sha_is_refused(
        signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    _set_boundary_in_onnx(signed, -99.0)
    _rewrite_card(signed, boundary={"global": -99.0})
    card = ModelCard.model_validate_json(card_path_for(signed).read_text())
    assert card.onnx_sha256 == sha256_file(signed), "the card check alone would accept this pair"
    _refused(signed, keys["team"][1], "modified", "model.card.json, model.onnx changed since signing")


def test_swapped_weights_with_their_own_valid_card_are_refused(
        signed: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    other = _model(tmp_path / "other", seed=7, version="signed-test-1")
    shutil.copyfile(other, signed)
    shutil.copyfile(card_path_for(other), card_path_for(signed))
    _refused(signed, keys["team"][1], "modified", "model.onnx", "changed since signing")


def test_wrong_public_key_is_refused(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    _refused(signed, keys["attacker"][1], "wrong_key", "another key", "attacker.pub")


def test_model_re_signed_by_someone_else_is_refused(
        signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    _rewrite_card(signed, boundary={"global": -99.0})
    sign_model(signed, keys["attacker"][0])  # the attacker can write the folder, has no team key
    _refused(signed, keys["team"][1], "wrong_key", "another key")
    # Without the key hint the names and digests all match: only the cryptography says no.
    sig = signature_path_for(signed)
    bundle = json.loads(sig.read_text())
    bundle["verificationMaterial"]["publicKey"]["hint"] = ""
    sig.write_text(json.dumps(bundle))
    _refused(signed, keys["team"][1], "invalid", "does not verify")


def test_forged_statement_is_refused(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """The attacker edits the card and writes its new digest into the team's signed statement."""
    _rewrite_card(signed, boundary={"global": -99.0})
    sig = signature_path_for(signed)
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    for resource in statement["predicate"]["resources"]:
        if resource["name"] == "model.card.json":
            resource["digest"] = hashlib.sha256(card_path_for(signed).read_bytes()).hexdigest()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))
    _refused(signed, keys["team"][1], "invalid", "does not verify")


def test_signature_over_other_files_is_refused(
        tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    import model_signing

    model = _model(tmp_path / "model")
    (model.parent / "extra.bin").write_bytes(b"more than the runtime loads")
    model_signing.signing.Config().use_elliptic_key_signer(
        private_key=keys["team"][0]).sign(model.parent, tmp_path / "model.sig")
    shutil.move(tmp_path / "model.sig", signature_path_for(model))
    _refused(model, keys["team"][1], "scope", "extra.bin")


def test_garbage_signature_file_is_refused(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signature_path_for(signed).write_text("not a bundle")
    _refused(signed, keys["team"][1], "malformed", "not a model-signing bundle")


def test_missing_card_is_refused(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    card_path_for(signed).unlink()
    _refused(signed, keys["team"][1], "missing", "model.card.json", "copy both")


@pytest.mark.parametrize("which", ["rsa", "private", "absent"])
def test_bad_public_keys_are_refused_with_one_line(
        which: str, signed: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    if which == "rsa":
        key = tmp_path / "rsa.pub"
        subprocess.run(f"{OPENSSL} genrsa 2048 2>/dev/null | {OPENSSL} rsa -pubout -out {key}",
                       shell=True, check=True, capture_output=True)
        needle = "not an elliptic-curve key"
    elif which == "private":
        key, needle = keys["team"][0], "PRIVATE key"
    else:
        key, needle = tmp_path / "nope.pub", "cannot be read"
    _refused(signed, key, "key", needle)


def test_signing_refuses_a_model_and_card_that_disagree(
        tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    model = _model(tmp_path / "model")
    _set_boundary_in_onnx(model, -99.0)  # card not updated
    with pytest.raises(SignatureError, match="refusing to sign") as info:
        sign_model(model, keys["team"][0])
    assert info.value.kind == "card" and not signature_path_for(model).exists()


def test_signing_with_a_public_key_is_refused(
        tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    model = _model(tmp_path / "model")
    with pytest.raises(SignatureError, match="not a PEM private key") as info:
        sign_model(model, keys["team"][1])
    assert info.value.kind == "key"


# --- time of check vs time of use --------------------------------------------------------------

def test_loader_hash_check_catches_a_swap_after_verification(
        signed: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    verified = verify_model(signed, keys["team"][1])
    other = _model(tmp_path / "other", seed=3)
    shutil.copyfile(other, signed)  # swapped after the check, before the loader reads it
    assert hashlib.sha256(verified.model_bytes).hexdigest() == verified.model_sha256
    with pytest.raises(SignatureError, match="changed between signature verification and load"):
        verified.check(sha256_file(signed))


# --- optional dependency and the unsigned path -------------------------------------------------

def test_without_model_signing_import_works_and_verify_says_what_to_install(
        signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    code = (
        "import sys; sys.modules['model_signing'] = None\n"
        "import depois_stream.contract.signing as s\n"
        "try:\n"
        f"    s.verify_model({str(signed)!r}, {str(keys['team'][1])!r})\n"
        "except s.SignatureError as e:\n"
        "    print(e.kind, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("unavailable ")
    assert "pip install 'depois-stream[signing]'" in out.stdout


def test_no_key_means_unsigned_and_the_log_says_so(
        signed: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="depois_stream.contract.signing"):
        assert verify_or_warn(signed, None) is None
    assert "WITHOUT signature verification" in caplog.text and "local use only" in caplog.text


def test_verify_or_warn_raises_on_a_bad_model(
        signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    assert verify_or_warn(signed, keys["team"][1]) is not None
    _rewrite_card(signed, boundary={"global": -99.0})
    with pytest.raises(SignatureError):
        verify_or_warn(signed, keys["team"][1])


# --- the runtime: start-up, hot reload and the CLI refuse what does not verify ----------------

def test_detector_loads_a_signed_model_and_refuses_an_unsigned_one(
        signed: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    from depois_stream.filter.detector import Detector, ModelLoadError

    det = Detector.load(signed, device="cpu", public_key=keys["team"][1])
    assert det.signature_key_id == key_id(keys["team"][1])
    assert Detector.load(signed, device="cpu").signature_key_id is None  # unsigned path: allowed
    unsigned = _model(tmp_path / "unsigned")
    with pytest.raises(ModelLoadError, match="unsigned") as info:
        Detector.load(unsigned, device="cpu", public_key=keys["team"][1])
    assert info.value.reason == "signature"
    with pytest.raises(ModelLoadError, match="another key") as info:
        Detector.load(signed, device="cpu", public_key=keys["attacker"][1])
    assert info.value.reason == "signature"


def test_hot_reload_keeps_the_signed_model_when_an_unsigned_one_replaces_it(
        signed: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.config import load_config
    from depois_stream.filter.reload import ModelWatcher

    flt = StreamFilter(load_config(model_path=signed, device="cpu", metrics_port=None,
                                   verify_signature=keys["team"][1]))
    reg = flt.metrics.registry
    assert reg.get_sample_value("depois_model_signature_verified") == 1
    watcher = ModelWatcher(flt.detector, flt._load_model, 0.0,
                           on_outcome=flt._reload_outcome)
    other = _model(tmp_path / "other", seed=1, version="unsigned-2")  # same folder layout
    shutil.copy(other, signed)
    shutil.copy(card_path_for(other), card_path_for(signed))
    assert watcher.poll() is None  # refused: the old signature does not cover the new bytes
    assert flt.detector.metadata.model_version == "signed-test-1"
    assert reg.get_sample_value("depois_model_rejections_total", {"reason": "signature"}) == 1
    assert reg.get_sample_value("depois_model_reloads_total", {"outcome": "rejected"}) == 1
    sign_model(signed, keys["team"][0])  # the training team signs the new model: accepted
    new = watcher.poll()
    assert new is not None and new.metadata.model_version == "unsigned-2"


def test_run_with_verify_signature_refuses_an_unsigned_model_with_exit_2(
        tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    unsigned = _model(tmp_path / "unsigned")
    proc = subprocess.run(
        [sys.executable, "-m", "depois_stream", "run", "--model-path", str(unsigned),
         "--verify-signature", str(keys["team"][1]), "--bootstrap-servers", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unsigned" in proc.stderr and "Traceback" not in proc.stderr
    assert len([l for l in proc.stderr.splitlines() if l.startswith("depois-stream")]) == 1


def test_a_bundle_model_signing_cannot_parse_is_refused_in_one_line(
        signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """A start-up fuzz run (stop 39): a bundle with an unknown mediaType passes our own reading
    of it and model-signing refuses it with a multi-line pydantic error, which was quoted whole
    (three lines on stderr)."""
    sig = signature_path_for(signed)
    bundle = json.loads(sig.read_text())
    bundle["mediaType"] = "bogus"
    sig.write_text(json.dumps(bundle))
    with pytest.raises(SignatureError) as caught:
        verify_model(signed, keys["team"][1])
    assert "\n" not in str(caught.value)


def _signed_filter(model: Path, public: Path):
    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.config import load_config

    flt = StreamFilter(load_config(model_path=model, device="cpu", metrics_port=None,
                                   verify_signature=public, reload_interval_s=0.0))
    return flt, flt._model_watcher()


def test_a_public_key_replaced_after_start_up_does_not_admit_its_signer(
        signed: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """Stop 45, a reload adversary: the key was read again at every reload, so whoever could
    write the key path got a model signed with their own key hot-loaded (signature_verified 1,
    an INFO line with a new key id). Trust is fixed at start-up; rotating keys is a restart
    (docs/operations.md)."""
    live_key = tmp_path / "live.pub"
    shutil.copy(keys["team"][1], live_key)
    flt, watcher = _signed_filter(signed, live_key)
    shutil.copy(keys["attacker"][1], live_key)
    other = _model(tmp_path / "other", seed=1, version="attacker-1")
    sign_model(other, keys["attacker"][0])
    for f in (card_path_for(other), signature_path_for(other), other):
        shutil.copy(f, signed.parent / f.name)
    assert watcher.poll() is None
    assert flt.detector.metadata.model_version == "signed-test-1"
    reg = flt.metrics.registry
    assert reg.get_sample_value("depois_model_rejections_total", {"reason": "signature"}) == 1


@pytest.mark.parametrize("change", ["card tampered", "signature deleted", "signature swapped"])
def test_a_card_or_signature_changed_beside_the_serving_model_is_flagged(
        signed: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]], change: str) -> None:
    """Stop 45, a reload adversary: with the model file unchanged the watcher looked no further,
    so a tampered card, a deleted signature or another model's signature went unnoticed (no log
    line, depois_model_file_refused 0) until the next restart refused to start. The serving model
    stays; the files on disk are flagged as refused, and cleared when they are fixed."""
    flt, watcher = _signed_filter(signed, keys["team"][1])
    reg = flt.metrics.registry
    card, sig = card_path_for(signed), signature_path_for(signed)
    good_card, good_sig = card.read_bytes(), sig.read_bytes()
    if change == "card tampered":
        _rewrite_card(signed, target_fpr=0.5)
    elif change == "signature deleted":
        sig.unlink()
    else:
        other = _model(tmp_path / "other", seed=1, version="other-1")
        sign_model(other, keys["team"][0])
        shutil.copy(signature_path_for(other), sig)
    assert watcher.poll() is None
    assert flt.detector.metadata.model_version == "signed-test-1"
    assert reg.get_sample_value("depois_model_file_refused") == 1, change
    card.write_bytes(good_card)
    sig.write_bytes(good_sig)
    assert watcher.poll() is None
    assert reg.get_sample_value("depois_model_file_refused") == 0


def test_sighup_retries_a_reload_refused_for_a_reason_outside_the_model_files(
        signed: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """Stop 45, a reload adversary: a new signed model arrived while the public key could not be
    read; once the key was back, SIGHUP did nothing (the files' stats had not changed since the
    refusal), so the old model served until someone touched a model file."""
    live_key = tmp_path / "live.pub"
    shutil.copy(keys["team"][1], live_key)
    flt, watcher = _signed_filter(signed, live_key)
    other = _model(tmp_path / "other", seed=1, version="signed-test-2")
    sign_model(other, keys["team"][0])
    live_key.chmod(0)
    if os.access(live_key, os.R_OK):  # root reads anything: a folder in its place instead
        live_key.chmod(0o644)
        live_key.unlink()
        live_key.mkdir()
    for f in (card_path_for(other), signature_path_for(other), other):
        shutil.copy(f, signed.parent / f.name)
    assert watcher.poll() is None
    assert flt.metrics.registry.get_sample_value("depois_model_file_refused") == 1
    if live_key.is_dir():
        live_key.rmdir()
    else:
        live_key.unlink()
    shutil.copy(keys["team"][1], live_key)
    assert watcher.poll() is None  # nothing about the model files changed: not looked at again
    flt.request_model_check()  # SIGHUP
    new = watcher.poll()
    assert new is not None and new.metadata.model_version == "signed-test-2"
