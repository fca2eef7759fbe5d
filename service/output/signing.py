"""Sign a checkpoint directory, and verify it, with the OpenSSF `model-signing` library.

One signature (`model.sig`, the library's standard format: a Sigstore bundle holding a DSSE
envelope over an in-toto statement that lists the sha256 of every file) covers every file of
the directory: weights, mask, report, card, tokenizer, plots. It is written beside them, after
the checkpoint is complete and before it is published, so the published repo carries it and a
file added, removed or changed after the job no longer verifies.

Key-based signing only (an operator's elliptic-curve PEM key, `HARMPRUNE_SIGNING_KEY`): it works
offline, and the signer's identity is the sha256 of the public key (the fingerprint the library
itself records in the bundle as the key hint). Sigstore keyless signing is not wired in.

The private key's path and contents never enter a report, a log or an error message.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from harmprune.errors import HarmpruneError
from harmprune.output.publishing import JOB_MARKER
from harmprune.vocabulary import SIGNATURE_FILE

KEY_IDENTITY_PREFIX = "ecdsa-key sha256:"


class SigningError(HarmpruneError):
    """The signing key cannot be used (the operator's configuration)."""

    stage = "save"
    code = "signing_failed"
    user_error = True


def _load_private_key(key_path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = Path(key_path).read_bytes()
    except OSError as err:
        # Only the file name, never the key's contents; the reason from the OS.
        raise SigningError(
            f"signing key {Path(key_path).name} cannot be read: {err.strerror}"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningError(
            f"signing key {Path(key_path).name} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise SigningError(
            f"signing key {Path(key_path).name} must be an elliptic-curve key on P-256, P-384 "
            "or P-521 (what model-signing signs with)"
        )
    return key


def public_key_pem(key_path: Path) -> bytes:
    """The public half of the private key at `key_path`, PEM SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    return bytes(
        _load_private_key(key_path)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def fingerprint(public_pem: bytes) -> str:
    """The key's identity: sha256 of its PEM SubjectPublicKeyInfo, as model-signing's key hint."""
    return KEY_IDENTITY_PREFIX + hashlib.sha256(public_pem).hexdigest()


def signer_identity(key_path: Path) -> str:
    """The identity a signature made with `key_path` will carry; checks the key is usable."""
    return fingerprint(public_key_pem(key_path))


def _hashing_config(allow_symlinks: bool = False) -> Any:
    import model_signing

    # git files are not signed (a Hub repo gains a .gitattributes of its own): the library's
    # default; nor the local publisher's job-id marker, written beside the files when they are
    # published. Both are recorded in the signed manifest, so the library's verifier agrees.
    return (
        model_signing.hashing.Config()
        .set_ignored_paths(paths=[SIGNATURE_FILE, JOB_MARKER], ignore_git_paths=True)
        .set_allow_symlinks(allow_symlinks)
    )


def sign_checkpoint(directory: Path, key_path: Path) -> str:
    """Write `directory/model.sig` over every other file of `directory`; return the identity."""
    import model_signing

    identity = signer_identity(key_path)
    (
        model_signing.signing.Config()
        .set_hashing_config(_hashing_config())
        .use_elliptic_key_signer(private_key=key_path)
        .sign(directory, directory / SIGNATURE_FILE)
    )
    return identity


def signature_statement(signature: Path) -> dict[str, Any]:
    """The signed statement (unverified) and the key hint of a signature file: what it claims."""
    bundle = json.loads(signature.read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    hint = bundle.get("verificationMaterial", {}).get("publicKey", {}).get("hint")
    return {"statement": payload, "key_hint": hint}


def verify_checkpoint(
    directory: Path, public_key: Path, *, allow_symlinks: bool = False
) -> list[str]:
    """Verify `directory` against its `model.sig` with `public_key`; return the problems
    (empty: every file is signed, none is missing, none is added, none changed).

    `allow_symlinks`: a Hub cache snapshot is a tree of links to blobs; the links are followed."""
    import model_signing

    signature = directory / SIGNATURE_FILE
    if not signature.is_file():
        return [f"no {SIGNATURE_FILE}: the checkpoint is unsigned"]
    try:
        config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    except (ValueError, TypeError, OSError) as err:
        return [f"the public key cannot be used: {type(err).__name__}: {err}".splitlines()[0]]
    if allow_symlinks:
        config.set_hashing_config(_hashing_config(allow_symlinks=True))
    try:
        config.verify(directory, signature)
    except ValueError as err:
        text = str(err)
        if text.startswith("Signature mismatch: "):
            # The signature itself verified; the files differ from what it lists. The library's
            # message prints raw digests: say which files, in words.
            return manifest_diff(directory, signature) or [text]
        return [f"signature does not verify: {text}"]
    except Exception as err:  # the library's crypto and format errors: all mean "not valid"
        return [f"signature does not verify: {type(err).__name__}: {err}".rstrip(": ")]
    return []


def manifest_diff(directory: Path, signature: Path) -> list[str]:
    """Which files differ from the ones the (verified) signature lists: changed, added, missing."""
    from harmprune.vocabulary import sha256_file

    predicate = signature_statement(signature)["statement"]["predicate"]
    signed = {r["name"]: r["digest"] for r in predicate["resources"]}
    ignored = {str(p) for p in predicate["serialization"].get("ignore_paths", [])}
    actual = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and not ({rel, rel.split("/")[0]} & ignored):
            actual[rel] = sha256_file(path)
    changed = sorted(n for n in set(signed) & set(actual) if signed[n] != actual[n])
    added, missing = sorted(set(actual) - set(signed)), sorted(set(signed) - set(actual))
    return [
        f"{label}: {', '.join(names)}"
        for label, names in (
            ("changed after signing", changed),
            ("added after signing", added),
            ("missing since signing", missing),
        )
        if names
    ]
