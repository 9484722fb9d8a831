"""Where the rules are stored: one SQL table shared by every process, unique rows, and a version.

:class:`VersionedAdapter` is ``sqlalchemy_adapter.Adapter`` (the ``casbin_rule`` table,
columns ``ptype, v0..v5``) with two additions that make the database the one source of
truth for every process that enforces the rules -- each server worker, the command line:

* **Unique rules.** A unique index over ``ptype`` and the six fields (``coalesce(v, '')``,
  since SQL treats NULLs as distinct) makes a second copy of a rule impossible, whichever
  process or route adds it. Rows duplicated before the index existed are removed (the
  lowest id is kept) when the adapter opens the table. An add that finds the rule present
  -- in the table, not in some process's memory -- reports ``False``; a remove deletes every
  stored copy and reports whether it deleted anything.
* **A version.** The single row of ``casbin_rule_version`` is incremented in the same
  transaction as every change to the rules, so a process knows its rules are current
  exactly when the version it loaded is still the stored one: one indexed read.
  :class:`PolicyVersionWatcher` is the pycasbin watcher over it; the policy store polls it
  before deciding and reloads when the version moved.

The adapter's writes go through its own connections and commit at once (on SQLite the
server keeps the rules in a file of their own, so these writes never wait on a steward's
open transaction in the state database) -- except for changes queued on a session of the
state database, which are written when it commits, with its audit entry
(:func:`civicdp.policies.session_rules.changes_with`).
"""

from __future__ import annotations

import contextvars
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from casbin import persist
from casbin.persist.watcher import Watcher
from sqlalchemy import BigInteger, Column, Integer, MetaData, Table, and_, event, func, or_, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy_adapter import Adapter

RULE_FIELDS = 6
#: The queue of rule changes (a ``session_rules.SessionChanges``) whose ``changes_with`` block runs in this context.
QUEUE: contextvars.ContextVar[Any] = contextvars.ContextVar("civicdp_rule_changes", default=None)


def version_table(rule_table: str) -> Table:
    """The one-row version table of a rule table (``casbin_rule`` -> ``casbin_rule_version``)."""
    return Table(f"{rule_table}_version", MetaData(),
                 Column("id", Integer, primary_key=True, autoincrement=False),
                 Column("version", BigInteger, nullable=False))


def unique_index(rule_table: str) -> str:
    """The name of the unique index over a rule table's rules."""
    return f"{rule_table}_unique_rule"


