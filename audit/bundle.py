"""Audit export bundles, and their offline verification.

A bundle is a zip file::

    entries.jsonl              one entry per line: exactly the bytes that were hashed
    checkpoints/<size>.txt     signed checkpoints, the last one covering every entry
    proofs.json                consistency proofs between successive checkpoints
    README.txt                 how to verify it

:func:`verify_bundle` needs the bundle and the log's public key(s), nothing else: it
recomputes the Merkle tree from the entries, checks each checkpoint's signature and
root, checks the proofs, and — given the checkpoint an oversight body already held —
that the bundle's log extends it. Any failure raises :class:`TamperDetected` whose
message says what is wrong in plain words.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from civicdp.audit.checkpoint import Checkpoint, CheckpointError
from civicdp.audit.merkle import MerkleTree, verify_consistency
from civicdp.audit.signing import VerifierKey

_sha256 = hashlib.sha256
README = """civicdp audit bundle

Verify it offline, with the log's public key only:

    civicdp audit verify THIS.zip --public-key KEY [--trusted-checkpoint LAST_HELD.txt]

entries.jsonl: one audit entry per line (canonical JSON; the leaf hashed is the line
without its newline). checkpoints/: signed RFC 9162 tree heads (C2SP checkpoints).
proofs.json: consistency proofs between successive checkpoints.
"""


class TamperDetected(Exception):
    """The bundle does not verify; the message explains what was found."""


@dataclass
class Report:
    entries: int
    checkpoints: int
    proofs: int
    head: Checkpoint
    trusted: Checkpoint | None
    keys: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [f"OK: {self.entries:,} entries form the tree whose root the checkpoint of size "
                 f"{self.head.size:,} signs",
                 f"{self.checkpoints} signed checkpoints and {self.proofs} consistency proofs verified",
                 f"signed by: {', '.join(self.keys)}"]
        if self.trusted is not None:
            lines.append(f"consistent with your trusted checkpoint of size {self.trusted.size:,}: "
                         "the log only grew since you last checked")
        else:
            lines.append("no trusted checkpoint given: keep this head checkpoint and pass it with "
                         "--trusted-checkpoint next time, so truncation or rewritten history cannot hide")
        return lines


def write_bundle(target: str | Path | IO[bytes], entries: Iterable[bytes], checkpoints: list[str],
                 proofs: list[dict]) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("entries.jsonl", "w", force_zip64=True) as out:
            for entry in entries:
                out.write(entry + b"\n")
        for text in checkpoints:
            size = Checkpoint.parse(text).size
            archive.writestr(f"checkpoints/{size:012d}.txt", text)
        archive.writestr("proofs.json", json.dumps({"consistency": proofs}, indent=1))
        archive.writestr("README.txt", README)


def _read(path: Path) -> tuple[list[bytes], list[tuple[str, str]], list[dict]]:
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise TamperDetected(f"no bundle at {path}") from None
    except (zipfile.BadZipFile, OSError):
        raise TamperDetected(f"{path} is not a readable zip file (damaged, or not an audit bundle)") from None
    with archive:
        names = set(archive.namelist())
        if "entries.jsonl" not in names:
            raise TamperDetected("the bundle has no entries.jsonl")
        try:
            data = archive.read("entries.jsonl")
            checkpoints = [(n, archive.read(n).decode()) for n in sorted(names) if n.startswith("checkpoints/")]
            proofs = json.loads(archive.read("proofs.json")).get("consistency", []) if "proofs.json" in names else []
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError, AttributeError):
            raise TamperDetected("the bundle's files are damaged (bad zip data, or checkpoints/proofs "
                                 "that are not text/JSON)") from None
    if data and not data.endswith(b"\n"):
        raise TamperDetected("entries.jsonl does not end with a newline: it was cut off or edited")
    return (data.split(b"\n")[:-1] if data else []), checkpoints, proofs


def read_entries(path: str | Path) -> list[bytes]:
    """The entries of a bundle, each the bytes that were hashed (verify the bundle first)."""
    return _read(Path(path))[0]


def _check_entries(lines: list[bytes]) -> None:
    for index, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            raise TamperDetected(f"entry {index} (line {index + 1}) is not valid JSON: it was altered") from None
        seq = entry.get("seq") if isinstance(entry, dict) else None
        if seq != index:
            raise TamperDetected(
                f"line {index + 1} holds entry number {seq!r}, not {index}: entries were deleted, inserted "
                "or reordered")


def verify_bundle(path: str | Path, keys: list[VerifierKey], trusted: Checkpoint | None = None) -> Report:
    """Verify an exported bundle offline; raise :class:`TamperDetected` with an explanation."""
    if not keys:
        raise TamperDetected("give the log's public key (civicdp audit public-key prints it)")
    lines, raw_checkpoints, proofs = _read(Path(path))
    try:
        return _verify(lines, raw_checkpoints, proofs, keys, trusted)
    except TamperDetected:
        # The tree decides; reading every entry only serves a more precise explanation.
        _check_entries(lines)
        raise


def _verify(lines: list[bytes], raw_checkpoints: list[tuple[str, str]], proofs: list[dict],
            keys: list[VerifierKey], trusted: Checkpoint | None) -> Report:
    if not raw_checkpoints:
        raise TamperDetected("the bundle holds no signed checkpoint, so nothing vouches for its entries")
    tree = MerkleTree.from_leaves([_sha256(b"\x00" + line).digest() for line in lines])
    checkpoints: list[Checkpoint] = []
    signers: set[str] = set()
    origin = None
    good_size = 0
    for name, text in raw_checkpoints:
        try:
            checkpoint = Checkpoint.parse(text)
        except CheckpointError as exc:
            raise TamperDetected(f"{name} is not a valid checkpoint: {exc}") from None
        signed = checkpoint.verified_by(keys)
        if not signed:
            raise TamperDetected(f"{name} is not signed by the public key you gave (signed by another key, "
                                 "or its text was changed after signing)")
        signers.update(k.encode() for k in signed)
        if origin is not None and checkpoint.origin != origin:
            raise TamperDetected(f"{name} names another log ({checkpoint.origin!r}, not {origin!r})")
        origin = checkpoint.origin
        if checkpoint.size > len(tree):
            raise TamperDetected(
                f"{name} signs a log of {checkpoint.size:,} entries but the bundle holds only {len(tree):,}: "
                "entries were removed (the log was truncated)")
        if tree.root(checkpoint.size) != checkpoint.root:
            raise TamperDetected(
                f"the entries do not match {name}: an entry among numbers {good_size}..{checkpoint.size - 1} "
                "was changed, removed, inserted or reordered")
        good_size = checkpoint.size
        checkpoints.append(checkpoint)
    head = checkpoints[-1]
    if head.size != len(tree):
        raise TamperDetected(f"the bundle holds {len(tree) - head.size:,} entries after its last checkpoint "
                             f"(size {head.size:,}); nothing signed vouches for them: entries were added")
    roots = {c.size: c.root for c in checkpoints}
    for proof in proofs:
        try:
            first, second, path_hex = int(proof["first"]), int(proof["second"]), proof["path"]
            path_bytes = [bytes.fromhex(h) for h in path_hex]
        except (KeyError, TypeError, ValueError):
            raise TamperDetected("proofs.json holds a malformed proof") from None
        if first not in roots or second not in roots or not verify_consistency(
                first, second, roots[first], roots[second], path_bytes):
            raise TamperDetected(f"the consistency proof from size {first} to {second} does not verify")
    if trusted is not None:
        _check_trusted(trusted, keys, tree, origin)
    return Report(len(lines), len(checkpoints), len(proofs), head, trusted, sorted(signers))


def _check_trusted(trusted: Checkpoint, keys: list[VerifierKey], tree: MerkleTree, origin: str | None) -> None:
    if not trusted.verified_by(keys):
        raise TamperDetected("your trusted checkpoint is not signed by the public key you gave")
    if trusted.origin != origin:
        raise TamperDetected(f"your trusted checkpoint is of another log ({trusted.origin!r})")
    if trusted.size > len(tree):
        raise TamperDetected(
            f"you hold a checkpoint of {trusted.size:,} entries but the bundle has only {len(tree):,}: "
            "the log was truncated or rolled back")
    if tree.root(trusted.size) != trusted.root:
        raise TamperDetected(
            f"the bundle's first {trusted.size:,} entries do not match the checkpoint you hold: the history "
            "you already saw was rewritten (even if the new checkpoints are validly signed)")

