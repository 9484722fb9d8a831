"""The server's side of the audit log: appending entries, signing checkpoints, proofs, export.

Every use of the server leaves exactly one entry. Code that changes state or spends
budget calls :func:`record` inside its own transaction, so the entry commits or rolls
back with the change (a query's entry is in the transaction that charges the ledger
and stores the release). Every other request under ``/v1`` — reads, refusals, invalid
input, failed authentication — gets its entry from :mod:`server.audit_http` as the
response starts, before anything is sent. A request knows whether it was recorded
through its :class:`AuditSlot`, unmarked again if the recording transaction rolls back.

Entries are canonical JSON without floats (amounts are integer micro-epsilon, other
numbers become strings), hashed into an RFC 9162 tree (:mod:`audit.merkle`); the tree
heads are signed as C2SP checkpoints with the server's Ed25519 key.
"""

from __future__ import annotations

import contextvars
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from sqlalchemy import event, insert, update
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from audit.bundle import write_bundle
from audit.checkpoint import Checkpoint
from audit.merkle import MerkleTree, leaf_hash
from audit.signing import SigningKey
from server.caller import Caller
from server.db import reader, session_scope
from server.models import AuditCheckpoint, AuditEntry, AuditHead, AuditKey

MAX_TEXT = 200


@dataclass
class AuditSlot:
    """What one HTTP request has told the log so far."""

    method: str = ""
    path: str = ""
    caller: Caller | None = None
    roles: list[str] = field(default_factory=list)
    action: str | None = None
    target: str | None = None
    rule: list[str] | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. the query an estimate priced
    recorded: bool = False


SLOT: contextvars.ContextVar[AuditSlot | None] = contextvars.ContextVar("civicdp_audit_slot", default=None)


def current_slot() -> AuditSlot | None:
    return SLOT.get()


# -- entries -----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON values without floats (their text is not canonical across languages)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def canonical_bytes(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


_BUMP = update(AuditHead.__table__).where(AuditHead.__table__.c.id == 1).values(  # type: ignore[attr-defined]
    size=AuditHead.__table__.c.size + 1).returning(AuditHead.__table__.c.size)  # type: ignore[attr-defined]
_INSERT = insert(AuditEntry.__table__)  # type: ignore[attr-defined]


def append(session: Session, *, caller: Caller | None, action: str, target: str, decision: str,
           rule: list[str] | None = None, roles: list[str] | None = None, request: dict[str, Any] | None = None,
           detail: dict[str, Any] | None = None, dataset: str | None = None) -> AuditEntry:
    """Append one entry inside the caller's transaction and return it (numbered, hashed)."""
    connection = session.connection()  # Core statements built once: no ORM work per entry
    size = connection.execute(_BUMP).scalar_one()
    now = datetime.now(timezone.utc)
    who = None if caller is None else {"account": caller.name, "account_id": caller.account_id,
                                       "agency": caller.agency, "roles": sorted(roles or [])}
    entry = _plain({"seq": size - 1, "time": now, "who": who, "action": action, "target": target,
                    "decision": decision, "rule": rule, "request": request, "detail": detail or {}})
    data = canonical_bytes(entry)
    values = {"seq": size - 1, "created_at": now, "account": caller.name if caller else None,
              "account_id": caller.account_id if caller else None, "agency": caller.agency if caller else None,
              "action": action[:60], "target": _clip(target) or "", "dataset": _clip(dataset),
              "decision": decision[:20], "entry_json": data.decode(), "leaf_hash": leaf_hash(data).hex()}
    connection.execute(_INSERT, values)
    return AuditEntry(**values)


