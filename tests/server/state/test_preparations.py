"""The preparation row every worker sees (issue 14), on SQLite and PostgreSQL.

One worker claims a pending preparation however many try at once; one whose worker
stopped renewing its claim is taken over; a newer registration gives up an older one
still waiting; and a first version waiting for preparation is what the query path refuses.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from civicdp.queries.errors import DatasetUnavailable
from civicdp.queries.metadata import parse_metadata
from civicdp.server.intake import prepare
from civicdp.server.state import preparations, registry
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import Dataset, DatasetPreparation, utcnow
from tests.conftest import base_metadata


def requested(db: Engine, version: str = "1", *, first: bool = True, with_row: bool = True) -> int:
    metadata = parse_metadata({**base_metadata(), "version": version})
    document = metadata.model_dump_json()
    with session_scope(db) as session:
        if with_row and session.get(Dataset, 1) is None:
            session.add(Dataset(name=metadata.name, version=version, path="/data/x", metadata_json=document))
        return int(preparations.request(session, metadata, Path("/data/x"), document, first=first).id)  # type: ignore[arg-type]


def row(db: Engine, ident: int) -> DatasetPreparation:
    with Session(db) as session:
        found = session.get(DatasetPreparation, ident)
        assert found is not None
        session.expunge(found)
        return found


def test_one_of_many_workers_claims_a_preparation(db_engine: Engine) -> None:
    ident = requested(db_engine)
    claimed: list[str] = []
    start = threading.Barrier(6)

    def worker(name: str) -> None:
        start.wait()
        if prepare.claim(db_engine, name) is not None:
            claimed.append(name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 1
    taken = row(db_engine, ident)
    assert taken.state == preparations.PREPARING and taken.worker == claimed[0] and taken.started_at is not None


def test_a_claim_not_renewed_is_taken_over(db_engine: Engine) -> None:
    ident = requested(db_engine)
    assert prepare.claim(db_engine, "first") is not None
    assert prepare.claim(db_engine, "second") is None  # renewed recently: not stale
    with session_scope(db_engine) as session:
        stale = session.get(DatasetPreparation, ident)
        stale.heartbeat_at = utcnow() - prepare.STALE_AFTER - timedelta(seconds=1)  # type: ignore[union-attr]
        session.add(stale)
    taken = prepare.claim(db_engine, "second")
    assert taken is not None and taken.id == ident and row(db_engine, ident).worker == "second"
    # The first worker's claim is gone: its progress reports are refused, so it stops.
    assert not prepare._still_mine(db_engine, ident, "first", tables_done=1)


def test_a_newer_registration_gives_up_the_one_still_waiting(db_engine: Engine) -> None:
    older = requested(db_engine, "1")
    newer = requested(db_engine, "2")
    assert row(db_engine, older).state == preparations.SUPERSEDED
    assert row(db_engine, newer).state == preparations.PENDING
    assert prepare.claim(db_engine, "w").id == newer  # type: ignore[union-attr]


def test_the_query_path_refuses_a_first_version_until_it_is_ready(db_engine: Engine) -> None:
    ident = requested(db_engine)
    name = base_metadata()["name"]
    with Session(db_engine) as session:
        with pytest.raises(DatasetUnavailable) as waiting:
            registry.served(session, name)
        registry.get(session, name)  # other uses (caps, metadata) see the dataset
    assert f"dataset '{name}' version 1 is waiting to be prepared (registered 20" in waiting.value.problem
    prepare.claim(db_engine, "w")
    with Session(db_engine) as session, pytest.raises(DatasetUnavailable) as preparing:
        registry.served(session, name)
    assert "is being prepared (since 20" in preparing.value.problem and "0 of 1 tables done" in preparing.value.problem
    with session_scope(db_engine) as session:
        session.get(DatasetPreparation, ident).state = preparations.FAILED  # type: ignore[union-attr]
    with Session(db_engine) as session, pytest.raises(DatasetUnavailable) as failed:
        registry.served(session, name)
    assert "could not be prepared" in failed.value.problem and "/preparation" in failed.value.fix
    with session_scope(db_engine) as session:
        session.get(DatasetPreparation, ident).state = preparations.READY  # type: ignore[union-attr]
    requested(db_engine, "2", first=False)  # a replacement waiting: the served version is answered
    with Session(db_engine) as session:
        assert registry.served(session, name).version == "1"
        assert json.loads(registry.served(session, name).metadata_json)["version"] == "1"
