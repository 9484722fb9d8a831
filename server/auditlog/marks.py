"""What earlier checks established, recorded in the state database so that a start checks only what is new.

A *mark* is one row of ``auditmark``: how far a check got (``size``: entries ``0 .. size - 1``),
the root of the stored tree there, when, and for the reconciliation its folded evidence
(``data``). Every mark carries an HMAC under a key that only the holder of the log's
signing key can derive (:func:`mark_key`): someone who can write to the database but does
not hold the key cannot forge or move a mark; deleting one, or putting back an older one,
only makes the next start check more. A mark that does not verify is ignored.

``integrityalarm`` holds the integrity alarms every server process has raised
(:mod:`civicdp.server.auditlog.alarms`), so that readiness on every worker reports them.

Both tables, and an index of the entries' leaf hashes (:data:`LEAF_INDEX`), are created by
:func:`ensure_tables` when the log opens (an existing state gets them then), and by
``init_db`` once this module is imported.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import BigInteger, Column, Index, LargeBinary, Text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, delete, select

from civicdp.audit.signing import KeyError_, SigningKey
from civicdp.server.auditlog.signing import LogKeys
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import AuditEntry

#: The message whose (deterministic, RFC 8032) Ed25519 signature keys the marks' HMAC.
MARK_KEY_MESSAGE = b"civicdp audit marks: HMAC key, v1"
LOG_MARK = "log"
EVIDENCE_MARK = "evidence"


class AuditMark(SQLModel, table=True):
    """How far a check of the log (or the reconciliation) got, authenticated by an HMAC."""

    name: str = Field(primary_key=True, max_length=40)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    root: str = Field(default="", max_length=64)
    checked_at: str = Field(max_length=40)  # ISO 8601 text (UTC): hashed as stored, whatever the database
    full_at: str | None = Field(default=None, max_length=40)  # the last check that read the whole log
    data: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    mac: str = Field(max_length=64)


class IntegrityAlarm(SQLModel, table=True):
    """An integrity alarm raised by any server process on this database (readiness reports them all)."""

    key: str = Field(primary_key=True, max_length=400)  # log | budget:<json scope key> | release:<id>
    problem: str = Field(sa_column=Column(Text, nullable=False))
    detail: str = Field(sa_column=Column(Text, nullable=False))
    since: datetime
    info: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    recorded: bool = False


#: The entries' numbers and leaf hashes, apart from their text: the check since a mark compares them
#: with the stored tree without reading the entries (:func:`civicdp.server.auditlog.integrity.below_mark_differs`).
LEAF_INDEX = Index("ix_auditentry_seq_leaf_hash", AuditEntry.__table__.c.seq,  # type: ignore[attr-defined]
                   AuditEntry.__table__.c.leaf_hash)  # type: ignore[attr-defined]

_READY: weakref.WeakSet[Any] = weakref.WeakSet()
_READY_LOCK = threading.Lock()


def ensure_tables(db: DbEngine) -> None:
    """Create the marks' and alarms' tables, and the entries' leaf index, if the state has none yet (once per engine).

    On a large log made before the index, creating it reads the log once (seconds per million entries).
    """
    if db in _READY:
        return
    with _READY_LOCK:
        for attempt in (1, 2):  # workers starting at once on a state without them: one creates, the other retries
            try:
                SQLModel.metadata.create_all(db, tables=[AuditMark.__table__, IntegrityAlarm.__table__])  # type: ignore[attr-defined]
                with db.begin() as connection:
                    connection.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {LEAF_INDEX.name} "
                                               "ON auditentry (seq, leaf_hash)")
                break
            except SQLAlchemyError:
                if attempt == 2:
                    raise
        _READY.add(db)


def mark_key(key: SigningKey) -> bytes:
    """The HMAC key of the marks: derived from a signature only the signing key can make."""
    return hashlib.sha256(b"civicdp marks\x00" + key.sign(MARK_KEY_MESSAGE)).digest()


def _text(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True)
class Mark:
    """A verified mark: what was established up to ``size``."""

    name: str
    size: int
    root: str
    checked_at: datetime
    full_at: datetime | None = None
    data: bytes | None = None

    def message(self) -> bytes:
        digest = hashlib.sha256(self.data or b"").hexdigest()
        return "\n".join([self.name, str(self.size), self.root, _text(self.checked_at) or "",
                          _text(self.full_at) or "", digest]).encode()

    def mac(self, key: bytes) -> str:
        return hmac.new(key, self.message(), hashlib.sha256).hexdigest()


def read_mark(session: Session, name: str, key: bytes) -> Mark | None:
    """The mark ``name`` if it is stored and its HMAC verifies under ``key``, else None."""
    row = session.execute(select(AuditMark).where(AuditMark.name == name)).scalar_one_or_none()
    if row is None:
        return None
    try:
        mark = Mark(row.name, int(row.size), row.root, _time(row.checked_at), _time(row.full_at),  # type: ignore[arg-type]
                    None if row.data is None else bytes(row.data))
    except ValueError:
        return None
    return mark if hmac.compare_digest(mark.mac(key), row.mac) else None


def write_mark(session: Session, mark: Mark, key: bytes) -> None:
    """Store ``mark`` (replacing the one of its name) inside ``session``'s transaction."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = {"name": mark.name, "size": mark.size, "root": mark.root, "checked_at": _text(mark.checked_at),
              "full_at": _text(mark.full_at), "data": mark.data, "mac": mark.mac(key)}
    statement = insert(AuditMark).values(**values)
    session.execute(statement.on_conflict_do_update(index_elements=["name"],
                                                    set_={k: v for k, v in values.items() if k != "name"}))