class VersionedAdapter(Adapter):
    """The SQLAlchemy adapter with unique rules and a version bumped by every change."""

    def __init__(self, engine: Engine, table_name: str = "casbin_rule", *, read_engine: Engine | None = None) -> None:
        super().__init__(engine, table_name=table_name)
        #: For reads (the version, loading): the server hands in one that takes no write lock on SQLite.
        self._reader = read_engine or engine
        self._table = self._db_class.__table__
        self._fields = [self._table.c[f"v{i}"] for i in range(RULE_FIELDS)]
        #: The version the last change of this adapter committed (None before any change). For a
        #: change queued on a session: the version its store's memory moves to by mirroring it.
        self.last_version: int | None = None
        #: The watchers of the stores over this adapter (told to reload after queued changes end).
        self._watchers: weakref.WeakSet[PolicyVersionWatcher] = weakref.WeakSet()
        #: Set by a queued change until its store has mirrored it (see PolicyVersionWatcher.loaded).
        self._mirroring = False
        self._version_lock = threading.Lock()
        self._version_conn: Any = None
        event.listen(engine, "engine_disposed", self._on_dispose)
        self._version = version_table(self._table.name)
        self._index = unique_index(self._table.name)
        self._version.metadata.create_all(engine)
        self._ensure_version_row()
        self._ensure_unique_index()

    # -- set-up ---------------------------------------------------------------------------

    def _ensure_version_row(self) -> None:
        try:
            with self._engine.begin() as conn:
                if conn.execute(select(self._version.c.id).where(self._version.c.id == 1)).first() is None:
                    conn.execute(self._version.insert().values(id=1, version=0))
        except IntegrityError:
            pass  # another process inserted it first

    def _ensure_unique_index(self) -> None:
        """Remove duplicated rows (kept: the oldest), then make duplicates impossible."""
        if self._has_unique_index():
            return
        key = [self._table.c.ptype, *self._fields]
        columns = ", ".join(f"coalesce({c.name}, '')" for c in key)
        try:
            with self._engine.begin() as conn:
                keep = select(func.min(self._table.c.id)).group_by(*(func.coalesce(c, "") for c in key))
                removed = conn.execute(self._table.delete().where(self._table.c.id.not_in(keep))).rowcount
                if removed:
                    self._bump(conn)
                conn.execute(text(f"CREATE UNIQUE INDEX IF NOT EXISTS {self._index} "
                                  f"ON {self._table.name} ({columns})"))
        except (IntegrityError, OperationalError, ProgrammingError):
            # Two processes opening a fresh database at once: one of them made the index.
            if not self._has_unique_index():
                raise

    def _has_unique_index(self) -> bool:
        # Looked up by name: SQLAlchemy does not reflect expression indexes on SQLite.
        if self._engine.dialect.name == "sqlite":
            query = text("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = :name")
        else:
            query = text("SELECT 1 FROM pg_indexes WHERE indexname = :name AND schemaname = current_schema()")
        with self._reader.connect() as conn:
            return conn.execute(query, {"name": self._index}).first() is not None

    # -- the version ----------------------------------------------------------------------

    def version(self) -> int:
        """The stored policy version (one indexed read).

        Read on a connection of its own, kept open and in autocommit (asked before every
        decision, so the pool's check-out and a transaction per read would cost more than
        the read itself); on any failure the connection is dropped and the read made once
        more on a new one.
        """
        with self._version_lock:
            for attempt in (1, 2):
                try:
                    if self._version_conn is None:
                        self._version_conn = self._reader.raw_connection()
                        if self._engine.dialect.name != "sqlite":
                            self._version_conn.rollback()
                            self._version_conn.dbapi_connection.autocommit = True  # one round trip per read
                    cursor = self._version_conn.cursor()
                    try:
                        cursor.execute(f"SELECT version FROM {self._version.name} WHERE id = 1")
                        row = cursor.fetchone()
                    finally:
                        cursor.close()
                    return int(row[0]) if row else 0
                except Exception:
                    self._close_version_conn()
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _close_version_conn(self, *_: object) -> None:
        conn, self._version_conn = self._version_conn, None
        if conn is not None:
            try:
                conn.invalidate()  # closed, not handed back to the pool
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        """Close the connection the version is read on (the engine's dispose does it too)."""
        with self._version_lock:
            self._close_version_conn()

    def _on_dispose(self, _engine: Engine) -> None:
        with self._version_lock:
            self._close_version_conn()

    def _bump(self, conn: Connection) -> None:
        conn.execute(self._version.update().where(self._version.c.id == 1)
                     .values(version=self._version.c.version + 1))
        self.last_version = int(conn.execute(select(self._version.c.version)
                                             .where(self._version.c.id == 1)).scalar_one())

    def _match(self, ptype: str, rule: Sequence[str]) -> Any:
        """The WHERE clause of exactly ``rule`` (missing fields stored as NULL or '')."""
        terms = [self._table.c.ptype == ptype]
        for i, column in enumerate(self._fields):
            if i < len(rule):
                terms.append(column == rule[i])
            else:
                terms.append(or_(column.is_(None), column == ""))
        return and_(*terms)

    def _row(self, ptype: str, rule: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"ptype": ptype}
        for i, value in enumerate(rule):
            row[f"v{i}"] = value
        return row

    def _write(self, change: Callable[[Connection], bool]) -> bool:
        """Run ``change`` in one transaction; bump the version there if it changed anything."""
        try:
            with self._engine.begin() as conn:
                changed = change(conn)
                if changed:
                    self._bump(conn)
                return changed
        except IntegrityError:
            return False  # another process stored the same rule first

    # -- the adapter interface (auto-save) ------------------------------------------------

    def add_policy(self, sec: str, ptype: str, rule: Sequence[str]) -> bool:
        """Store ``rule``; False (nothing written) if it is stored already.

        Inside ``session_rules.changes_with`` the rule is queued on the session instead (see there).
        """
        queue = self._queue()
        if queue is not None:
            return self._queued(queue.add(ptype, rule))

        def change(conn: Connection) -> bool:
            if conn.execute(select(self._table.c.id).where(self._match(ptype, rule))).first() is not None:
                return False
            conn.execute(self._table.insert().values(**self._row(ptype, rule)))
            return True
        return self._write(change)

    def add_policies(self, sec: str, ptype: str, rules: Sequence[Sequence[str]]) -> bool:
        def change(conn: Connection) -> bool:
            added = False
            for rule in rules:
                if conn.execute(select(self._table.c.id).where(self._match(ptype, rule))).first() is None:
                    conn.execute(self._table.insert().values(**self._row(ptype, rule)))
                    added = True
            return added
        return self._write(change)

    def remove_policy(self, sec: str, ptype: str, rule: Sequence[str]) -> bool:
        """Delete every stored copy of ``rule``; False if there was none (queued in ``session_rules.changes_with``)."""
        queue = self._queue()
        if queue is not None:
            return self._queued(queue.remove(ptype, rule))
        return self._write(lambda conn: conn.execute(self._table.delete().where(self._match(ptype, rule)))
                           .rowcount > 0)

    def remove_policies(self, sec: str, ptype: str, rules: Sequence[Sequence[str]]) -> bool:
        def change(conn: Connection) -> bool:
            removed = 0
            for rule in rules:
                removed += conn.execute(self._table.delete().where(self._match(ptype, rule))).rowcount
            return removed > 0
        return self._write(change)

    def remove_filtered_policy(self, sec: str, ptype: str, field_index: int, *field_values: str) -> bool:
        if not (0 <= field_index < RULE_FIELDS and 1 <= field_index + len(field_values) <= RULE_FIELDS):
            return False
        terms = [self._table.c.ptype == ptype]
        terms += [self._fields[field_index + i] == v for i, v in enumerate(field_values) if v != ""]
        return self._write(lambda conn: conn.execute(self._table.delete().where(and_(*terms))).rowcount > 0)

    def update_policy(self, sec: str, ptype: str, old_rule: Sequence[str], new_rule: Sequence[str]) -> bool:
        def change(conn: Connection) -> bool:
            values = {f"v{i}": (new_rule[i] if i < len(new_rule) else None) for i in range(RULE_FIELDS)}
            return conn.execute(self._table.update().where(self._match(ptype, old_rule)).values(**values)
                                ).rowcount > 0
        return self._write(change)

    def update_policies(self, sec: str, ptype: str, old_rules: Sequence[Sequence[str]],
                        new_rules: Sequence[Sequence[str]]) -> bool:
        changed = False
        for old, new in zip(old_rules, new_rules, strict=True):
            changed = self.update_policy(sec, ptype, old, new) or changed
        return changed

    def save_policy(self, model: Any) -> bool:
        """Replace every stored rule with the model's (one transaction, one version step)."""
        def change(conn: Connection) -> bool:
            conn.execute(self._table.delete())
            seen: set[tuple[str, ...]] = set()
            for sec in ("p", "g"):
                for ptype, assertion in model.model.get(sec, {}).items():
                    for rule in assertion.policy:
                        if (ptype, *rule) not in seen:
                            seen.add((ptype, *rule))
                            conn.execute(self._table.insert().values(**self._row(ptype, rule)))
            return True
        return self._write(change)

    def load_policy(self, model: Any) -> None:
        """Load every stored rule into ``model`` (oldest first, as stored)."""
        with self._reader.connect() as conn:
            rows = conn.execute(select(self._table.c.ptype, *self._fields).order_by(self._table.c.id)).all()
        for ptype, *values in rows:
            persist.load_policy_line(", ".join([ptype, *(v for v in values if v is not None)]), model)

    # -- changes queued on a session ------------------------------------------------------

    def _queue(self) -> Any:
        """The open queue of this adapter's changes in this context (see ``session_rules``), if any."""
        queue = QUEUE.get()
        return queue if queue is not None and queue.adapter is self and queue.open else None

    def _queued(self, changed: bool) -> bool:
        """After a queued change: let the store mirror it without moving the version it loaded."""
        if changed:
            loaded = [w.loaded for w in self._watchers]
            self.last_version = loaded[0] + 1 if len(loaded) == 1 and loaded[0] is not None else None
            self._mirroring = self.last_version is not None
        return changed

    def _stale(self) -> None:
        """Every store on this adapter reloads at its next decision (its memory may differ from the table)."""
        self._mirroring = False
        for watcher in list(self._watchers):
            watcher.stale()


