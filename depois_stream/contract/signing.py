"""Signed models: prove that the detector the runtime loads is the one the training team signed.

The model card's sha256 catches a flipped byte, but anyone who can write the model folder can
rewrite the card too (edit the boundary, swap the weights, recompute the sha). A signature made
with a key the writer does not hold closes that gap. The format is the OpenSSF model-signing one
(PyPI ``model-signing``): a Sigstore bundle whose DSSE envelope carries an in-toto statement
listing every signed file with its sha256. Key-based signing (elliptic curve, e.g. a prime256v1
key from ``openssl ecparam``) works offline; the same format carries keyless Sigstore signatures
for users who are online (not wired here).

What is signed, exactly: the model file and its card (``model.onnx`` + ``model.card.json``, see
``contract.card_path_for``), the two files the runtime loads, and nothing else in the folder (a
README beside them may change freely; a signature covering any other set of files is refused).
The signature lives beside the model as ``<stem>.sig`` (``model.sig``) unless a path is given.
The bundle is standard: ``model_signing verify key --signature model.sig --public_key KEY.pub
--ignore_unsigned_files FOLDER`` checks it without this package.

Time of check vs time of use: ``verify_model`` reads each file ONCE, verifies a private copy of
those bytes with model-signing and returns the bytes and their sha256 (``VerifiedModel``). The
loader must build its session from ``VerifiedModel.model_bytes`` (onnxruntime accepts bytes) and
parse the card from ``card_bytes``, or at least compare its own sha256 with the verified one
(``VerifiedModel.check``); re-reading the path after verification would let a swap in between
slip through.

``model-signing`` is optional (``pip install 'depois-stream[signing]'``): importing this module
never needs it; signing or verifying without it raises ``SignatureError`` saying what to install.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from depois_stream.contract.files import read_small
from depois_stream.contract import ModelCard, card_path_for
from depois_stream.contract.model import first_line

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'depois-stream[signing]'"
KEYGEN_HINT = ("make a key pair with `openssl ecparam -name prime256v1 -genkey -noout -out "
               "signing-key.pem && openssl ec -in signing-key.pem -pubout -out signing-key.pub`")
# The curves model-signing accepts (it follows Sigstore's protobuf specs).
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")

FailureKind = Literal["unavailable", "key", "unsigned", "missing", "card", "malformed",
                      "wrong_key", "modified", "scope", "invalid"]


class SignatureError(ValueError):
    """A model that must not be loaded (or cannot be signed); the message says what to fix.

    ``kind`` is a bounded code for logs and tests: unavailable (model-signing not installed),
    key (unreadable or unsupported key file), unsigned (no signature file), missing (model or
    card absent), card (signing: the card is invalid or does not match the model), malformed (the signature file is not a model-signing bundle), wrong_key
    (signed with another key), modified (a signed file changed since signing), scope (the
    signature covers other files than the model and its card), invalid (the signature itself
    does not verify: altered bundle).
    """

    def __init__(self, message: str, kind: FailureKind) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind


def signature_path_for(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.sig`` (same folder; one signature covers model and card)."""
    p = Path(model_path)
    return p.with_name(p.stem + ".sig")


@dataclass(frozen=True)
class VerifiedModel:
    """The bytes that were verified, so the loader uses exactly those (no re-read).

    ``key_id`` is the sha256 of the public key (PEM SubjectPublicKeyInfo), the same value
    model-signing records as the bundle's key hint.
    """

    model_path: Path
    card_path: Path
    signature_path: Path
    model_sha256: str
    card_sha256: str
    key_id: str
    model_bytes: bytes = field(repr=False)
    card_bytes: bytes = field(repr=False)

    def check(self, model_sha256: str, card_sha256: str | None = None) -> None:
        """Raise ``SignatureError`` unless the loader's own hashes are the verified ones.

        For a loader that reads the files again instead of using ``model_bytes``: a file
        swapped between verification and load is refused here."""
        if model_sha256 != self.model_sha256:
            raise SignatureError(
                f"{self.model_path.name} changed between signature verification and load "
                f"(sha256 {model_sha256[:12]}… vs verified {self.model_sha256[:12]}…): replace "
                "model files by atomic rename of the whole set, then reload", "modified")
        if card_sha256 is not None and card_sha256 != self.card_sha256:
            raise SignatureError(
                f"{self.card_path.name} changed between signature verification and load "
                f"(sha256 {card_sha256[:12]}… vs verified {self.card_sha256[:12]}…): replace "
                "model files by atomic rename of the whole set, then reload", "modified")


