"""Detached Ed25519 signatures over feed releases, checked offline with the server's public key.

A feed release is a JSON document. Its **canonical bytes** are::

    json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
               allow_nan=False).encode("utf-8")

— keys sorted, no whitespace, UTF-8, and no NaN or infinity (the server writes them as
``null``). Numbers are what Python's ``json`` writes: integers as digits, floats in
their shortest round-trip form, so parsing the bytes and writing them again this way
gives the same bytes. The server stores those bytes once, signs them, and serves them
verbatim; the signature covers exactly them.

The **signature text** is one line, ``<key name> <base64(key id || signature)>``: the
signature line of a C2SP signed note (https://c2sp.org/signed-note) without its
leading em dash, so it fits an HTTP header. The key id is the first four bytes of
``SHA-256(name || 0x0A || 0x01 || public key)`` (:func:`civicdp.audit.signing.key_id`); the
signature is Ed25519 over the canonical bytes. It verifies with the verifier key that
``civicdp audit public-key`` prints (``name+keyid+base64``).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from civicdp.audit.signing import SigningKey, VerifierKey

FORMAT = "civicdp-feed-release/1"


class ReleaseSignatureError(ValueError):
    """A release or signature that does not verify; the message says what is wrong."""


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8, no NaN (raises ValueError)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sign_release(key: SigningKey, data: bytes) -> str:
    """The signature text of ``data`` (canonical bytes) made with ``key``."""
    signature = key.sign(data)
    return f"{key.name} {base64.b64encode(key.verifier.id + signature).decode()}"


def parse_signature(text: str) -> tuple[str, bytes, bytes]:
    """``(key name, key id, signature)`` of a signature text; refuses anything malformed."""
    parts = text.strip().removeprefix("\u2014 ").split(" ")
    if len(parts) != 2 or not parts[0]:
        raise ReleaseSignatureError("a release signature is one line '<key name> <base64>'")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ReleaseSignatureError("the release signature is not valid base64") from None
    if len(raw) != 4 + 64:
        raise ReleaseSignatureError("the release signature must hold a 4-byte key id and a 64-byte Ed25519 signature")
    return parts[0], raw[:4], raw[4:]


def verify_release(data: bytes, signature_text: str, key: VerifierKey) -> dict[str, Any]:
    """The release document if ``signature_text`` is ``key``'s signature over ``data``; else raises.

    ``data`` must be the bytes exactly as served: any change — of a value, a name, or
    only of the layout (re-indenting counts) — fails, with a hint when the file is no
    longer in canonical form.
    """
    name, key_id, signature = parse_signature(signature_text)
    if name != key.name or key_id != key.id:
        raise ReleaseSignatureError(f"the release was signed by key {name}+{key_id.hex()}, not by "
                                    f"{key.name}+{key.id.hex()}; check that you have the server's public key")
    if not key.verify(signature, data):
        hint = ""
        try:
            if canonical_bytes(json.loads(data)) != data:
                hint = " (the file is not in canonical form: was it re-formatted? download it again)"
        except (UnicodeDecodeError, ValueError, TypeError):
            hint = " (the file is not even valid JSON any more)"
        raise ReleaseSignatureError("the signature does not match the release: its bytes or its signature were "
                                    f"changed after the server signed them{hint}")
    document = json.loads(data)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ReleaseSignatureError("the signed bytes are not a civicdp feed release")
    return document