def record(session: Session, caller: Caller | None, action: str, target: str, decision: str = "allowed",
           **detail: Any) -> AuditEntry:
    """Record a use, change or refusal in the audit log, inside ``session``'s transaction.

    The request's slot (if any) adds the method and path, the caller's roles and the
    policy rule that decided; it counts as recorded once this transaction commits.
    """
    slot = SLOT.get()
    rule = detail.pop("rule", None)
    request = None
    roles: list[str] = []
    if slot is not None:
        rule = rule if rule is not None else slot.rule
        request = {"method": slot.method, "path": slot.path}
        roles = slot.roles if caller is not None and slot.caller == caller else []
        # Counted as recorded now, and forgotten again if this transaction rolls back (a
        # route's session may commit only after the response has started).
        slot.recorded = True
        session.info.setdefault("audit_slots", []).append(slot)
    dataset = detail.get("dataset") or (target if action.startswith(("query.", "dataset.")) else None)
    return append(session, caller=caller, action=action, target=target, decision=decision, rule=rule,
                  roles=roles, request=request, detail=detail, dataset=dataset)


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    session.info.pop("audit_slots", None)


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    for slot in session.info.pop("audit_slots", []):
        slot.recorded = False


DECISIONS = {401: "unauthenticated", 403: "denied", 404: "not_found", 409: "refused", 422: "invalid"}


def record_request(db: DbEngine, slot: AuditSlot, status: int) -> None:
    """The entry of a request that recorded nothing itself (a read, a refusal, an error)."""
    decision = "allowed" if status < 400 else DECISIONS.get(status, "error" if status >= 500 else "refused")
    detail: dict[str, Any] = {**slot.detail, "status": status}
    if slot.reason:
        detail["reason"] = slot.reason
    with session_scope(db) as session:
        append(session, caller=slot.caller, action=slot.action or "http.request", target=slot.target or slot.path,
               decision=decision, rule=slot.rule, roles=slot.roles,
               request={"method": slot.method, "path": slot.path}, detail=detail,
               dataset=slot.detail.get("dataset"))
    slot.recorded = True


def ensure_head(db: DbEngine) -> None:
    """Create the log's head row once (concurrent starts: one insert wins)."""
    with session_scope(db) as session:
        if session.get(AuditHead, 1) is None:
            try:
                with session.begin_nested():
                    session.execute(insert(AuditHead).values(id=1, size=0))
            except IntegrityError:
                pass


# -- the tree, checkpoints, proofs, export ---------------------------------------------------


