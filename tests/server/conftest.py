"""Database fixtures for server tests: a fresh SQLite file or a fresh PostgreSQL schema.

``sqlite_engine`` is a WAL-mode SQLite file in ``tmp_path``, configured exactly as the
server configures it (``civicdp.server.state.db.make_engine``). ``pg_engine`` points at the
PostgreSQL server of ``CIVICDP_TEST_POSTGRES_URL`` (default: the local ``test``
database) with a schema created for the test alone and dropped afterwards, so tests
can run in parallel and never see each other's rows; ``pg_url`` is that schema's URL,
for tests that start other processes. ``db_engine`` runs a test once on each. Tests
using the PostgreSQL fixtures must be marked ``@pytest.mark.postgres``; they are
skipped with a reason if the server cannot be reached, and fail instead when
``CIVICDP_REQUIRE_POSTGRES=1`` (set it in CI). All engines are disposed on teardown
(``filterwarnings = error`` turns an unclosed psycopg connection into a failure).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from civicdp.server.state.db import init_db, make_engine

PG_URL = os.environ.get("CIVICDP_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file (no tables yet)."""
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    """A server-configured engine on a fresh SQLite file, with all civicdp tables."""
    engine = make_engine(sqlite_url)
    try:
        init_db(engine)
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL schema, dropped (with everything in it) afterwards."""
    schema = f"civicdp_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_URL, poolclass=NullPool)
    try:
        try:
            with admin.begin() as connection:
                connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server
            if os.environ.get("CIVICDP_REQUIRE_POSTGRES") == "1":
                raise
            pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}: {exc}")
        # Every connection of this URL sees only the test's schema.
        url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        admin.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """A server-configured engine on a fresh PostgreSQL schema, with all civicdp tables."""
    engine = make_engine(pg_url)
    try:
        init_db(engine)
        yield engine
    finally:
        engine.dispose()  # before the schema is dropped: no connection may hold its locks


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_engine(request: pytest.FixtureRequest) -> Engine:
    """The test runs twice: on a fresh SQLite file and on a fresh PostgreSQL schema."""
    return request.getfixturevalue(f"{'sqlite' if request.param == 'sqlite' else 'pg'}_engine")
