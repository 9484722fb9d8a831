"""The server's side of the audit log: appending entries, signing checkpoints, proofs, export.

Every use of the server leaves exactly one entry. Code that changes state or spends
budget calls :func:`record` inside its own transaction, so the entry commits or rolls
back with the change (a query's entry is in the transaction that charges the ledger
and stores the release). Every other request under ``/v1`` — reads, refusals, invalid
input, failed authentication — gets its entry from :mod:`civicdp.server.http.request_log` as the
response starts, before anything is sent. A request knows whether it was recorded
through its :class:`AuditSlot`, unmarked again if the recording transaction rolls back.

Entries are canonical JSON without floats (amounts are integer micro-epsilon, other
numbers become strings), hashed into an RFC 9162 tree (:mod:`civicdp.audit.merkle`); the tree
heads are signed as C2SP checkpoints with the server's Ed25519 key.

The log only grows. :class:`AuditLog` verifies the stored entries against every signed
checkpoint when it starts and periodically, checks each entry it reads against its leaf
hash, and never signs a checkpoint that does not extend the latest one stored (or the
one it keeps beside its key, outside the database). A failed check is an *alarm*
(:class:`Alarms`): the log is frozen — nothing is appended, no checkpoint signed, every
request that needs an entry is answered 503 (:class:`AuditLogFailed`) — until the
stored log verifies again, which is recorded (``audit.integrity_restored``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, NoReturn

from sqlalchemy import BigInteger, bindparam, event, func, insert, update
from sqlalchemy.engine import Connection, Engine as DbEngine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from starlette.exceptions import HTTPException

from civicdp.audit.bundle import write_bundle
from civicdp.audit.checkpoint import Checkpoint, CheckpointError
from civicdp.audit.merkle import HashTree, leaf_hash
from civicdp.audit.signing import KeyError_, SigningKey, VerifierKey
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import AuditCheckpoint, AuditEntry, AuditHead, AuditKey
from civicdp.server.auditlog.tree_store import Scan, TileStore, TreeProblem, ensure_tree, locked_session

MAX_TEXT = 200
logger = logging.getLogger("civicdp.audit")


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


# -- integrity alarms ------------------------------------------------------------------------


class IntegrityFailure(HTTPException):
    """State that failed an integrity check: the request is answered 503, saying what failed."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, detail, headers={"Retry-After": "300"})


class AuditLogFailed(IntegrityFailure):
    """The stored log failed its integrity check: nothing is appended or signed until it verifies again."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"the audit log failed its integrity check: {problem}. The server answers no request "
                         "that needs an audit entry until the stored log verifies against its signed checkpoints "
                         "again (GET /v1/ready shows the state)")


@dataclass
class Alarm:
    """One failed check: what readiness shows (``problem``), the full explanation, since when."""

    problem: str
    detail: str
    since: datetime
    info: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False  # its audit entry has been written


class Alarms:
    """The integrity alarms of one state database, shared by everything in this process that uses it.

    ``log`` is set while the stored log fails its check (everything stops); ``budgets``
    (by scope key) and ``releases`` (by release id) hold what failed reconciliation or a
    stored answer's check (only those are refused). ``verified`` remembers, per release,
    what its audited entry vouches for, so a cached answer is checked against the log once
    per process and against its bytes every time.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: Alarm | None = None
        self.refused = 0
        self.budgets: dict[tuple[str, str, str, str], Alarm] = {}
        self.releases: dict[int, Alarm] = {}
        self.verified: dict[int, tuple[str, ...]] = {}
        self.audit_log: weakref.ReferenceType[AuditLog] | None = None
        self.evidence: Any = None  # civicdp.server.auditlog.reconcile's folded audit trail, valid while the log verifies

    def fail_log(self, problem: str) -> Alarm:
        with self.lock:
            if self.log is None:
                self.log = Alarm(problem, problem, datetime.now(timezone.utc))
                self.refused = 0
                self.evidence = None
                logger.critical("AUDIT LOG INTEGRITY ALARM: %s. Requests that need an audit entry are refused "
                                "until the stored log verifies again.", problem)
            return self.log

    def clear_log(self) -> tuple[Alarm, int] | None:
        with self.lock:
            alarm, self.log = self.log, None
            if alarm is None:
                return None
            self.evidence = None  # folded while the log was failed: read everything again
            return alarm, self.refused

    def count_refused(self) -> None:
        with self.lock:
            self.refused += 1

    def report(self) -> dict[str, Any]:
        """What readiness shows: no amounts, no entry contents (readiness needs no key)."""
        with self.lock:
            log = self.log
            return {
                "audit_log": ({"ok": True} if log is None else
                              {"ok": False, "problem": log.problem, "since": _plain(log.since),
                               "refused_requests": self.refused}),
                "held_budgets": [{**alarm.info, "problem": alarm.problem, "since": _plain(alarm.since)}
                                 for _, alarm in sorted(self.budgets.items())],
                "refused_releases": [{"release_id": rid, "problem": alarm.problem, "since": _plain(alarm.since)}
                                     for rid, alarm in sorted(self.releases.items())],
            }

    @property
    def any(self) -> bool:
        return self.log is not None or bool(self.budgets) or bool(self.releases)


