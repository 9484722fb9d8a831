"""The checks of the stored log against its signed checkpoints: what is wrong, or None.

:meth:`LogChecks.whole_log` reads every stored entry once, in one snapshot: numbered
0, 1, ... without a gap, as many as the log's counter says, each hashing to its leaf
hash and carrying its own number; every stored checkpoint parsed, signed by one of the
log's keys and matching the root of the entries; the checkpoint kept beside the key
matching too; and the stored tree holding exactly what the entries hash to.
:meth:`LogChecks.extends` is the check before a signature: the tree extends the latest
stored checkpoint and the one kept beside the key. The checks return a problem text;
:class:`civicdp.server.auditlog.log.AuditLog` raises the alarm.
"""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.audit.checkpoint import Checkpoint, CheckpointError
from civicdp.audit.merkle import HashTree
from civicdp.audit.signing import VerifierKey
from civicdp.server.auditlog.signing import LogKeys
from civicdp.server.auditlog.tree_store import Scan, TileStore
from civicdp.server.state.db import reader
from civicdp.server.state.models import AuditCheckpoint, AuditEntry, AuditHead

SIGNING = "refusing to sign a checkpoint that does not extend it"


def snapshot(db: DbEngine) -> Session:
    """A read-only session whose statements all see one state of the database."""
    if db.dialect.name == "sqlite":
        return Session(reader(db))  # a deferred transaction reads one WAL snapshot
    return Session(db.execution_options(isolation_level="REPEATABLE READ"))


def check_note(size: int, root: str, note: str, tree: HashTree | Scan, keys: list[VerifierKey],
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


class LogChecks:
    """The integrity checks of one log's stored entries, tree and checkpoints."""

    def __init__(self, db: DbEngine, tiles: TileStore, keys: LogKeys) -> None:
        self.db = db
        self.tiles = tiles
        self.keys = keys

    def whole_log(self) -> str | None:
        """Read the whole stored log in one snapshot: what is wrong with it, or None.

        Linear in the size of the log, constant in memory.
        """
        held = self.keys.read_held()
        with snapshot(self.db) as session:
            head = session.execute(select(AuditHead.size).where(AuditHead.id == 1)).scalar_one_or_none() or 0
            stored = session.execute(select(AuditCheckpoint.size, AuditCheckpoint.root, AuditCheckpoint.note)
                                     .order_by(AuditCheckpoint.size)).all()
            keys = self.keys.verifiers(session)
            scan = self.tiles.scan(session, {size for size, _, _ in stored} | ({held.size} if held else set()))
        if scan.problem is not None:
            return scan.problem
        if len(scan) != head:
            return (f"the log's counter says {head:,} entries but {len(scan):,} are stored: "
                    + ("entries were deleted from the database" if len(scan) < head
                       else "entries were added, or the counter changed, outside the server"))
        for size, root, note in stored:
            problem = check_note(size, root, note, scan, keys, f"the signed checkpoint of size {size:,}")
            if problem is not None:
                return problem
        problem = self.keys.check_held(scan, held)
        if problem is not None:
            return problem
        if scan.tree_problem is not None:
            self.tiles.forget()
            return scan.tree_problem
        return None

    def extends(self, latest: AuditCheckpoint | None, tree: HashTree | Scan, session: Session,
                count: bool = True) -> str | None:
        """What keeps ``tree`` from extending the latest stored checkpoint and the one kept beside the key."""
        if latest is not None:
            problem = check_note(latest.size, latest.root, latest.note, tree, self.keys.verifiers(session),
                                 f"the latest signed checkpoint (size {latest.size:,})")
            if problem is not None:
                return f"{problem}; {SIGNING}"
        problem = self.keys.check_held(tree)
        if problem is not None:
            return f"{problem}; {SIGNING}"
        if not count:
            return None
        size = len(tree)
        stored = session.execute(select(func.count()).select_from(AuditEntry)
                                 .where(AuditEntry.seq >= 0, AuditEntry.seq < size)).scalar_one()
        if stored != size:
            return (f"{size - stored:,} of the first {size:,} entries this server read are no longer stored: "
                    "entries were deleted from the database")
        return None

    def first(self, latest: AuditCheckpoint | None) -> str | None:
        """Before a process's first signature: read the whole log once against ``latest`` and the kept one."""
        held = self.keys.read_held()
        sizes = ({latest.size} if latest else set()) | ({held.size} if held else set())
        with snapshot(self.db) as session:
            scan = self.tiles.scan(session, sizes)
            if scan.problem is not None:
                return scan.problem
            problem = self.extends(latest, scan, session, count=False)
            if problem is not None:
                return problem
        if scan.tree_problem is not None:
            self.tiles.forget()
            return scan.tree_problem
        return None
