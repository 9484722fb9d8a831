"""Checking a feed release's signature in the Python client, with ``cryptography`` alone.

The same rules as ``audit/release_signature.py`` (which the ``queries`` package may not
import): the signature text is ``<key name> <base64(key id || Ed25519 signature)>``
over the release's canonical bytes — ``json.dumps(document, sort_keys=True,
separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` in UTF-8, which the
server serves verbatim. The verifier key is ``name+keyid+base64(0x01 || public key)``
as ``civicdp audit public-key`` prints it; the key id is the first four bytes of
``SHA-256(name || 0x0A || 0x01 || public key)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


class SignatureInvalid(ValueError):
    """A release whose signature does not verify with the given key (or a malformed key or signature)."""


def _verifier(text: str) -> tuple[str, bytes, Ed25519PublicKey]:
    parts = text.strip().split("+", 2)
    if len(parts) != 3 or not parts[0]:
        raise SignatureInvalid("a public key looks like 'name+1a2b3c4d+AbC...=' (civicdp audit public-key)")
    name, hex_id, encoded = parts
    try:
        raw = base64.b64decode(encoded, validate=True)
        claimed = bytes.fromhex(hex_id)
    except (binascii.Error, ValueError):
        raise SignatureInvalid("the public key's id must be hex and its key base64") from None
    if len(raw) != 33 or raw[:1] != b"\x01":
        raise SignatureInvalid("the public key is not an Ed25519 verifier key")
    key_id = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if claimed != key_id:
        raise SignatureInvalid("the public key's id does not match its name and key (altered or mistyped)")
    return name, key_id, Ed25519PublicKey.from_public_bytes(raw[1:])


def check_release(data: bytes, signature_text: str, public_key: str) -> None:
    """Raise :class:`SignatureInvalid` unless ``signature_text`` signs ``data`` under ``public_key``."""
    name, key_id, public = _verifier(public_key)
    parts = signature_text.strip().split(" ")
    try:
        raw = base64.b64decode(parts[-1], validate=True) if len(parts) == 2 else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 68:
        raise SignatureInvalid("the release signature is malformed (expected '<key name> <base64>')")
    if parts[0] != name or raw[:4] != key_id:
        raise SignatureInvalid(f"the release was signed by key {parts[0]}+{raw[:4].hex()}, not by {name}+{key_id.hex()}")
    try:
        public.verify(raw[4:], data)
    except InvalidSignature:
        raise SignatureInvalid("the release's signature does not match its bytes: it was changed after "
                               "the server signed it, or signed by another key") from None
