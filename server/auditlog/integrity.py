"""The checks of the stored log against its signed checkpoints: what is wrong, or None.

:meth:`LogChecks.whole_log` reads every stored entry once, in one snapshot: numbered
0, 1, ... without a gap, as many as the log's counter says, each hashing to its leaf
hash and carrying its own number; every stored checkpoint parsed, signed by one of the
log's keys and matching the root of the entries; the checkpoint kept beside the key
matching too; and the stored tree holding exactly what the entries hash to.
:meth:`LogChecks.since` checks only what was added since an earlier check recorded a
mark (:mod:`civicdp.server.auditlog.marks`), and cheaply what a change below the mark
would show. :meth:`LogChecks.extends` is the check before a signature: the tree extends
the latest stored checkpoint and the one kept beside the key. The checks return what
they found (:class:`Checked`); :class:`civicdp.server.auditlog.log.AuditLog` raises the alarm.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import func, text
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.audit.checkpoint import Checkpoint, CheckpointError
from civicdp.audit.merkle import HashTree
from civicdp.audit.signing import VerifierKey
from civicdp.server.auditlog.marks import Mark
from civicdp.server.auditlog.signing import LogKeys
from civicdp.server.auditlog.tree_store import Scan, TileStore, TreeProblem
from civicdp.server.state.db import reader
from civicdp.server.state.models import AuditCheckpoint, AuditEntry, AuditHead, AuditTile

SIGNING = "refusing to sign a checkpoint that does not extend it"

#: The level-0 tiles below ``:b`` that do not hold the stored leaf hashes of their entries, in order
#: (an entry edited and re-hashed, a row deleted, rows renumbered): one statement the database runs
#: over an index of (seq, leaf_hash) (:data:`civicdp.server.auditlog.marks.LEAF_INDEX`), reading no entry text.
_TILES_DIFFER = {
    "sqlite": "SELECT count(*) FROM audittile t WHERE t.level = 0 AND t.idx * 256 < :b AND "
              "substr(lower(hex(t.hashes)), 1, (min(t.idx * 256 + 256, :b) - t.idx * 256) * 64) IS NOT "
              "(SELECT group_concat(leaf_hash, '') FROM (SELECT leaf_hash FROM auditentry "
              "WHERE seq >= t.idx * 256 AND seq < min(t.idx * 256 + 256, :b) ORDER BY seq))",
    "postgresql": "SELECT count(*) FROM audittile t WHERE t.level = 0 AND t.idx * 256 < :b AND "
                  "substring(t.hashes FROM 1 FOR ((least(t.idx * 256 + 256, :b) - t.idx * 256) * 32)::int) "
                  "IS DISTINCT FROM (SELECT decode(string_agg(leaf_hash, '' ORDER BY seq), 'hex') FROM auditentry "
                  "WHERE seq >= t.idx * 256 AND seq < least(t.idx * 256 + 256, :b))",
}


def below_mark_differs(session: Session, size: int) -> bool:
    """Do the stored entries below ``size`` differ from what the stored tree holds for them (cheaply)?"""
    entries = session.execute(select(func.count()).select_from(AuditEntry)
                              .where(AuditEntry.seq >= 0, AuditEntry.seq < size)).scalar_one()
    tiles = session.execute(select(func.count()).select_from(AuditTile)
                            .where(AuditTile.level == 0, AuditTile.idx < (size + 255) // 256)).scalar_one()
    if entries != size or tiles != (size + 255) // 256:
        return True
    return bool(session.execute(text(_TILES_DIFFER[session.get_bind().dialect.name]), {"b": size}).scalar_one())


@dataclass
class Checked:
    """What a check found: a problem, or the size and root it established (and whether it read everything)."""

    problem: str | None = None
    size: int = 0
    root: str = ""
    checkpoints: str = ""  # the digest of the checkpoint rows up to ``size`` (checked)
    full: bool = False
    suspect: bool = False  # the check since a mark found something the whole-log check must explain


class _Joined(HashTree):
    """Roots for the checkpoint checks: from the stored tree up to a mark, from the scan beyond it."""

    def __init__(self, scan: Scan, tiles: HashTree) -> None:
        self.scan = scan
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.scan)

    def root(self, size: int | None = None) -> bytes:
        size = len(self) if size is None else size
        if size in self.scan.roots:
            return self.scan.roots[size]
        return self.tiles.root(size)


def checkpoints_digest(rows: list[tuple[int, str, str]]) -> str:
    """A digest of stored checkpoint rows (size, root, note), to tell whether they changed since a mark."""
    digest = hashlib.sha256()
    for size, root, note in rows:
        digest.update(f"{size}\n{root}\n{len(note)}\n".encode() + note.encode())
    return digest.hexdigest()


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

    def whole_log(self) -> Checked:
        """Read the whole stored log in one snapshot: what is wrong with it, or the size and root it holds.

        Linear in the size of the log, constant in memory.
        """
        held = self.keys.read_held()
        with snapshot(self.db) as session:
            head = session.execute(select(AuditHead.size).where(AuditHead.id == 1)).scalar_one_or_none() or 0
            stored = session.execute(select(AuditCheckpoint.size, AuditCheckpoint.root, AuditCheckpoint.note)
                                     .order_by(AuditCheckpoint.size)).all()
            keys = self.keys.verifiers(session)
            tree_size = self.tiles.stored_size(session)
            scan = self.tiles.scan(session, {size for size, _, _ in stored} | ({held.size} if held else set())
                                   | {tree_size})
        if scan.problem is not None:
            return Checked(scan.problem)
        if len(scan) != head:
            return Checked(_counter_problem(head, len(scan)))
        for size, root, note in stored:
            problem = check_note(size, root, note, scan, keys, f"the signed checkpoint of size {size:,}")
            if problem is not None:
                return Checked(problem)
        problem = self.keys.check_held(scan, held)
        if problem is not None:
            return Checked(problem)
        if scan.tree_problem is not None:
            self.tiles.forget()
            return Checked(scan.tree_problem)
        rows = [(size, root, note) for size, root, note in stored if size <= tree_size]
        return Checked(None, tree_size, scan.root(tree_size).hex(), checkpoints_digest(rows), full=True)

    def since(self, mark: Mark) -> Checked:
        """Check what was added since ``mark`` (a verified earlier check), and what a change below it would show.

        In one snapshot: the stored tree still has the root the mark recorded at its size
        (O(log n) tiles); the entries below it are all stored (a count) and each has the
        leaf hash the stored tree holds for it (:func:`below_mark_differs`: an entry edited
        and re-hashed, or rows renumbered, differ); the checkpoint rows below it are
        unchanged, or verify again; the entries after it are checked as :meth:`whole_log`
        checks them, extending the stored tree from the mark; every checkpoint beyond it,
        and the one kept beside the key, match. Anything odd below the mark is *suspect*:
        the caller reads the whole log to say what is wrong. An entry's text changed
        without its leaf hash below the mark is found by the next check of the whole log
        (or when the entry is read: exports, stored answers).
        """
        held = self.keys.read_held()
        start = mark.size
        with snapshot(self.db) as session:
            head = session.execute(select(AuditHead.size).where(AuditHead.id == 1)).scalar_one_or_none() or 0
            stored = [tuple(r) for r in session.execute(select(AuditCheckpoint.size, AuditCheckpoint.root,
                                                               AuditCheckpoint.note).order_by(AuditCheckpoint.size))]
            tree_size = self.tiles.stored_size(session)
            if not start <= min(head, tree_size):
                return Checked(suspect=True)
            try:
                below = self.tiles.tree(start, session)
                if below.root(start).hex() != mark.root:
                    return Checked(suspect=True)
            except (TreeProblem, ValueError, LookupError):
                return Checked(suspect=True)
            if below_mark_differs(session, start):
                return Checked(suspect=True)
            keys = self.keys.verifiers(session)
            sizes = {size for size, _, _ in stored if size > start} | ({held.size} if held and held.size > start
                                                                        else set()) | {tree_size}
            try:
                scan = self.tiles.scan(session, sizes, start=start)
            except TreeProblem:
                return Checked(suspect=True)
            joined = _Joined(scan, below)
            if scan.problem is not None:
                return Checked(scan.problem)
            if len(scan) != head:
                return Checked(_counter_problem(head, len(scan)))
            unchanged = checkpoints_digest([r for r in stored if r[0] <= start]).encode() == mark.data
            for size, root, note in stored:
                if size <= start and unchanged:
                    continue
                problem = check_note(size, root, note, joined, keys, f"the signed checkpoint of size {size:,}")
                if problem is not None:
                    return Checked(problem, suspect=size <= start)
            problem = self.keys.check_held(joined, held)
        if problem is not None:
            return Checked(problem, suspect=held is not None and held.size <= start)
        if scan.tree_problem is not None:
            self.tiles.forget()
            return Checked(scan.tree_problem)
        return Checked(None, tree_size, joined.root(tree_size).hex(),
                       checkpoints_digest([r for r in stored if r[0] <= tree_size]))

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


def _counter_problem(head: int, stored: int) -> str:
    return (f"the log's counter says {head:,} entries but {stored:,} are stored: "
            + ("entries were deleted from the database" if stored < head
               else "entries were added, or the counter changed, outside the server"))
