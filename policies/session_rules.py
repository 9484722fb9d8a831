"""Rule changes that commit with a session of the state database, and with its audit entry (issue 15).

``with changes_with(session, store): store.grant(...)`` queues the store's rule changes on
``session`` instead of writing them through the adapter's own connections
(:class:`civicdp.policies.storage.VersionedAdapter`). Whether a change changes anything is
decided at once, from the stored rules and the changes already queued, and the store mirrors
it in its memory, so the rest of the request sees it (e.g. the account's roles in the
answer; should another process change the rules meanwhile, the store reloads and shows it
once committed). The rows and the version step are written when the session commits:

* **Rules in the session's database** (PostgreSQL): in the session's own transaction, just
  before it commits -- the rule rows, the policy version and the change's audit entry
  commit together or not at all.
* **Rules in a file of their own** (SQLite: ``policies.db``, see
  ``civicdp.server.services.bootstrap.policy_database``): no transaction spans both files, so
  the two commits are ordered to fail safe. Changes that widen access (a grant, an allow
  rule, an object link) are written in a transaction of the rules file that commits only
  after the session committed: a crash in between leaves an entry for a change that is not
  in force, never a change in force without its entry. Changes that only narrow access (a
  revoke, a deny rule) commit just before the session does, so a revoke the log records is
  in force; if the session then fails to commit, they are undone. The session's write lock
  on the state database is always taken before the rules file's (the block begins the
  session's transaction), so two writers cannot wait on each other.

A session that rolls back, or is closed without committing, writes nothing, and every store
on the adapter reloads its rules at its next decision, dropping what it had mirrored; after
a commit the stores reload as well. Outside a block, and for a store without a versioned
adapter, changes are written at once, as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction

from civicdp.policies.storage import QUEUE, RULE_FIELDS, VersionedAdapter

_SESSION_KEY = "civicdp_rule_changes"
#: A queued change: (added?, ptype, rule).
Change = tuple[bool, str, tuple[str, ...]]


def widens(add: bool, ptype: str, rule: Sequence[str]) -> bool:
    """Could this change let someone do more? A grant, an allow rule added, a deny rule removed, any object link."""
    if ptype == "g":
        return add
    if ptype == "p":
        return add == (len(rule) < RULE_FIELDS or rule[RULE_FIELDS - 1] != "deny")
    return True


# The adapter's table, written on a given connection (in its transaction).

def _stored(adapter: VersionedAdapter, ptype: str, rule: Sequence[str]) -> bool:
    with adapter._reader.connect() as conn:  # noqa: SLF001 - the adapter's own reader
        return conn.execute(select(adapter._table.c.id).where(adapter._match(ptype, rule)).limit(1)  # noqa: SLF001
                            ).first() is not None


def _apply(adapter: VersionedAdapter, conn: Connection, changes: Sequence[Change]) -> bool:
    """Write ``changes`` on ``conn`` and move the version once; True if any changed a row."""
    table, changed = adapter._table, False  # noqa: SLF001
    for add, ptype, rule in changes:
        match = adapter._match(ptype, rule)  # noqa: SLF001
        if not add:
            changed = conn.execute(table.delete().where(match)).rowcount > 0 or changed
        elif conn.execute(select(table.c.id).where(match)).first() is None:
            with conn.begin_nested():  # another process may store the same rule first
                try:
                    conn.execute(table.insert().values(**adapter._row(ptype, rule)))  # noqa: SLF001
                    changed = True
                except IntegrityError:
                    pass
    if changed:
        adapter._bump(conn)  # noqa: SLF001
    return changed


@dataclass
class SessionChanges:
    """The rule changes queued on one session of the state database."""

    adapter: VersionedAdapter
    session: Session
    changes: list[Change] = field(default_factory=list)
    open: bool = True
    _conn: Connection | None = None  # a transaction on the rules' own database, while one is open
    _txn: Any = None
    _committed_early: bool = False

    # -- queueing (called by the adapter in place of a write) --

    def _present(self, ptype: str, rule: Sequence[str]) -> bool:
        present = None
        for add, queued_ptype, queued_rule in self.changes:
            if queued_ptype == ptype and queued_rule == tuple(rule):
                present = add
        return _stored(self.adapter, ptype, rule) if present is None else present

    def add(self, ptype: str, rule: Sequence[str]) -> bool:
        if self._present(ptype, rule):
            return False
        self.changes.append((True, ptype, tuple(rule)))
        return True

    def remove(self, ptype: str, rule: Sequence[str]) -> bool:
        if not self._present(ptype, rule):
            return False
        self.changes.append((False, ptype, tuple(rule)))
        return True

    # -- the session's commit --

    def before_commit(self) -> None:
        if not self.changes or not self.open:
            return
        if self.session.get_bind().url == self.adapter._engine.url:  # noqa: SLF001 - the rules live here
            _apply(self.adapter, self.session.connection(), self.changes)
            return
        self._conn = self.adapter._engine.connect()  # noqa: SLF001
        self._txn = self._conn.begin()
        try:
            _apply(self.adapter, self._conn, self.changes)
            if not any(widens(*change) for change in self.changes):
                self._txn.commit()  # only narrowing: in force before the session's entry commits
                self._committed_early = True
        except BaseException:
            self._close(commit=False)
            raise

    def after_commit(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self._close(commit=True)
        finally:
            self.adapter._stale()  # noqa: SLF001

    def ended_without_commit(self) -> None:
        """Rolled back or closed: nothing stays written (what was committed early is undone)."""
        if not self.open:
            return
        self.open = False
        try:
            early = self._committed_early
            self._close(commit=False)
            if early:
                undo = [(not add, ptype, rule) for add, ptype, rule in reversed(self.changes)]
                self.adapter._write(lambda conn: _apply(self.adapter, conn, undo))  # noqa: SLF001
        finally:
            if self.changes:
                self.adapter._stale()  # noqa: SLF001

    def _close(self, *, commit: bool) -> None:
        conn, txn, self._conn, self._txn = self._conn, self._txn, None, None
        if conn is None:
            return
        try:
            if txn is not None and txn.is_active:
                txn.commit() if commit else txn.rollback()
        finally:
            conn.close()


def _before_commit(session: Session) -> None:
    changes = session.info.get(_SESSION_KEY)
    if changes is not None:
        changes.before_commit()


def _after_commit(session: Session) -> None:
    changes = session.info.pop(_SESSION_KEY, None)
    if changes is not None:
        changes.after_commit()


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return
    changes = session.info.pop(_SESSION_KEY, None)
    if changes is not None:  # still there: the transaction ended without a commit
        changes.ended_without_commit()


@contextmanager
def changes_with(session: Session, store: Any) -> Iterator[SessionChanges | None]:
    """Queue ``store``'s rule changes made in this block on ``session``, to commit with it.

    ``store`` is a policy store; one without a :class:`VersionedAdapter` (rules in memory
    only) changes at once, as outside the block. Blocks on the same session share one queue.
    """
    adapter = getattr(store, "_adapter", None)
    if not isinstance(adapter, VersionedAdapter):
        yield None
        return
    # The session's transaction first: its end (commit, rollback, close) is what ends the queue,
    # and on SQLite the state database's write lock is then taken before the rules file's, always.
    session.connection()
    changes = session.info.get(_SESSION_KEY)
    if changes is None or changes.adapter is not adapter or not changes.open:
        changes = SessionChanges(adapter, session)
        session.info[_SESSION_KEY] = changes
        if not event.contains(session, "before_commit", _before_commit):
            event.listen(session, "before_commit", _before_commit)
            event.listen(session, "after_commit", _after_commit)
            event.listen(session, "after_transaction_end", _after_transaction_end)
    token = QUEUE.set(changes)
    try:
        yield changes
    finally:
        QUEUE.reset(token)
