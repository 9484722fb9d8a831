"""The audit log's Merkle tree, stored in the state database as tiles, shared by every server process.

Entries are appended by any process (each in its own transaction, numbered by the
``AuditHead`` row); the tree is *integrated* after them, lazily, by whichever process
next needs it — for a checkpoint, a proof, an export — like a transparency log's
sequencer: under one lock per database (``pg_advisory_xact_lock`` on PostgreSQL, the
write lock that ``BEGIN IMMEDIATE`` takes on SQLite) it reads the entries after the
tree's size, checks each against its leaf hash and its own number, appends them to the
right edge of the stored tiles (:mod:`civicdp.audit.tiles`) and moves the tree's size on, in one
transaction. Appending an entry therefore costs nothing extra, any process answers
proofs and checkpoints from the same stored tree, and a restart rebuilds nothing: a
root or a proof reads O(log n) tiles (about 32 bytes per entry in all, 32 MB at one
million entries, instead of ~200 MB of hashes in each process's memory).

Full tiles never change and are kept in a bounded cache per process; a partial tile
only grows, so a cached prefix stays right. :meth:`TileStore.scan` reads the whole log
once, rebuilding the tiles from the entries to compare with the stored ones and giving
the root at any size asked, in memory that does not grow with the log.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from sqlalchemy import select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session

from civicdp.audit.tiles import HASH_SIZE, TILE_WIDTH, TileBuilder, TileTree, split_hashes, tile_width
from civicdp.server.state.db import reader, write_turn
from civicdp.server.state.models import AuditEntry, AuditHead, AuditTile, AuditTree

#: The key of the advisory lock (PostgreSQL) that one integrator or checkpoint signer holds at a time.
LOG_LOCK = 0x63_69_76_69_63_64_70_01  # "civicdp" + 1
#: Entries integrated per transaction: bounds how long the lock is held when far behind.
CHUNK = 20_000
#: Tiles kept in memory per process (8 KiB each when full).
CACHE_TILES = 2048

#: ``check(seq, text, hex_hash)``: the entry's leaf hash, or a text saying what is wrong with it.
CheckLeaf = Callable[[int, str, str], "bytes | str"]


class TreeProblem(Exception):
    """The stored entries or tree failed a check while being read: the text says what (an alarm)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@contextmanager
def locked_session(db: DbEngine) -> Iterator[Session]:
    """A write transaction holding the log's lock: one integrator or signer per database at a time.

    Commits on success, rolls back on any error. On SQLite the transaction begins
    IMMEDIATE, which takes the database's write lock; on PostgreSQL it takes a
    transaction-scoped advisory lock, released at commit or rollback.
    """
    with write_turn(db), Session(db) as session:
        try:
            if db.dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOG_LOCK})
            else:
                session.connection()  # BEGIN IMMEDIATE: the write lock, now
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@dataclass
class Scan:
    """What one read of the whole log found: a tree-like view for the checkpoint checks.

    ``len()`` is the number of stored entries read (up to the first problem);
    :meth:`root` the root of the entries at each size that was asked for.
    """

    count: int = 0
    tree_size: int = 0
    roots: dict[int, bytes] = field(default_factory=dict)
    problem: str | None = None  # an entry missing, changed or reordered
    tree_problem: str | None = None  # the stored tiles do not hold what the entries hash to

    def __len__(self) -> int:
        return self.count

    def root(self, size: int | None = None) -> bytes:
        size = self.count if size is None else size
        if size not in self.roots:
            raise ValueError(f"the scan did not compute the root at size {size}")
        return self.roots[size]


