"""Rules survive a restart through the SQLAlchemy adapter; malformed rules stop the store at start-up.

Each test gets its own rule table, declared on its own SQLAlchemy metadata, so that
``create_all`` creates nothing else (the adapter's default ``Base.metadata`` would also
create ``casbin_rule`` and every table made before) and the table can be dropped
afterwards without touching what other tests keep in the same database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from casbin.persist.adapters import FileAdapter
from sqlalchemy import Column, Integer, String
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy_adapter import Adapter

from civicdp.policies.actions import Action, Role
from civicdp.policies.enforcer import MAX_FIELDS, MODEL_TEXT, PolicyStore
from civicdp.policies.errors import RuleArityMismatch

from .sample import populate

POSTGRES_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
SERVICE = "column:civic-demo/service"


def rule_table(name: str) -> type[DeclarativeBase]:
    """A CasbinRule-shaped class for table ``name`` on a metadata of its own."""

    class Base(DeclarativeBase):
        pass

    def line(self: Any) -> str:  # the adapter loads rules by parsing str(row), as its own class prints it
        values = (getattr(self, f"v{i}") for i in range(6))
        return ", ".join([self.ptype, *(v for v in values if v is not None)])

    columns = {f"v{i}": Column(String(255)) for i in range(6)}
    return type(f"Rule_{name}", (Base,), {"__tablename__": name, "id": Column(Integer, primary_key=True),
                                          "ptype": Column(String(255)), **columns, "__str__": line})


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'policies.db'}"


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"),
                        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[sqlalchemy.Engine]:
    engine = sqlalchemy.create_engine(sqlite_url if request.param == "sqlite" else POSTGRES_URL)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def table(engine: sqlalchemy.Engine) -> Iterator[type[DeclarativeBase]]:
    """A fresh rule table, dropped afterwards."""
    db_class = rule_table(f"casbin_rule_test_{uuid.uuid4().hex[:12]}")
    try:
        yield db_class
    finally:
        db_class.metadata.drop_all(engine)


def test_rules_grants_and_groups_survive_a_new_store(engine: sqlalchemy.Engine,
                                                     table: type[DeclarativeBase]) -> None:
    first = populate(PolicyStore(Adapter(engine, db_class=table)))
    first.allow("account:ana-health", "health", "dataset:civic-demo", Action.QUERY_RUN, 1)
    first.revoke("account:steward-health", Role.STEWARD, "health")
    first.remove_rule("analyst", "*", "server", Action.BUDGET_READ_OWN)

    second = PolicyStore(Adapter(engine, db_class=table))
    assert sorted(second.rules()) == sorted(first.rules())
    assert second.roles_of("account:ana-health") == [(Role.ANALYST, "health")]
    assert second.roles_of("account:steward-health") == []
    assert second.groups_of(SERVICE) == ["colset:civic-demo/public"]
    assert second.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.5).allowed
    assert not second.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.6).allowed
    assert second.check("account:ana-health", "health", "dataset:civic-demo", Action.QUERY_RUN, 0.9).allowed
    assert not second.check("account:steward", "health", SERVICE, Action.QUERY_RUN, 0.1).allowed
    assert not second.check("account:ana-health", "health", "server", Action.BUDGET_READ_OWN).allowed


def test_load_sees_changes_made_by_another_store(engine: sqlalchemy.Engine, table: type[DeclarativeBase]) -> None:
    first = populate(PolicyStore(Adapter(engine, db_class=table)))
    second = PolicyStore(Adapter(engine, db_class=table))
    second.grant("account:new", Role.ANALYST, "health")
    second.assign_public_column("civic-demo", "hour")
    assert not first.check("account:new", "health", "column:civic-demo/hour", Action.QUERY_RUN, 0.1).allowed
    first.load()
    assert first.check("account:new", "health", "column:civic-demo/hour", Action.QUERY_RUN, 0.1).allowed


def test_save_rewrites_the_table_with_the_same_rules(engine: sqlalchemy.Engine,
                                                     table: type[DeclarativeBase]) -> None:
    store = populate(PolicyStore(Adapter(engine, db_class=table)))
    with engine.connect() as connection:
        rows_before = connection.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(table)).scalar()
    store.save()
    with engine.connect() as connection:
        rows_after = connection.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(table)).scalar()
    assert rows_after == rows_before
    assert sorted(PolicyStore(Adapter(engine, db_class=table)).rules()) == sorted(store.rules())


def test_the_rule_width_fits_the_adapter_columns(engine: sqlalchemy.Engine, table: type[DeclarativeBase]) -> None:
    adapter = Adapter(engine, db_class=table)
    columns = sqlalchemy.inspect(engine).get_columns(table.__tablename__)
    value_columns = [c["name"] for c in columns if c["name"].startswith("v")]
    assert value_columns == [f"v{i}" for i in range(MAX_FIELDS)]
    store = populate(PolicyStore(adapter))
    with engine.connect() as connection:
        widths = {sum(v is not None for v in row[2:]) for row in connection.execute(sqlalchemy.select(table))}
    assert widths == {3, 6}  # g and g2 links, p rules: nothing was cut
    assert len(store.rules()[0]) == MAX_FIELDS


# -- arity at start-up ------------------------------------------------------------------------


def test_the_default_model_fits_the_storage() -> None:
    PolicyStore().check_arity()
    assert resources.files("policies").joinpath("model.conf").is_file()


def test_a_model_with_seven_fields_is_refused_at_start_up() -> None:
    wide = MODEL_TEXT.replace("p = sub, dom, obj, act, cap, eft", "p = sub, dom, obj, act, cap, eft, note")
    assert wide != MODEL_TEXT
    with pytest.raises(RuleArityMismatch, match=r"defines p with 7 fields, but the policy storage keeps at "
                                                r"most 6 \(v0..v5\) and would silently cut the rest"):
        PolicyStore(model_text=wide)


@pytest.mark.parametrize(("line", "found"), [
    ("p, analyst, *, dataset:*, query.run, 0.5, allow, extra", 7),
    ("p, analyst, *, dataset:*, query.run, 0.5", 5),
    ("g, account:7, analyst, health, extra", 4),
], ids=["seven-field-rule", "five-field-rule", "four-field-grant"])
def test_a_stored_rule_of_the_wrong_width_is_refused_at_start_up(tmp_path: Path, line: str, found: int) -> None:
    policy = tmp_path / "policy.csv"
    policy.write_text("p, analyst, *, server, dataset.list, *, allow\n" + line + "\n")
    with pytest.raises(RuleArityMismatch, match=f"has {found} fields but the model defines") as refused:
        PolicyStore(FileAdapter(str(policy)))
    assert refused.value.found == found
