"""The state database: SQLite (WAL) by default, PostgreSQL by ``DATABASE_URL``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from civicdp.server.state import models  # noqa: F401 - registers the tables
from civicdp.server.state import feed_models  # noqa: F401 - registers the feed tables
from civicdp.server.state import ledger_models  # noqa: F401 - registers the charges' cap records
from civicdp.server.state import monitor_models  # noqa: F401 - registers the monitor tables
from civicdp.server.state import plan_models  # noqa: F401 - registers the stored workload plans
from civicdp.server.state import console_models  # noqa: F401 - registers the web console's sessions
from civicdp.server.state import version_findings  # noqa: F401 - registers the registration findings


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and immediate write locks."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection) -> None:  # type: ignore[no-untyped-def]
            # Writers take the write lock at the start, so concurrent charges queue instead
            # of failing to upgrade a read lock (SQLITE_BUSY) halfway through. Sessions on
            # reader(engine) begin deferred, so reads run alongside writes under WAL.
            mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)


def reader(engine: Engine) -> Engine:
    """The same database for read-only work (no write lock taken on SQLite)."""
    return engine.execution_options(sqlite_begin="DEFERRED")


def init_db(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any error."""
    with Session(engine) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def write_turn(engine: Engine) -> Iterator[None]:
    """Wait for this database's write turn among processes (SQLite files; elsewhere nothing to do).

    SQLite's busy handler retries a locked database by sleeping 1, 2, 5, ... 100 ms, so with
    several server processes a writer may sleep long after the lock was released (the p99 of
    cached answers with two workers was ~540 ms). Writers that go through here -- the lean
    path's group commits and the audit tree's integrator -- queue on an ``flock`` of a file
    beside the database, which the kernel hands to the next waiter the moment it is released.
    PostgreSQL's row and advisory locks queue by themselves.
    """
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:" or os.name != "posix":
        yield
        return
    import fcntl  # noqa: PLC0415 - POSIX only

    # A descriptor of its own each time: flock excludes other open files, threads of this process too.
    descriptor = os.open(f"{path}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