class TileStore:
    """The stored tree of one database, as this process reads and extends it."""

    def __init__(self, db: DbEngine, check_leaf: CheckLeaf, cache_tiles: int = CACHE_TILES) -> None:
        self.db = db
        self.check_leaf = check_leaf
        self.cache_tiles = cache_tiles
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        #: The largest tree size this process has seen stored (the tree never shrinks).
        self.known_size = 0
        #: Statements read from the database, for tests and the benchmark: tiles and entries.
        self.reads = {"tiles": 0, "entries": 0}

    # -- reading tiles -------------------------------------------------------------------------

    def _cached(self, level: int, index: int, width: int) -> bytes | None:
        with self._cache_lock:
            data = self._cache.get((level, index))
            if data is not None and len(data) >= width * HASH_SIZE:
                self._cache.move_to_end((level, index))
                return data
        return None

    def _remember(self, level: int, index: int, data: bytes) -> None:
        with self._cache_lock:
            old = self._cache.get((level, index))
            if old is None or len(data) > len(old):
                self._cache[(level, index)] = data
            self._cache.move_to_end((level, index))
            while len(self._cache) > self.cache_tiles:
                self._cache.popitem(last=False)

    def forget(self) -> None:
        """Drop the cached tiles (after the stored tree was found to disagree with them)."""
        with self._cache_lock:
            self._cache.clear()

    def _read_tile(self, session: Session | None, level: int, index: int) -> bytes | None:
        self.reads["tiles"] += 1
        statement = select(AuditTile.hashes).where(AuditTile.level == level, AuditTile.idx == index)
        if session is not None:
            return session.execute(statement).scalar_one_or_none()
        with Session(reader(self.db)) as own:
            return own.execute(statement).scalar_one_or_none()

    def fetcher(self, session: Session | None = None) -> Callable[[int, int, int], bytes]:
        """``fetch(level, index, width)`` for a :class:`TileTree`: cached, else read (through ``session``)."""

        def fetch(level: int, index: int, width: int) -> bytes:
            data = self._cached(level, index, width)
            if data is not None:
                return data
            data = self._read_tile(session, level, index)
            if data is None or len(data) < width * HASH_SIZE:
                raise TreeProblem(f"tile {level}/{index} of the stored Merkle tree is missing or shorter than the "
                                  "tree's size says: its rows were changed in the database")
            self._remember(level, index, data)  # stored before (tiles written now are cached after commit)
            return data

        return fetch

    def tree(self, size: int, session: Session | None = None) -> TileTree:
        """A view of the stored tree's first ``size`` entries."""
        return TileTree(size, self.fetcher(session))

    @staticmethod
    def stored_size(session: Session) -> int:
        return session.execute(select(AuditTree.size).where(AuditTree.id == 1)).scalar_one_or_none() or 0

    def size(self) -> int:
        """The stored tree's size now (entries integrated)."""
        with Session(reader(self.db)) as session:
            size = self.stored_size(session)
        self.known_size = max(self.known_size, size)
        return size

    # -- integrating entries ---------------------------------------------------------------

    def integrate(self) -> int:
        """Integrate every committed entry into the stored tree; the tree's size after.

        Each chunk of :data:`CHUNK` entries is one transaction under the log's lock. Raises
        :class:`TreeProblem` for a missing, changed or reordered entry, or a tree larger
        than the log.
        """
        while True:
            written: list[tuple[int, int, bytes]] = []
            with locked_session(self.db) as session:
                size, head = self.integrate_locked(session, written)
            for level, index, data in written:  # committed: safe to remember
                self._remember(level, index, data)
            self.known_size = max(self.known_size, size)
            if size >= head:
                return size

    def integrate_locked(self, session: Session, written: list[tuple[int, int, bytes]] | None = None,
                         limit: int = CHUNK) -> tuple[int, int]:
        """Inside a :func:`locked_session`: integrate up to ``limit`` entries; (tree size, log size).

        The tiles written are appended to ``written`` (to cache once the transaction commits).
        """
        head = session.execute(select(AuditHead.size).where(AuditHead.id == 1)).scalar_one_or_none() or 0
        size = self.stored_size(session)
        if size > head:
            raise TreeProblem(f"the stored Merkle tree holds {size:,} entries but the log's counter says {head:,}: "
                              "entries were removed (the log was truncated) or the counter was changed")
        if size == head:
            return size, head
        end = min(head, size + limit)
        self.reads["entries"] += 1
        rows = session.execute(select(AuditEntry.seq, AuditEntry.entry_json, AuditEntry.leaf_hash)
                               .where(AuditEntry.seq >= size, AuditEntry.seq < end).order_by(AuditEntry.seq))
        builder = TileBuilder(size, self._edges(session, size))
        for seq, entry_text, hex_hash in rows:
            if seq != builder.size:
                raise TreeProblem(f"entry {builder.size} is missing but entries from {seq} on are stored: an entry "
                                  "was deleted from the database")
            leaf = self.check_leaf(seq, entry_text, hex_hash)
            if isinstance(leaf, str):
                raise TreeProblem(leaf)
            builder.add(leaf)
        if builder.size < end:
            raise TreeProblem(f"the log's counter says {head:,} entries but only {builder.size:,} are stored: "
                              "entries were deleted from the database")
        tiles = builder.take_full() + builder.partial()
        self._write(session, tiles)
        moved = session.execute(update(AuditTree).where(AuditTree.id == 1, AuditTree.size == size)
                                .values(size=builder.size)).rowcount
        if moved != 1:
            if size != 0 or session.get(AuditTree, 1) is not None:
                raise TreeProblem("the stored Merkle tree's size changed while it was being extended under its lock")
            session.add(AuditTree(id=1, size=builder.size))
            session.flush()
        if written is not None:
            written.extend(tiles)
        return builder.size, head

    def _edges(self, session: Session, size: int) -> list[list[bytes]]:
        """The right edge of the stored tree of ``size`` entries (the hashes of its partial tiles)."""
        fetch = self.fetcher(session)
        return [split_hashes(fetch(level, index, width)[:width * HASH_SIZE]) if width else []
                for level, index, width in TileBuilder.edge_tiles(size)]

    @staticmethod
    def _write(session: Session, tiles: list[tuple[int, int, bytes]]) -> None:
        if not tiles:
            return
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = insert(AuditTile)
        statement = statement.on_conflict_do_update(index_elements=["level", "idx"],
                                                    set_={"hashes": statement.excluded.hashes})
        session.execute(statement, [{"level": level, "idx": index, "hashes": data} for level, index, data in tiles])

    # -- reading the whole log -----------------------------------------------------------------

    def scan(self, session: Session, sizes: set[int], batch: int = CHUNK, start: int = 0) -> Scan:
        """Read every stored entry once (in ``session``'s snapshot) and compare it with the stored tree.

        Checks each entry (no number missing, hashing to its leaf hash, carrying its own
        number), rebuilds the tiles from the entries and compares them with the stored
        tiles up to the tree's size, and computes the root at each of ``sizes`` that is
        reached. Memory stays O(batch + log n).

        From ``start`` on, the entries before it taken as the stored tree holds them (its
        right edge at ``start`` is read; :class:`TreeProblem` if a tile of it is missing):
        the check of the entries added since an earlier check.
        """
        result = Scan(tree_size=self.stored_size(session))
        builder = TileBuilder(start, self._edges(session, start)) if start else TileBuilder()
        result.count = builder.size
        if start in sizes:
            result.roots[start] = builder.root()
        after = start - 1
        while True:
            self.reads["entries"] += 1
            rows = session.execute(select(AuditEntry.seq, AuditEntry.entry_json, AuditEntry.leaf_hash)
                                   .where(AuditEntry.seq > after).order_by(AuditEntry.seq).limit(batch)).all()
            if not rows:
                break
            for seq, entry_text, hex_hash in rows:
                if seq != builder.size:
                    result.problem = (f"entry {builder.size} is missing but entries from {seq} on are stored: "
                                      "an entry was deleted from the database")
                    break
                leaf = self.check_leaf(seq, entry_text, hex_hash)
                if isinstance(leaf, str):
                    result.problem = leaf
                    break
                builder.add(leaf)
                if builder.size in sizes:
                    result.roots[builder.size] = builder.root()
            result.count = builder.size
            if result.tree_problem is None:
                result.tree_problem = self._compare(session, builder.take_full(), result.tree_size)
            if result.problem is not None:
                return result
            after = rows[-1][0]
        if result.tree_problem is None:
            result.tree_problem = self._compare(session, builder.partial(touched_only=False), result.tree_size)
        if result.tree_problem is None and result.tree_size > result.count:
            result.tree_problem = (f"the stored Merkle tree holds {result.tree_size:,} entries but only "
                                   f"{result.count:,} are stored: entries were deleted from the database")
        return result

    def _compare(self, session: Session, rebuilt: list[tuple[int, int, bytes]], tree_size: int) -> str | None:
        """What is wrong with the stored tiles against the tiles rebuilt from the entries, or None."""
        wanted = [(level, index, data) for level, index, data in rebuilt if tile_width(tree_size, level, index)]
        if not wanted:
            return None
        stored: dict[tuple[int, int], bytes] = {}
        for level in sorted({level for level, _, _ in wanted}):
            indexes = [index for lv, index, _ in wanted if lv == level]
            self.reads["tiles"] += 1
            for index, data in session.execute(select(AuditTile.idx, AuditTile.hashes).where(
                    AuditTile.level == level, AuditTile.idx >= min(indexes), AuditTile.idx <= max(indexes))):
                stored[(level, index)] = data
        for level, index, data in wanted:
            width = tile_width(tree_size, level, index) * HASH_SIZE
            have = stored.get((level, index), b"")[:width]
            if have == data[:width]:
                continue
            if level == 0:
                first = next((i for i in range(0, width, HASH_SIZE) if have[i:i + HASH_SIZE] != data[i:i + HASH_SIZE]),
                             0) // HASH_SIZE
                return (f"entry {index * TILE_WIDTH + first} is not what this server read earlier: it was changed, "
                        "removed or reordered in the database (it differs from the stored Merkle tree)")
            return (f"the stored Merkle tree (tile {level}/{index}) does not match the entries: its rows were "
                    "changed in the database")
        return None


def ensure_tree(db: DbEngine) -> None:
    """Create the tree's size row once (concurrent starts: one insert wins)."""
    from sqlalchemy.exc import IntegrityError  # noqa: PLC0415

    with Session(db) as session:
        if session.get(AuditTree, 1) is not None:
            return
        try:
            session.add(AuditTree(id=1, size=0))
            session.commit()
        except IntegrityError:
            session.rollback()