# --- the bundle as read from disk (untrusted input: parsed strictly, for diagnostics only) ------

class _PublicKeyHint(BaseModel):
    hint: str = ""


class _VerificationMaterial(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    public_key: _PublicKeyHint | None = Field(None, alias="publicKey")


class _DsseEnvelope(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    payload: str
    payload_type: str = Field(alias="payloadType")


class _Bundle(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    verification_material: _VerificationMaterial = Field(alias="verificationMaterial")
    dsse_envelope: _DsseEnvelope = Field(alias="dsseEnvelope")


class _Resource(BaseModel):
    name: str
    algorithm: str
    digest: str


class _Predicate(BaseModel):
    resources: list[_Resource]


class _Statement(BaseModel):
    predicate: _Predicate


def _read_bundle(signature_path: Path) -> tuple[str, dict[str, _Resource]]:
    """(key hint, signed resources by file name) from a bundle, or ``SignatureError``.

    Nothing here is trusted: model-signing decides; this only explains its refusals."""
    try:
        bundle = _Bundle.model_validate_json(read_small(signature_path))
        statement = _Statement.model_validate_json(base64.b64decode(bundle.dsse_envelope.payload))
    except OSError as exc:
        raise SignatureError(f"signature file {signature_path} cannot be read: {exc.strerror}",
                             "malformed") from exc
    except (ValidationError, ValueError, binascii.Error) as exc:
        raise SignatureError(
            f"signature file {signature_path} is not a model-signing bundle: sign the model "
            "again with `depois-train export-onnx --sign-key KEY` (or "
            "depois_stream.contract.signing.sign_model)", "malformed") from exc
    hint = bundle.verification_material.public_key.hint if (
        bundle.verification_material.public_key) else ""
    return hint, {r.name: r for r in statement.predicate.resources}


# --- keys --------------------------------------------------------------------------------------

def _require_model_signing(action: str) -> Any:
    try:
        import model_signing  # type: ignore[import-untyped]
    except ImportError as exc:
        raise SignatureError(
            f"{action} needs the model-signing package, which is not installed: {INSTALL_HINT}",
            "unavailable") from exc
    return model_signing


def _check_curve(key: Any, path: Path, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        raise SignatureError(f"{what} {path} is not an elliptic-curve key "
                             f"({type(key).__name__}); {KEYGEN_HINT}", "key")
    if key.curve.name not in SUPPORTED_CURVES:
        raise SignatureError(f"{what} {path} uses curve {key.curve.name}, model-signing accepts "
                             f"{', '.join(SUPPORTED_CURVES)}; {KEYGEN_HINT}", "key")


def key_id(public_key_path: str | Path) -> str:
    """sha256 of the public key in PEM SubjectPublicKeyInfo form (model-signing's key hint)."""
    path = Path(public_key_path)
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:
        raise SignatureError(f"reading public keys needs cryptography: {INSTALL_HINT}",
                             "unavailable") from exc
    try:
        data = read_small(path)
    except OSError as exc:
        raise SignatureError(f"public key {path} cannot be read: {exc.strerror}", "key") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        private = b"PRIVATE KEY" in data
        raise SignatureError(
            f"public key {path} is not a PEM public key"
            + (" (it is a PRIVATE key: never ship that to the consumers; derive the public one "
               "with `openssl ec -in KEY -pubout -out KEY.pub`)" if private else f"; {KEYGEN_HINT}"),
            "key") from exc
    _check_curve(key, path, "public key")
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def check_private_key(path: str | Path, password: str | None = None) -> None:
    """Raise SignatureError unless ``path`` is a readable elliptic-curve private key that
    model-signing accepts (a signing command checks this before any long work)."""
    path = Path(path)
    from cryptography.hazmat.primitives import serialization

    try:
        data = read_small(path)
    except OSError as exc:
        raise SignatureError(f"signing key {path} cannot be read: {exc.strerror}", "key") from exc
    try:
        key = serialization.load_pem_private_key(
            data, password.encode() if password is not None else None)
    except TypeError as exc:  # encrypted without a password, or a password for a plain key
        raise SignatureError(f"signing key {path}: {exc} (pass the key's password, or none for "
                             "an unencrypted key)", "key") from exc
    except ValueError as exc:
        raise SignatureError(f"signing key {path} is not a PEM private key or the password is "
                             f"wrong; {KEYGEN_HINT}", "key") from exc
    _check_curve(key, path, "signing key")


# --- files -------------------------------------------------------------------------------------

def _read_pair(model_path: Path) -> tuple[Path, bytes, Path, bytes]:
    card_path = card_path_for(model_path)
    for path, what in ((model_path, "model file"), (card_path, "model card")):
        if not path.is_file():
            raise SignatureError(
                f"{what} {path} does not exist: a signature covers the model and its card "
                "together, copy both (`depois-train export-onnx` writes both)", "missing")
    return model_path, model_path.read_bytes(), card_path, card_path.read_bytes()


def _write_private_copy(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` into ``folder/name`` (0700), the only files model-signing will see."""
    target = folder / name
    target.mkdir(mode=0o700)
    for fname, data in files.items():
        (target / fname).write_bytes(data)
    return target


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- public API --------------------------------------------------------------------------------

def sign_model(model_path: str | Path, private_key_path: str | Path,
               signature_path: str | Path | None = None, password: str | None = None) -> Path:
    """Sign the model file and its card with an elliptic-curve private key; return the signature.

    Refuses a pair whose card does not match the model (signing it would bless a broken or
    tampered export). The bytes are read once and signed from a private copy, so the signature
    covers exactly what was checked; the signature file is replaced atomically, so a consumer
    hot-reloading never sees half a signature.
    """
    model_path = Path(model_path)
    private_key_path = Path(private_key_path)
    sig_path = Path(signature_path) if signature_path else signature_path_for(model_path)
    ms = _require_model_signing("signing a model")
    check_private_key(private_key_path, password)
    model_path, model_bytes, card_path, card_bytes = _read_pair(model_path)
    try:
        card = ModelCard.model_validate_json(card_bytes)
    except ValidationError as exc:
        raise SignatureError(f"model card {card_path} is not valid ({exc.error_count()} errors): "
                             "re-export the model with `depois-train export-onnx`", "card") from exc
    if card.onnx_sha256 != _sha(model_bytes):
        raise SignatureError(
            f"model card {card_path.name} expects sha256 {card.onnx_sha256[:12]}… but "
            f"{model_path.name} has {_sha(model_bytes)[:12]}…: refusing to sign a model and card "
            "that disagree; re-export them together", "card")
    with tempfile.TemporaryDirectory(prefix="depois-sign-") as tmp:
        folder = _write_private_copy(Path(tmp), model_path.parent.resolve().name or "model",
                                     {model_path.name: model_bytes, card_path.name: card_bytes})
        out = Path(tmp) / "model.sig"
        # model-signing 1.x declares the password a str but hands it to cryptography, which
        # takes bytes only: a str raised TypeError from inside it (an encrypted key never signed)
        secret = password.encode() if password is not None else None
        ms.signing.Config().use_elliptic_key_signer(
            private_key=private_key_path, password=secret).sign(folder, out)  # type: ignore[arg-type]
        sig_path.parent.mkdir(parents=True, exist_ok=True)
        staged = sig_path.with_name(f".{sig_path.name}.tmp-{os.getpid()}")
        staged.write_bytes(out.read_bytes())
        os.replace(staged, sig_path)
    log.info("signed %s and %s with key %s: %s", model_path.name, card_path.name,
             private_key_path.name, sig_path)
    return sig_path


def verify_model(model_path: str | Path, public_key_path: str | Path,
                 signature_path: str | Path | None = None) -> VerifiedModel:
    """Verify that the model and its card are exactly what the holder of the key signed.

    Returns the verified bytes and sha256s (see the module docstring for why the loader must use
    them). Raises ``SignatureError`` with one line naming the problem and the fix: model-signing
    missing, unreadable key, unsigned model, signature made with another key, a signed file
    changed since signing (named), a signature over other files, or an altered signature.
    """
    model_path = Path(model_path)
    public_key_path = Path(public_key_path)
    sig_path = Path(signature_path) if signature_path else signature_path_for(model_path)
    ms = _require_model_signing("--verify-signature")
    expected_key = key_id(public_key_path)
    model_path, model_bytes, card_path, card_bytes = _read_pair(model_path)
    if not sig_path.is_file():
        raise SignatureError(
            f"model {model_path} is unsigned: no signature file {sig_path}; sign it with "
            "`depois-train export-onnx --sign-key KEY` (or depois_stream.contract.signing.sign_model) and "
            "ship the .sig with the model, or drop --verify-signature for local use only",
            "unsigned")
    hint, resources = _read_bundle(sig_path)
    if hint and hint != expected_key:
        raise SignatureError(
            f"{sig_path.name} was signed with another key (key id {hint[:12]}…) than the public "
            f"key {public_key_path} (key id {expected_key[:12]}…): use the training team's public "
            "key, or have the model re-signed by it", "wrong_key")
    actual = {model_path.name: _sha(model_bytes), card_path.name: _sha(card_bytes)}
    if set(resources) != set(actual):
        raise SignatureError(
            f"{sig_path.name} covers {sorted(resources) or 'no files'} instead of exactly "
            f"{sorted(actual)}: sign the model with depois-stream's signer, which covers the model "
            "and its card only", "scope")
    changed = [name for name, sha in actual.items()
               if resources[name].algorithm != "sha256" or resources[name].digest != sha]
    if changed:
        raise SignatureError(
            f"{', '.join(sorted(changed))} changed since signing ({sig_path.name} was made for "
            "other bytes): restore the signed files, or re-export and re-sign the model", "modified")
    with tempfile.TemporaryDirectory(prefix="depois-verify-") as tmp:
        folder = _write_private_copy(Path(tmp), "model", {model_path.name: model_bytes,
                                                          card_path.name: card_bytes})
        try:
            ms.verifying.Config().use_elliptic_key_verifier(
                public_key=public_key_path).verify(folder, sig_path)
        except Exception as exc:  # model-signing raises ValueError, InvalidSignature, JSON errors
            raise SignatureError(
                f"{sig_path.name} does not verify with {public_key_path} "
                f"({type(exc).__name__}: {first_line(exc)[:120] or 'bad signature'}): the signature file "
                "was altered or not made for these files; re-sign the model", "invalid") from exc
    return VerifiedModel(
        model_path=model_path, card_path=card_path, signature_path=sig_path,
        model_sha256=actual[model_path.name], card_sha256=actual[card_path.name],
        key_id=expected_key, model_bytes=model_bytes, card_bytes=card_bytes)


RUN_KEY_OPTION = "--verify-signature / DEPOIS_VERIFY_SIGNATURE"  # how `depois-stream run` takes the key


def verify_or_warn(model_path: str | Path, public_key_path: str | Path | None,
                   signature_path: str | Path | None = None, *, option: str = RUN_KEY_OPTION
                   ) -> VerifiedModel | None:
    """One call for every load path (start-up, hot reload, replay rescore).

    With a public key: ``verify_model`` (raises on failure). Without one: logs, at WARNING and
    naming the file, that the model runs unsigned, so nobody mistakes a local set-up for a
    verified one, and returns ``None``. ``option``: how the calling command takes the key, for
    that warning (`run` has a flag and a variable, `replay rescore` the flag only).
    """
    if public_key_path is None:
        log.warning("model %s read WITHOUT signature verification (no %s): acceptable for "
                    "local use only", Path(model_path).name, option)
        return None
    verified = verify_model(model_path, public_key_path, signature_path)
    log.info("model %s: signature %s verified with key id %s", verified.model_path.name,
             verified.signature_path.name, verified.key_id[:12])
    return verified