_ALARMS: dict[str, Alarms] = {}
_ALARMS_BY_ENGINE: weakref.WeakKeyDictionary[Any, Alarms] = weakref.WeakKeyDictionary()
_ALARMS_LOCK = threading.Lock()
_GUARDED: weakref.WeakSet[Any] = weakref.WeakSet()


def alarms_for(db: Any) -> Alarms:
    """The alarms of the database behind ``db`` (an engine, or a session's bind), one per database URL."""
    try:
        return _ALARMS_BY_ENGINE[db]
    except (KeyError, TypeError):
        pass
    key = db.url.render_as_string(hide_password=False)
    with _ALARMS_LOCK:
        alarms = _ALARMS.setdefault(key, Alarms())
    try:
        _ALARMS_BY_ENGINE[db] = alarms
    except TypeError:
        pass
    return alarms


def _guard_requests(db: DbEngine, alarms: Alarms) -> None:
    """While the log is failed, refuse every database statement made on behalf of a request under /v1.

    A request's first statement (authentication, usually) raises :class:`AuditLogFailed`,
    answered 503, so nothing that needs an audit entry is done or answered. Work outside
    requests (the checks that may find the log repaired, readiness) is not refused.
    """
    if db in _GUARDED:
        return

    def refuse(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: Any) -> None:
        if alarms.log is not None and SLOT.get() is not None:
            raise AuditLogFailed(alarms.log.problem)

    event.listen(db, "before_cursor_execute", refuse)
    _GUARDED.add(db)


# -- entries -----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON values without floats (their text is not canonical across languages)."""
    if isinstance(value, str) or value is None:  # the most frequent first (every entry has dozens)
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, (bool, int)):
        return value
    return str(value)