class AuditLog:
    """Checkpoints, proofs and exports over the stored entries (one per server process).

    Keeps the tree of committed leaf hashes in memory and catches up from the database
    on demand; committed entries always form a prefix, so catching up is a range read.
    """

    def __init__(self, db: DbEngine, key_path: Path, origin: str, every_entries: int = 1000,
                 every_minutes: float = 5.0) -> None:
        self.db = db
        self.key_path = Path(key_path)
        self.origin = origin
        self.every_entries = every_entries
        self.every_minutes = every_minutes
        self._tree = MerkleTree()
        self._lock = threading.Lock()
        self._key: SigningKey | None = None
        self._key_stamp: tuple[int, int] | None = None
        self._checkpointed = -1
        self._since_look = 0

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

    # -- tree -----------------------------------------------------------------------------------

    def sync(self) -> MerkleTree:
        """Bring the in-memory tree up to the committed log."""
        with self._lock:
            with Session(reader(self.db)) as session:
                rows = session.execute(select(AuditEntry.seq, AuditEntry.leaf_hash)
                                       .where(AuditEntry.seq >= len(self._tree)).order_by(AuditEntry.seq))
                for seq, hex_hash in rows:
                    if seq != len(self._tree):
                        break  # an entry not yet committed: stop at the committed prefix
                    self._tree.append(bytes.fromhex(hex_hash))
            return self._tree

    def latest(self) -> AuditCheckpoint | None:
        with Session(reader(self.db)) as session:
            return session.exec(select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc())).first()  # type: ignore[union-attr]

    def checkpoint(self, extra_keys: list[SigningKey] | None = None) -> AuditCheckpoint:
        """The checkpoint of the whole committed log, signed now if the log has grown."""
        tree = self.sync()
        with self._lock:
            size = len(tree)
            latest = self.latest()
            if latest is not None and latest.size == size and not extra_keys:
                self._checkpointed = size
                return latest
            now = datetime.now(timezone.utc).replace(microsecond=0)
            note = Checkpoint(self.origin, size, tree.root(size),
                              (f"time {now.isoformat().replace('+00:00', 'Z')}",))
            for key in [self.key, *(extra_keys or [])]:
                note = note.signed_by(key)
            row = AuditCheckpoint(size=size, root=note.root.hex(), note=note.text(), created_at=now)
            try:
                with session_scope(self.db) as session:
                    if extra_keys:
                        session.execute(AuditCheckpoint.__table__.delete().where(AuditCheckpoint.size == size))
                    session.add(row)
            except IntegrityError:  # another process signed this size first: theirs stands
                pass
            self._checkpointed = size
            with Session(reader(self.db)) as session:
                return session.get(AuditCheckpoint, size)  # type: ignore[return-value]

    def count_request(self) -> bool:
        """Count one request; True every ``every_entries / 8`` of them, when :meth:`look` is due.

        Other processes look too, and the timer catches the rest, so most requests pay
        neither a database read nor a thread hop for checkpointing.
        """
        self._since_look += 1
        if self._since_look < max(1, self.every_entries // 8):
            return False
        self._since_look = 0
        return True

    def look(self) -> None:
        """Sign a checkpoint if ``every_entries`` entries have been added since the last one."""
        if self._checkpointed < 0:
            latest = self.latest()
            self._checkpointed = latest.size if latest else 0
        if self._head_size() - self._checkpointed >= self.every_entries:
            self.checkpoint()

    def _head_size(self) -> int:
        with Session(reader(self.db)) as session:
            return session.get(AuditHead, 1).size  # type: ignore[union-attr]

    def due(self, now: datetime) -> bool:
        """Has the log grown and the last checkpoint grown older than ``every_minutes``?"""
        latest = self.latest()
        size = self._head_size()
        if latest is None:
            return size > 0
        created = latest.created_at if latest.created_at.tzinfo else latest.created_at.replace(tzinfo=timezone.utc)
        return size > latest.size and (now - created).total_seconds() >= self.every_minutes * 60

    def inclusion(self, seq: int, size: int | None = None) -> dict[str, Any]:
        tree = self.sync()
        size = len(tree) if size is None else size
        proof = tree.inclusion_proof(seq, size)
        return {"seq": seq, "tree_size": size, "leaf_hash": tree.leaf(seq).hex(), "root": tree.root(size).hex(),
                "path": [h.hex() for h in proof]}

    def consistency(self, first: int, second: int) -> dict[str, Any]:
        tree = self.sync()
        proof = tree.consistency_proof(first, second)
        return {"first": first, "second": second, "first_root": tree.root(first).hex(),
                "second_root": tree.root(second).hex(), "path": [h.hex() for h in proof]}

    def export(self, target: str | Path | IO[bytes]) -> AuditCheckpoint:
        """Write a bundle of the whole log up to a checkpoint signed now."""
        head = self.checkpoint()
        with Session(reader(self.db)) as session:
            checkpoints = list(session.exec(select(AuditCheckpoint).where(AuditCheckpoint.size <= head.size)
                                            .order_by(AuditCheckpoint.size)))
        tree = self.sync()
        proofs = [{"first": a.size, "second": b.size, "path": [h.hex() for h in tree.consistency_proof(a.size, b.size)]}
                  for a, b in zip(checkpoints, checkpoints[1:])]
        write_bundle(target, self._entries(head.size), [c.note for c in checkpoints], proofs)
        return head

    def _entries(self, size: int):  # type: ignore[no-untyped-def]
        batch = 20_000
        with Session(reader(self.db)) as session:
            for start in range(0, size, batch):
                rows = session.execute(select(AuditEntry.entry_json).where(AuditEntry.seq >= start,
                                                                          AuditEntry.seq < min(size, start + batch))
                                       .order_by(AuditEntry.seq))
                for (text,) in rows:
                    yield text.encode()
