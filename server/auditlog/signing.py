"""The log's signing keys, and the latest checkpoint kept beside the key (outside the database).

The signing key is read from its file and re-read when the file changes (after
``civicdp audit rotate-key``); every key the log has signed with is registered in the
database, so checkpoints signed before a rotation still verify. The latest checkpoint
this server signed is also kept in a file beside the key: a database rolled back
together with its checkpoint rows is still caught (:meth:`LogKeys.check_held`).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from civicdp.audit.checkpoint import Checkpoint, CheckpointError
from civicdp.audit.merkle import HashTree
from civicdp.audit.signing import KeyError_, SigningKey, VerifierKey
from civicdp.server.auditlog.tree_store import Scan
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import AuditKey

#: The latest checkpoint this server signed, kept beside its signing key (outside the database):
#: a database rolled back together with its checkpoint rows is still caught.
HELD_NAME = "audit-latest-checkpoint.txt"
logger = logging.getLogger("civicdp.audit")


class LogKeys:
    """The signing key of one log, the keys it has signed with, and the checkpoint kept beside the key."""

    def __init__(self, db: DbEngine, key_path: Path, origin: str, held_path: Path | None = None) -> None:
        self.db = db
        self.key_path = Path(key_path)
        self.origin = origin
        self.held_path = Path(held_path) if held_path else self.key_path.with_name(HELD_NAME)
        self._key: SigningKey | None = None
        self._key_stamp: tuple[int, int] | None = None

    # -- keys ----------------------------------------------------------------------------------

    @property
    def key(self) -> SigningKey:
        """The signing key, re-read when its file changes (after ``civicdp audit rotate-key``)."""
        if not self.key_path.exists():
            SigningKey.load_or_create(self.key_path, self.origin)
        stat = self.key_path.stat()
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if self._key is None or stamp != self._key_stamp:
            self._key = SigningKey.load(self.key_path)
            self._key_stamp = stamp
            self._register_key(self._key)
        return self._key

    def _register_key(self, key: SigningKey) -> None:
        verifier = key.verifier.encode()
        with session_scope(self.db) as session:
            if session.exec(select(AuditKey).where(AuditKey.verifier == verifier)).first() is None:
                try:
                    with session.begin_nested():
                        session.add(AuditKey(verifier=verifier))
                except IntegrityError:
                    pass

    def public_keys(self) -> list[AuditKey]:
        self.key  # noqa: B018 - registers the current key
        with Session(reader(self.db)) as session:
            return list(session.exec(select(AuditKey).order_by(AuditKey.id)))

    def verifiers(self, session: Session) -> list[VerifierKey]:
        """Every key the log has signed with (without creating a key that does not exist yet)."""
        keys = []
        for (text,) in session.execute(select(AuditKey.verifier)):
            try:
                keys.append(VerifierKey.parse(text))
            except KeyError_:
                pass
        try:
            if self._key is not None:
                keys.append(self._key.verifier)
            elif self.key_path.exists():
                keys.append(SigningKey.load(self.key_path).verifier)
        except (KeyError_, OSError):
            pass
        return keys

    # -- the checkpoint kept beside the key ------------------------------------------------------

    def check_held(self, tree: HashTree | Scan, held: Checkpoint | None = None) -> str | None:
        """What is wrong with ``tree`` against the checkpoint kept beside the key, or None."""
        held = held or self.read_held()
        if held is None:
            return None
        if held.size > len(tree):
            return (f"this server signed a checkpoint of {held.size:,} entries (kept in {self.held_path}) but only "
                    f"{len(tree):,} are stored: the log was rolled back (if the database was replaced on purpose, "
                    "move that file away)")
        if tree.root(held.size) != held.root:
            return (f"the stored entries do not match the checkpoint of size {held.size:,} this server signed "
                    f"(kept in {self.held_path}): the history was rewritten")
        return None

    def read_held(self) -> Checkpoint | None:
        try:
            return Checkpoint.parse(self.held_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, CheckpointError) as exc:
            logger.warning("ignoring %s: not a readable checkpoint (%s)", self.held_path, exc)
            return None

    def hold(self, note: Checkpoint) -> None:
        """Keep ``note`` beside the key unless a larger checkpoint is kept there already."""
        held = self.read_held()
        if held is not None and held.size > note.size:
            return
        temporary = self.held_path.with_name(f"{self.held_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            temporary.write_text(note.text())
            os.replace(temporary, self.held_path)
        except OSError as exc:
            logger.warning("could not keep the latest checkpoint in %s: %s", self.held_path, exc)