class Marks:
    """The marks of one log's database, under the HMAC key of its signing key.

    Without a signing key (none made yet, or unreadable) nothing is marked and no mark is
    read: every check reads everything.
    """

    def __init__(self, db: DbEngine, keys: LogKeys) -> None:
        self.db = db
        self.keys = keys
        self._for: SigningKey | None = None
        self._secret = b""

    def secret(self) -> bytes | None:
        if not self.keys.key_path.exists():
            return None
        try:
            key = self.keys.key
        except (KeyError_, OSError):
            return None
        if self._for is not key:
            self._secret, self._for = mark_key(key), key
        return self._secret

    def read(self, name: str, session: Session | None = None) -> Mark | None:
        secret = self.secret()
        if secret is None:
            return None
        if session is not None:
            return read_mark(session, name, secret)
        with Session(reader(self.db)) as own:
            return read_mark(own, name, secret)

    def record_check(self, size: int, root: str, checkpoints: str, *, full: bool) -> None:
        """Record a check of the log: the larger of it and the stored mark, and the latest whole-log check.

        A check of the whole log replaces the stored mark (which may be what sent it there).
        """
        secret = self.secret()
        if secret is None:
            return
        now = datetime.now(timezone.utc)
        with session_scope(self.db) as session:
            stored = read_mark(session, LOG_MARK, secret)
            full_at = now if full else None
            if stored is not None and stored.full_at is not None and (full_at is None or stored.full_at > full_at):
                full_at = stored.full_at
            if stored is not None and stored.size > size and not full:
                mark = Mark(LOG_MARK, stored.size, stored.root, stored.checked_at, full_at, stored.data)
            else:
                mark = Mark(LOG_MARK, size, root, now, full_at, checkpoints.encode())
            if mark != stored:
                write_mark(session, mark, secret)

    def write(self, mark: Mark, session: Session) -> None:
        secret = self.secret()
        if secret is not None:
            write_mark(session, mark, secret)

    def forget(self, name: str, session: Session) -> None:
        session.execute(delete(AuditMark).where(AuditMark.name == name))  # type: ignore[arg-type]