class PolicyVersionWatcher(Watcher):
    """A pycasbin watcher over the stored policy version: polled, with no thread of its own.

    :meth:`update` is what the enforcer calls after a change; the adapter already moved the
    version in the change's own transaction, so there is nothing to send. :meth:`poll`
    compares the stored version with the one the process loaded (at most once every
    ``interval`` seconds, 0: every call) and calls the update callback -- the policy store's
    reload -- when it moved.
    """

    def __init__(self, adapter: VersionedAdapter, interval: float = 0.0) -> None:
        self.adapter = adapter
        self.interval = max(float(interval), 0.0)
        self._loaded: int | None = None
        self._callback: Callable[[], None] | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        adapter._watchers.add(self)

    @property
    def loaded(self) -> int | None:
        """The stored version the store's rules were loaded at (None: reload at the next poll)."""
        return self._loaded

    @loaded.setter
    def loaded(self, version: int | None) -> None:
        # A change queued on a session is mirrored in memory, but the rules there are still
        # those of the stored version: it must not look loaded at a version not yet stored.
        if self.adapter._mirroring:
            self.adapter._mirroring = False
            return
        self._loaded = version

    def stale(self) -> None:
        """The rules in memory may differ from the stored ones: reload at the next poll, whatever the interval."""
        with self._lock:
            self._loaded = None
            self._checked = float("-inf")

    def set_update_callback(self, func: Callable[[], None]) -> None:
        self._callback = func

    def update(self) -> None:
        """Nothing to send: the version moved in the change's transaction."""

    def close(self) -> None:
        self._callback = None

    def poll(self) -> bool:
        """Reload (through the callback) if the stored version moved; True if it did."""
        if self.interval:
            now = time.monotonic()
            with self._lock:
                if now - self._checked < self.interval:
                    return False
                self._checked = now
        if self.adapter.version() == self.loaded:
            return False
        if self._callback is not None:
            self._callback()
        return True