def canonical_bytes(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


_HEAD = AuditHead.__table__  # type: ignore[attr-defined]
_BUMP = update(_HEAD).where(_HEAD.c.id == 1).values(size=_HEAD.c.size + 1).returning(_HEAD.c.size)
_BUMP_BY = update(_HEAD).where(_HEAD.c.id == 1).values(size=_HEAD.c.size + bindparam("count", type_=BigInteger)
                                                      ).returning(_HEAD.c.size)
_INSERT = insert(AuditEntry.__table__)  # type: ignore[attr-defined]


def entry_values(seq: int, now: datetime, *, caller: Caller | None, action: str, target: str, decision: str,
                 rule: list[str] | None = None, roles: list[str] | None = None,
                 request: dict[str, Any] | None = None, detail: dict[str, Any] | None = None,
                 dataset: str | None = None) -> dict[str, Any]:
    """The stored row of entry number ``seq``: its canonical JSON, leaf hash and filter columns."""
    who = None if caller is None else {"account": caller.name, "account_id": caller.account_id,
                                       "agency": caller.agency, "roles": sorted(roles or [])}
    entry = _plain({"seq": seq, "time": now, "who": who, "action": action, "target": target,
                    "decision": decision, "rule": rule, "request": request, "detail": detail or {}})
    data = canonical_bytes(entry)
    return {"seq": seq, "created_at": now, "account": caller.name if caller else None,
            "account_id": caller.account_id if caller else None, "agency": caller.agency if caller else None,
            "action": action[:60], "target": _clip(target) or "", "dataset": _clip(dataset),
            "decision": decision[:20], "entry_json": data.decode(), "leaf_hash": leaf_hash(data).hex()}


def append(session: Session, *, caller: Caller | None, action: str, target: str, decision: str,
           rule: list[str] | None = None, roles: list[str] | None = None, request: dict[str, Any] | None = None,
           detail: dict[str, Any] | None = None, dataset: str | None = None) -> AuditEntry:
    """Append one entry inside the caller's transaction and return it (numbered, hashed).

    Raises :class:`AuditLogFailed` while the stored log fails its integrity check: nothing
    that needs an entry (a charge, a change, an answer) happens then.
    """
    failed = alarms_for(session.get_bind()).log
    if failed is not None:
        raise AuditLogFailed(failed.problem)
    connection = session.connection()  # Core statements built once: no ORM work per entry
    size = connection.execute(_BUMP).scalar_one()
    values = entry_values(size - 1, datetime.now(timezone.utc), caller=caller, action=action, target=target,
                          decision=decision, rule=rule, roles=roles, request=request, detail=detail,
                          dataset=dataset)
    connection.execute(_INSERT, values)
    return AuditEntry(**values)


def append_many(connection: Connection, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append several entries (each the keyword arguments of :func:`entry_values`) with one number bump.

    Inside the transaction of ``connection``, like :func:`append`; the entries get
    consecutive numbers in the order given. Returns their stored rows.
    """
    if not entries:
        return []
    failed = alarms_for(connection.engine).log
    if failed is not None:
        raise AuditLogFailed(failed.problem)
    size = connection.execute(_BUMP_BY, {"count": len(entries)}).scalar_one()
    now = datetime.now(timezone.utc)
    first = size - len(entries)
    rows = [entry_values(first + i, now, **entry) for i, entry in enumerate(entries)]
    connection.execute(_INSERT, rows)
    return rows


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
    """The entry of a request that recorded nothing itself (a read, a refusal, an error).

    While the log is failed nothing is written: refusals and errors leave unrecorded (they
    are counted and the count is logged when the log recovers); an answer (a status below
    400) that would leave without its entry is refused by raising.
    """
    alarms = alarms_for(db)
    if alarms.log is not None:
        alarms.count_refused()
        slot.recorded = True
        if status < 400:
            raise AuditLogFailed(alarms.log.problem)
        return
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
    ensure_tree(db)


# -- the tree, checkpoints, proofs, export ---------------------------------------------------

#: The latest checkpoint this server signed, kept beside its signing key (outside the database):
#: a database rolled back together with its checkpoint rows is still caught.
HELD_NAME = "audit-latest-checkpoint.txt"
_BATCH = 20_000


def _embedded_seq(data: bytes) -> int | None:
    """The number an entry's bytes give themselves (canonical entries: ``...,"seq":N,"target":...``)."""
    at = data.rfind(b',"seq":')
    if at >= 0:
        start = stop = at + 7
        while stop < len(data) and 48 <= data[stop] <= 57:
            stop += 1
        if stop > start and data.startswith(b',"target":', stop):
            return int(data[start:stop])
    try:
        value = json.loads(data)
    except ValueError:
        return None
    seq = value.get("seq") if isinstance(value, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def checked_leaf(seq: int, text: str, hex_hash: str) -> bytes | str:
    """The leaf hash of stored entry ``seq``, or what is wrong with it (a problem text)."""
    data = text.encode()
    leaf = leaf_hash(data)
    if leaf.hex() != hex_hash:
        return f"entry {seq} does not hash to its stored leaf hash: its text was changed in the database"
    embedded = _embedded_seq(data)
    if embedded != seq:
        return (f"row {seq} holds entry number {embedded}: entries were reordered or renumbered in the database")
    return leaf


class AuditLog:
    """Checkpoints, proofs and exports over the stored entries (one per server process).

    The Merkle tree is stored in the database as tiles (:mod:`civicdp.server.auditlog.tree_store`), shared
    by every process: the entries committed since the tree's size are integrated on
    demand (a range read, under the log's lock), a missing number with later entries
    stored is an alarm, never a silent stop, and each entry read is checked against its
    leaf hash and the number it gives itself. Nothing proportional to the log is kept in
    memory, and a restart rebuilds nothing.

    The whole stored log is verified against every signed checkpoint (and the checkpoint
    kept beside the key) when the log is opened and every ``verify_every_minutes``
    (:meth:`tick`, driven by the checkpoint timer through :meth:`due`); budgets and stored
    answers are reconciled at the same times (:mod:`civicdp.server.auditlog.reconcile`); the read of the
    whole log also compares the stored tree with the entries. A checkpoint is signed only
    if the tree extends the latest one stored, by one signer at a time per database (the
    log's lock), and a process that has not verified the log reads it once before its
    first signature.
    """

    def __init__(self, db: DbEngine, key_path: Path, origin: str, every_entries: int = 1000,
                 every_minutes: float = 5.0, *, verify_every_minutes: float = 15.0,
                 held_path: Path | None = None, check_on_start: bool = True) -> None:
        self.db = db
        self.key_path = Path(key_path)
        self.origin = origin
        self.every_entries = every_entries
        self.every_minutes = every_minutes
        self.verify_every = timedelta(minutes=verify_every_minutes)
        self.held_path = Path(held_path) if held_path else self.key_path.with_name(HELD_NAME)
        self.tiles = TileStore(db, checked_leaf)
        self._verified = False  # this process has read the whole log and found it sound
        self._lock = threading.RLock()
        self._key: SigningKey | None = None
        self._key_stamp: tuple[int, int] | None = None
        self._checkpointed = -1
        self._since_look = 0
        self._last_check: datetime | None = None
        self.alarms = alarms_for(db)
        self.alarms.audit_log = weakref.ref(self)
        _guard_requests(db, self.alarms)
        from civicdp.server.auditlog import reconcile  # noqa: F401, PLC0415 - registers the ledger's spend check
        if check_on_start:
            self.tick(force=True)

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

    def _verifiers(self, session: Session) -> list[VerifierKey]:
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

    # -- alarms ---------------------------------------------------------------------------------

    @property
    def failed(self) -> str | None:
        """Why the stored log failed its integrity check, or None while it passes."""
        alarm = self.alarms.log
        return None if alarm is None else alarm.problem

    def _fail(self, problem: str) -> NoReturn:
        self.alarms.fail_log(problem)
        raise AuditLogFailed(problem)

    def _raise_if_failed(self) -> None:
        alarm = self.alarms.log
        if alarm is not None:
            raise AuditLogFailed(alarm.problem)

    def _recovered(self) -> None:
        cleared = self.alarms.clear_log()
        if cleared is None:
            return
        alarm, refused = cleared
        logger.warning("audit log verifies again (it failed since %s: %s)", alarm.since, alarm.problem)
        with session_scope(self.db) as session:
            append(session, caller=None, action="audit.integrity_restored", target="audit", decision="restored",
                   detail={"problem": alarm.problem, "since": alarm.since, "refused_requests": refused})

    def integrity(self) -> dict[str, Any]:
        """The integrity alarms, as readiness reports them."""
        return self.alarms.report()

    # -- tree -----------------------------------------------------------------------------------

    def sync(self) -> HashTree:
        """The stored tree of the whole committed log (integrated first); raise :class:`AuditLogFailed` on a gap."""
        with self._lock:
            return self.tiles.tree(self._sync_locked())

    def _sync_locked(self) -> int:
        self._raise_if_failed()
        try:
            return self.tiles.integrate()
        except TreeProblem as problem:
            self._fail(problem.problem)

    def leaf(self, seq: int) -> bytes | None:
        """The leaf hash of entry ``seq`` as the stored tree holds it (None if not committed yet)."""
        with self._lock:
            size = self.tiles.known_size
            if seq >= size:
                size = self._sync_locked()
            if not 0 <= seq < size:
                return None
            try:
                return self.tiles.tree(size).leaf(seq)
            except TreeProblem as problem:
                self._fail(problem.problem)

    def _snapshot(self) -> Session:
        """A read-only session whose statements all see one state of the database."""
        if self.db.dialect.name == "sqlite":
            return Session(reader(self.db))  # a deferred transaction reads one WAL snapshot
        return Session(self.db.execution_options(isolation_level="REPEATABLE READ"))

    @staticmethod
    def _check_note(size: int, root: str, note: str, tree: HashTree | Scan, keys: list[VerifierKey],
                    what: str) -> str | None:
        """What is wrong with a stored checkpoint against ``tree``, or None."""
        try:
            signed = Checkpoint.parse(note)
        except CheckpointError:
            return f"{what} is not a valid checkpoint: its row was altered"
        if signed.size != size or signed.root.hex() != root:
            return f"{what} does not say what its row says: the checkpoint row was altered"
        if not signed.verified_by(keys):
            return f"{what} is not signed by the log's keys: the checkpoint row was altered"
        if size > len(tree):
            return (f"{what} signs {size:,} entries but only {len(tree):,} are stored: entries were removed "
                    "(the log was truncated)")
        if tree.root(size) != signed.root:
            return (f"the stored entries do not match {what}: an entry among numbers 0..{size - 1} was changed, "
                    "removed, inserted or reordered")
        return None

    def _check_held(self, tree: HashTree | Scan, held: Checkpoint | None = None) -> str | None:
        held = held or self._read_held()
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

    def _read_held(self) -> Checkpoint | None:
        try:
            return Checkpoint.parse(self.held_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, CheckpointError) as exc:
            logger.warning("ignoring %s: not a readable checkpoint (%s)", self.held_path, exc)
            return None

    def _hold(self, note: Checkpoint) -> None:
        """Keep ``note`` beside the key unless a larger checkpoint is kept there already."""
        held = self._read_held()
        if held is not None and held.size > note.size:
            return
        temporary = self.held_path.with_name(f"{self.held_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            temporary.write_text(note.text())
            os.replace(temporary, self.held_path)
        except OSError as exc:
            logger.warning("could not keep the latest checkpoint in %s: %s", self.held_path, exc)

    def verify(self) -> None:
        """Verify the whole stored log; raise :class:`AuditLogFailed` (the alarm), or clear an alarm.

        In one snapshot: entries numbered 0, 1, ... without a gap, as many as the log's
        counter says, each hashing to its leaf hash and carrying its own number; every
        stored checkpoint parsed, signed by one of the log's keys and matching the root of
        the entries; the checkpoint kept beside the key matching too; and the stored tree
        holding exactly what the entries hash to (the entries integrated earlier
        unchanged). Linear in the size of the log, constant in memory.
        """
        with self._lock:
            problem = self._verify_locked()
            if problem is not None:
                self._fail(problem)
        self._recovered()

    def _verify_locked(self) -> str | None:
        held = self._read_held()
        with self._snapshot() as session:
            head = session.execute(select(AuditHead.size).where(AuditHead.id == 1)).scalar_one_or_none() or 0
            stored = session.execute(select(AuditCheckpoint.size, AuditCheckpoint.root, AuditCheckpoint.note)
                                     .order_by(AuditCheckpoint.size)).all()
            keys = self._verifiers(session)
            scan = self.tiles.scan(session, {size for size, _, _ in stored} | ({held.size} if held else set()))
        if scan.problem is not None:
            return scan.problem
        if len(scan) != head:
            return (f"the log's counter says {head:,} entries but {len(scan):,} are stored: "
                    + ("entries were deleted from the database" if len(scan) < head
                       else "entries were added, or the counter changed, outside the server"))
        for size, root, note in stored:
            problem = self._check_note(size, root, note, scan, keys, f"the signed checkpoint of size {size:,}")
            if problem is not None:
                return problem
        problem = self._check_held(scan, held)
        if problem is not None:
            return problem
        if scan.tree_problem is not None:
            self.tiles.forget()
            return scan.tree_problem
        self._verified = True
        return None

    def tick(self, now: datetime | None = None, *, force: bool = False) -> None:
        """The periodic checks, when ``verify_every`` has passed (or ``force``): the log, then budgets and answers."""
        now = now or datetime.now(timezone.utc)
        if not force and self._last_check is not None and now - self._last_check < self.verify_every:
            return
        self._last_check = now
        try:
            self.verify()
        except AuditLogFailed:
            pass
        except Exception:  # noqa: BLE001 - e.g. the database is down: retried at the next check
            logger.exception("could not verify the audit log; retrying at the next check")
        from civicdp.server.auditlog import reconcile  # noqa: PLC0415 - reconcile builds on this module

        try:
            reconcile.check_state(self.db, self)
        except Exception:  # noqa: BLE001
            logger.exception("could not reconcile budgets and stored answers; retrying at the next check")

    def latest(self) -> AuditCheckpoint | None:
        with Session(reader(self.db)) as session:
            return session.exec(select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc())).first()  # type: ignore[union-attr]

    def _check_extends(self, latest: AuditCheckpoint | None, tree: HashTree | Scan, session: Session,
                       count: bool = True) -> None:
        """Refuse (the alarm) unless ``tree`` extends the latest stored checkpoint and the one kept beside the key."""
        if latest is not None:
            problem = self._check_note(latest.size, latest.root, latest.note, tree, self._verifiers(session),
                                       f"the latest signed checkpoint (size {latest.size:,})")
            if problem is not None:
                self._fail(f"{problem}; refusing to sign a checkpoint that does not extend it")
        problem = self._check_held(tree)
        if problem is not None:
            self._fail(f"{problem}; refusing to sign a checkpoint that does not extend it")
        if not count:
            return
        size = len(tree)
        stored = session.execute(select(func.count()).select_from(AuditEntry)
                                 .where(AuditEntry.seq >= 0, AuditEntry.seq < size)).scalar_one()
        if stored != size:
            self._fail(f"{size - stored:,} of the first {size:,} entries this server read are no longer stored: "
                       "entries were deleted from the database")

    def _first_check(self) -> None:
        """Before this process's first signature, unless it verified the log: read it all once (the alarm if bad)."""
        latest = self.latest()
        held = self._read_held()
        sizes = ({latest.size} if latest else set()) | ({held.size} if held else set())
        with self._snapshot() as session:
            scan = self.tiles.scan(session, sizes)
            if scan.problem is not None:
                self._fail(scan.problem)
            self._check_extends(latest, scan, session, count=False)
        if scan.tree_problem is not None:
            self.tiles.forget()
            self._fail(scan.tree_problem)
        self._verified = True

    def checkpoint(self, extra_keys: list[SigningKey] | None = None) -> AuditCheckpoint:
        """The checkpoint of the whole committed log, signed now if the log has grown.

        Signed only if the tree extends the latest stored checkpoint (same root at its
        size, at least as many entries) and the checkpoint kept beside the key; otherwise
        the alarm is raised and :class:`AuditLogFailed` raised. One signer at a time per
        database: the entries are integrated, checked and signed in one transaction under
        the log's lock, so two processes never sign different roots for one size.
        """
        with self._lock:
            self._raise_if_failed()
            if not self._verified:
                self._first_check()
            self._sync_locked()  # catch up in chunks first: the signing transaction then holds the lock briefly
            key = self.key  # (re-read and registered outside the locked transaction)
            written: list[tuple[int, int, bytes]] = []
            try:
                with locked_session(self.db) as session:
                    latest = session.exec(select(AuditCheckpoint)  # type: ignore[union-attr]
                                          .order_by(AuditCheckpoint.size.desc())).first()
                    size, _ = self.tiles.integrate_locked(session, written)
                    tree = self.tiles.tree(size, session)
                    self._check_extends(latest, tree, session)
                    if latest is not None and latest.size == size and not extra_keys:
                        signed = AuditCheckpoint(size=latest.size, root=latest.root, note=latest.note,
                                                 created_at=latest.created_at)
                        note = None
                    else:
                        now = datetime.now(timezone.utc).replace(microsecond=0)
                        note = Checkpoint(self.origin, size, tree.root(size),
                                          (f"time {now.isoformat().replace('+00:00', 'Z')}",))
                        for signer in [key, *(extra_keys or [])]:
                            note = note.signed_by(signer)
                        if extra_keys:
                            session.execute(AuditCheckpoint.__table__.delete().where(AuditCheckpoint.size == size))
                        signed = AuditCheckpoint(size=size, root=note.root.hex(), note=note.text(), created_at=now)
                        session.add(AuditCheckpoint(size=size, root=signed.root, note=signed.note, created_at=now))
            except TreeProblem as problem:
                self._fail(problem.problem)
            for level, index, data in written:
                self.tiles._remember(level, index, data)
            self.tiles.known_size = max(self.tiles.known_size, size)
            self._hold(note if note is not None else Checkpoint.parse(signed.note))
            self._checkpointed = size
            return signed

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
        if self.alarms.log is not None:
            return  # nothing is signed while the log fails its check
        try:
            if self._checkpointed < 0:
                latest = self.latest()
                self._checkpointed = latest.size if latest else 0
            size = self._head_size()
            if size - self._checkpointed >= self.every_entries:
                self.checkpoint()
            elif size - self.tiles.known_size >= max(1, self.every_entries // 8):
                self.sync()  # integrate in small steps: signing then holds the log's lock only briefly
        except AuditLogFailed:
            pass  # the alarm is raised; readiness reports it

    def _head_size(self) -> int:
        with Session(reader(self.db)) as session:
            return session.get(AuditHead, 1).size  # type: ignore[union-attr]

    def due(self, now: datetime) -> bool:
        """Has the log grown and the last checkpoint grown older than ``every_minutes``?

        Runs the periodic checks first (:meth:`tick`); never due while the log fails its check.
        """
        self.tick(now)
        if self.alarms.log is not None:
            return False
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
        """Write a bundle of the whole log up to a checkpoint signed now.

        Every exported entry is checked against the tree as it is written: an entry
        changed, removed or reordered in the database since it was read raises the alarm
        and fails the export.
        """
        head = self.checkpoint()
        with Session(reader(self.db)) as session:
            checkpoints = list(session.exec(select(AuditCheckpoint).where(AuditCheckpoint.size <= head.size)
                                            .order_by(AuditCheckpoint.size)))
        tree = self.sync()
        proofs = [{"first": a.size, "second": b.size, "path": [h.hex() for h in tree.consistency_proof(a.size, b.size)]}
                  for a, b in zip(checkpoints, checkpoints[1:])]
        write_bundle(target, self._entries(head.size, tree), [c.note for c in checkpoints], proofs)
        return head

    def _entries(self, size: int, tree: HashTree) -> Iterator[bytes]:
        expected = 0
        with Session(reader(self.db)) as session:
            for start in range(0, size, _BATCH):
                rows = session.execute(select(AuditEntry.seq, AuditEntry.entry_json)
                                       .where(AuditEntry.seq >= start, AuditEntry.seq < min(size, start + _BATCH))
                                       .order_by(AuditEntry.seq))
                for seq, text in rows:
                    data = text.encode()
                    if seq != expected or leaf_hash(data) != tree.leaf(seq):
                        self._fail(f"entry {expected} is not what this server read and signed: it was changed, "
                                   "removed or reordered in the database (the export was stopped)")
                    expected += 1
                    yield data
        if expected != size:
            self._fail(f"entry {expected} is no longer stored: entries were deleted from the database "
                       "(the export was stopped)")
