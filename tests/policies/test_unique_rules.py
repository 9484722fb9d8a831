"""One stored copy of each rule, a version that moves with every change, and stores that follow it.

Two :class:`PolicyStore` objects on one database stand for two processes (a server
worker and the command line). The database decides every change: a grant already stored
by the other store is not stored twice, a revoke removes every stored copy and says
whether there was one, and a store whose memory is behind reloads before its next
decision -- including the decisions it had memoised. Each test runs on SQLite and on
PostgreSQL (a schema of its own).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from civicdp.policies.actions import Action, Role
from civicdp.policies.defaults import default_rules
from civicdp.policies.enforcer import PolicyStore
from civicdp.policies.storage import VersionedAdapter

PG_URL = os.environ.get("CIVICDP_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
ANA = "account:ana"
TABLE = "casbin_rule"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sqlalchemy.Engine]:
    if request.param == "sqlite":
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'policies.db'}")
        try:
            yield engine
        finally:
            engine.dispose()
        return
    schema = f"civicdp_rules_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(PG_URL, poolclass=NullPool)
    try:
        try:
            with admin.begin() as connection:
                connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server
            if os.environ.get("CIVICDP_REQUIRE_POSTGRES") == "1":
                raise
            pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}")
        url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        engine = sqlalchemy.create_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()
            with admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        admin.dispose()


def store(engine: sqlalchemy.Engine) -> PolicyStore:
    return PolicyStore(VersionedAdapter(engine))


def stored_rows(engine: sqlalchemy.Engine, ptype: str, *values: str) -> int:
    conditions = " AND ".join(f"v{i} = :v{i}" for i in range(len(values)))
    with engine.connect() as connection:
        return int(connection.execute(text(f"SELECT count(*) FROM {TABLE} WHERE ptype = :p AND {conditions}"),
                                      {"p": ptype, **{f"v{i}": v for i, v in enumerate(values)}}).scalar_one())


def with_defaults(engine: sqlalchemy.Engine) -> PolicyStore:
    first = store(engine)
    default_rules(first)
    first.register_dataset("civic-demo")
    first.assign_public_column("civic-demo", "service")
    return first


def test_the_database_refuses_a_second_copy_of_a_rule(engine: sqlalchemy.Engine) -> None:
    with_defaults(engine).grant(ANA, Role.ANALYST, "health")
    with pytest.raises(IntegrityError):
        with engine.begin() as connection:  # whatever route: even a row written by hand
            connection.execute(text(f"INSERT INTO {TABLE} (ptype, v0, v1, v2) VALUES ('g', :s, 'analyst', 'health')"),
                               {"s": ANA})
    assert stored_rows(engine, "g", ANA, "analyst", "health") == 1


def test_a_grant_made_by_two_processes_is_stored_once_and_one_revoke_removes_it(engine: sqlalchemy.Engine) -> None:
    server = with_defaults(engine)
    command_line = store(engine)
    assert command_line.grant(ANA, Role.ANALYST, "health") is True
    # The server's memory does not have it yet; the database says it is held.
    assert server.grant(ANA, Role.ANALYST, "health") is False
    assert stored_rows(engine, "g", ANA, "analyst", "health") == 1
    assert server.check(ANA, "health", "dataset:civic-demo", Action.DATASET_READ).allowed
    assert command_line.revoke(ANA, Role.ANALYST, "health") is True
    assert stored_rows(engine, "g", ANA, "analyst", "health") == 0
    decision = server.check(ANA, "health", "dataset:civic-demo", Action.DATASET_READ)
    assert not decision.allowed and "no roles" in decision.reason
    assert server.revoke(ANA, Role.ANALYST, "health") is False  # nothing left to revoke, whoever asks
    assert command_line.revoke(ANA, Role.ANALYST, "health") is False


def test_rules_duplicated_before_the_index_are_removed_when_the_table_is_opened(engine: sqlalchemy.Engine) -> None:
    with engine.begin() as connection:  # a table made by the plain adapter, with the duplicates issue 15 saw
        connection.execute(text(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, ptype VARCHAR(255), v0 VARCHAR(255), "
                                "v1 VARCHAR(255), v2 VARCHAR(255), v3 VARCHAR(255), v4 VARCHAR(255), "
                                "v5 VARCHAR(255))"))
        for i in (1, 2):
            connection.execute(text(f"INSERT INTO {TABLE} (id, ptype, v0, v1, v2) VALUES (:i, 'g', :s, 'analyst', "
                                    "'health')"), {"i": i, "s": ANA})
    opened = store(engine)
    assert stored_rows(engine, "g", ANA, "analyst", "health") == 1
    assert opened.roles_of(ANA) == [(Role.ANALYST, "health")]
    assert opened.revoke(ANA, Role.ANALYST, "health") is True
    assert opened.roles_of(ANA) == [] and store(engine).roles_of(ANA) == []


def test_every_change_moves_the_version_once_and_a_change_of_nothing_does_not(engine: sqlalchemy.Engine) -> None:
    first = with_defaults(engine)
    adapter = VersionedAdapter(engine)
    start = adapter.version()
    assert first.grant(ANA, Role.ANALYST, "health")
    assert adapter.version() == start + 1 == first.version
    assert not first.grant(ANA, Role.ANALYST, "health")
    assert not first.revoke(ANA, Role.ANALYST, "transport")
    assert not first.remove_rule("analyst", "*", "server", Action.AUDIT_READ)
    assert adapter.version() == start + 1
    assert first.allow(ANA, "health", "dataset:civic-demo", Action.RELEASE_READ)
    assert first.assign("column:civic-demo/hour", "colset:civic-demo/public")
    assert first.unassign("column:civic-demo/hour", "colset:civic-demo/public")
    assert adapter.version() == start + 4


def test_a_store_follows_changes_made_elsewhere_and_forgets_its_memoised_decisions(
        engine: sqlalchemy.Engine) -> None:
    server = with_defaults(engine)
    other = store(engine)
    other.grant(ANA, Role.ANALYST, "health")
    question = (ANA, "health", "column:civic-demo/service", Action.QUERY_RUN, 0.1)
    assert server.check(*question).allowed
    assert server.check(*question).allowed  # now memoised
    other.deny(ANA, "health", "column:civic-demo/service", Action.QUERY_RUN)
    refused = server.check(*question)
    assert not refused.allowed and refused.rule is not None and refused.rule[-1] == "deny"
    assert other.remove_rule(ANA, "health", "column:civic-demo/service", Action.QUERY_RUN, "*", "deny")
    other.register_dataset("second")
    other.assign_public_column("second", "channel")
    assert server.check_all(ANA, "health", ["dataset:second", "column:second/channel"], Action.QUERY_RUN, 0.1).allowed
    assert server.version == other.version
    assert sorted(server.rules()) == sorted(other.rules())


def test_a_store_that_checks_every_so_often_catches_up_within_its_interval(engine: sqlalchemy.Engine) -> None:
    import time

    with_defaults(engine)
    lazy = PolicyStore(VersionedAdapter(engine), refresh_seconds=0.2)
    question = (ANA, "health", "dataset:civic-demo", Action.DATASET_READ)
    assert not lazy.check(*question).allowed
    store(engine).grant(ANA, Role.ANALYST, "health")
    time.sleep(0.25)
    assert lazy.check(*question).allowed


def test_a_rewrite_of_every_rule_keeps_one_copy_each(engine: sqlalchemy.Engine) -> None:
    first = with_defaults(engine)
    first.grant(ANA, Role.ANALYST, "health")
    rules = sorted(first.rules())
    first.save()
    with engine.connect() as connection:
        total = connection.execute(select(func.count()).select_from(text(TABLE))).scalar_one()
    again = store(engine)
    assert sorted(again.rules()) == rules and again.roles_of(ANA) == [(Role.ANALYST, "health")]
    assert total == len(rules) + len(again._enforcer.get_named_grouping_policy("g")) + len(  # noqa: SLF001
        again._enforcer.get_named_grouping_policy("g2"))  # noqa: SLF001
