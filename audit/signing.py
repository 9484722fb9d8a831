"""Ed25519 keys in the C2SP signed-note format (https://c2sp.org/signed-note).

A key has a name (the log's origin, e.g. ``civicdp.example/audit``) and an ID: the
first four bytes of ``SHA-256(name || 0x0A || 0x01 || public key)``. Its public
form, the *verifier key*, is ``<name>+<key id hex>+<base64(0x01 || public key)>``:
one line an oversight body can keep, compare and pass to ``civicdp audit verify``.

The private key is a PEM file written with mode 0600 on first use; only the server
reads it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ED25519 = b"\x01"  # signed-note signature type of Ed25519


class KeyError_(ValueError):
    """A key file or verifier key that cannot be used; the message says why."""


def key_id(name: str, public: bytes, kind: bytes = ED25519) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + kind + public).digest()[:4]


def _check_name(name: str) -> str:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise KeyError_(f"key name {name!r} must be non-empty, without spaces or '+'")
    return name


@dataclass(frozen=True)
class VerifierKey:
    """A public key with its name and ID; verifies signatures made by its signer."""

    name: str
    public: bytes

    @property
    def id(self) -> bytes:
        return key_id(self.name, self.public)

    def encode(self) -> str:
        return f"{self.name}+{self.id.hex()}+{base64.b64encode(ED25519 + self.public).decode()}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """Parse ``name+hexid+base64key``; refuse anything malformed or inconsistent."""
        parts = text.strip().split("+", 2)  # base64 may itself contain '+'; names and IDs may not
        if len(parts) != 3:
            raise KeyError_("a verifier key looks like 'name+1a2b3c4d+AbC...=' (three parts joined by '+')")
        name, hex_id, encoded = parts
        _check_name(name)
        try:
            raw = base64.b64decode(encoded, validate=True)
            claimed = bytes.fromhex(hex_id)
        except ValueError:
            raise KeyError_("the verifier key's ID must be hex and its key base64") from None
        if len(raw) != 33 or raw[:1] != ED25519:
            raise KeyError_("the verifier key is not an Ed25519 key (0x01 followed by 32 bytes)")
        key = cls(name, raw[1:])
        if claimed != key.id:
            raise KeyError_("the verifier key's ID does not match its name and key (altered or mistyped)")
        return key

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """An Ed25519 private key with the name it signs under."""

    def __init__(self, name: str, private: Ed25519PrivateKey) -> None:
        self.name = _check_name(name)
        self._private = private

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        return cls(name, Ed25519PrivateKey.generate())

    @property
    def verifier(self) -> VerifierKey:
        public = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)
        return VerifierKey(self.name, public)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    # -- files -------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the key (PEM, PKCS#8) readable by the owner only; atomic, never half-written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"# civicdp signing key: {self.name}\n".encode() + pem)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        path = Path(path)
        text = path.read_bytes()
        first, _, pem = text.partition(b"\n")
        if not first.startswith(b"# civicdp signing key: "):
            raise KeyError_(f"{path} is not a civicdp signing key file")
        name = first.split(b": ", 1)[1].decode().strip()
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except ValueError:
            raise KeyError_(f"{path} does not hold a readable private key") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyError_(f"{path} does not hold an Ed25519 key")
        return cls(name, private)

    @classmethod
    def load_or_create(cls, path: Path, name: str) -> SigningKey:
        """The key at ``path``, created (mode 0600) on first use."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate(name)
        key.save(path)
        return key
