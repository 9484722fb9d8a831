"""Signed checkpoints in the C2SP formats (https://c2sp.org/tlog-checkpoint, signed-note,
tlog-cosignature).

A checkpoint commits to the log's first ``size`` entries::

    civicdp.local/audit          <- origin: the log's name
    1234                         <- tree size
    q1w2e3...=                   <- base64 of the RFC 9162 root hash
    time 2026-11-23T19:40:00Z    <- extension line (when it was signed)

    — civicdp.local/audit Ab12...=   <- signature lines: key name, base64(key id || signature)

Several signatures may follow (the server during a key rotation; a witness's
cosignature, which signs ``cosignature/v1\\ntime <unix seconds>\\n`` + the body and
carries the timestamp in its signature blob).
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field

from civicdp.audit.signing import SigningKey, VerifierKey, key_id

COSIGNATURE = b"\x04"  # signed-note signature type of a timestamped Ed25519 cosignature
_DASH = "\u2014 "


class CheckpointError(ValueError):
    """A checkpoint that cannot be parsed or whose signatures do not check out."""


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    blob: bytes  # the signature bytes after the key ID

    def line(self) -> str:
        return f"{_DASH}{self.name} {base64.b64encode(self.key_id + self.blob).decode()}\n"


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()
    signatures: tuple[Signature, ...] = field(default=())

    @property
    def body(self) -> bytes:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return ("\n".join(lines) + "\n").encode()

    def text(self) -> str:
        return self.body.decode() + "\n" + "".join(s.line() for s in self.signatures)

    def signed_by(self, key: SigningKey) -> Checkpoint:
        signature = Signature(key.name, key.verifier.id, key.sign(self.body))
        return Checkpoint(self.origin, self.size, self.root, self.extensions, (*self.signatures, signature))

    def cosigned_by(self, key: SigningKey, timestamp: int) -> Checkpoint:
        """A witness's cosignature (C2SP tlog-cosignature/v1) over this checkpoint."""
        message = _cosigned_message(self.body, timestamp)
        cosign_id = key_id(key.name, key.verifier.public, COSIGNATURE)
        blob = struct.pack(">Q", timestamp) + key.sign(message)
        return Checkpoint(self.origin, self.size, self.root, self.extensions,
                          (*self.signatures, Signature(key.name, cosign_id, blob)))

    def verified_by(self, keys: list[VerifierKey]) -> list[VerifierKey]:
        """The given keys that validly signed this checkpoint (as the log, not as a witness)."""
        good = []
        for key in keys:
            for sig in self.signatures:
                if sig.name == key.name and sig.key_id == key.id and key.verify(sig.blob, self.body):
                    good.append(key)
                    break
        return good

    def cosigned_by_key(self, key: VerifierKey) -> bool:
        cosign_id = key_id(key.name, key.public, COSIGNATURE)
        for sig in self.signatures:
            if sig.key_id == cosign_id and sig.name == key.name and len(sig.blob) == 72:
                (timestamp,) = struct.unpack(">Q", sig.blob[:8])
                if key.verify(sig.blob[8:], _cosigned_message(self.body, timestamp)):
                    return True
        return False

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        body, sep, sigs = text.partition("\n\n")
        if not sep:
            raise CheckpointError("a checkpoint has a body, an empty line, then signature lines")
        lines = body.split("\n")
        if len(lines) < 3:
            raise CheckpointError("a checkpoint body has an origin, a tree size and a root hash")
        origin, size_text, root_text, *extensions = lines
        if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
            raise CheckpointError(f"the tree size {size_text!r} is not a whole number")
        try:
            root = base64.b64decode(root_text, validate=True)
        except ValueError:
            raise CheckpointError("the root hash is not base64") from None
        if len(root) != 32:
            raise CheckpointError("the root hash is not 32 bytes")
        signatures = []
        for line in sigs.splitlines():
            if not line.startswith(_DASH):
                raise CheckpointError(f"signature lines start with '{_DASH.strip()} ': {line[:40]!r}")
            name, _, encoded = line[len(_DASH):].rpartition(" ")
            try:
                raw = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise CheckpointError("a signature is not base64") from None
            if len(raw) < 5:
                raise CheckpointError("a signature is too short")
            signatures.append(Signature(name, raw[:4], raw[4:]))
        if not signatures:
            raise CheckpointError("the checkpoint carries no signature")
        return cls(origin, int(size_text), root, tuple(extensions), tuple(signatures))


def _cosigned_message(body: bytes, timestamp: int) -> bytes:
    return b"cosignature/v1\ntime " + str(timestamp).encode() + b"\n" + body
