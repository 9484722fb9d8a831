"""Preparation at registration (issue 14): built once, under the state, served when ready.

A registration through the API returns at once and is prepared by the server's worker; one
through the CLI is prepared before the command returns. The steward's folder is only read
(it may be read-only), the version served before keeps being answered until the new one is
ready, a dataset's first version answers 503 while it is prepared, a failure is stored and
reported without data, and a replaced version's prepared files are removed.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from datetime import timedelta
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from sqlmodel import Session, select

from civicdp.queries.polars_snapshots import VERSIONS
from civicdp.server.intake import prepare, snapshot
from civicdp.server.state.models import AuditEntry, DatasetPreparation
from civicdp.server.state.preparations import READY, REMOVED
from tests.conftest import base_metadata, events_frame
from tests.server.api_fixtures import ANALYST, STEWARD, Api, count_query, make_dataset_folder, running_api
from tests.server.intake.helpers import civicdp

NAME = "second-set"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with running_api(tmp_path / "state", make_dataset_folder(tmp_path / "datasets"),
                     prepared_keep_seconds=0) as started:
        yield started


def folder_of(root: Path, version: str = "1", frame: pl.DataFrame | None = None) -> Path:
    metadata = {**base_metadata(), "name": NAME, "version": version}
    return make_dataset_folder(root, frame, metadata=metadata)


def contents(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def read_only(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def status(api: Api, name: str = NAME) -> dict[str, Any]:
    answer = api.get(STEWARD, f"/v1/datasets/{name}/preparation")
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for(api: Api, state: str, name: str = NAME, seconds: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while (now := status(api, name))["preparation"]["state"] != state:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    return now


def snapshots(api: Api, name: str = NAME) -> list[str]:
    folder = api.settings.prepared_path / VERSIONS / name
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def on_demand(api: Api) -> list[str]:
    return sorted(p.name for p in api.settings.prepared_path.glob("*.parquet"))


def register(api: Api, folder: Path) -> dict[str, Any]:
    answer = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert answer.status_code == 201, answer.text
    return answer.json()


def count(api: Api, **changes: Any) -> Any:
    return api.query(ANALYST, count_query(dataset=NAME, **changes))


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Preparation waits until the test sets the event (the real build runs afterwards)."""
    release, build = threading.Event(), snapshot.build_snapshot

    def waiting(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(30), "the test never let the preparation go on"
        return build(*args, **kwargs)

    monkeypatch.setattr(snapshot, "build_snapshot", waiting)
    return release


def test_a_read_only_folder_is_registered_and_answered_and_never_written(api: Api, tmp_path: Path) -> None:
    folder = folder_of(tmp_path / "data")
    before = contents(folder)
    read_only(folder)
    try:
        registered = register(api, folder)
        assert registered["version"] == "1" and registered["preparation"]["state"] in ("pending", "preparing")
        wait_for(api, READY)
        answered = count(api)
        assert answered.status_code == 200, answered.text
        assert answered.json()["dataset_version"] == "1"
        assert contents(folder) == before  # nothing written (or touched) inside the folder
        assert not os.access(folder, os.W_OK) or os.geteuid() == 0
        assert len(snapshots(api)) == 1 and not on_demand(api)  # read from the snapshot under the state
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_the_cli_prepares_before_it_returns(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = folder_of(tmp_path / "data")
    read_only(folder)
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(api.settings.data_dir))
    monkeypatch.setenv("CIVICDP_PREPARED_KEEP_SECONDS", "0")
    for name in ("CIVICDP_DATABASE_URL", "DATABASE_URL", "CIVICDP_INIT_STATE", "CIVICDP_PREPARED_DIR"):
        monkeypatch.delenv(name, raising=False)
    try:
        result = civicdp("datasets", "register", folder)
        assert result.exit_code == 0, result.output
        assert f"registered {NAME} version 1" in result.output and f"prepared {NAME} version 1 in" in result.output
        assert status(api)["preparation"]["state"] == READY  # no worker needed: it was ready on return
        assert count(api).status_code == 200
        again = civicdp("datasets", "register", folder)  # the same files: nothing to prepare
        assert again.exit_code == 0 and "already (its files are unchanged)" in again.output, again.output
        assert not list(folder.rglob(".civicdp*"))
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_a_first_version_being_prepared_answers_503_saying_so(api: Api, tmp_path: Path,
                                                              held: threading.Event) -> None:
    register(api, folder_of(tmp_path / "data"))
    wait_for(api, "preparing")
    spent = api.spent_micro(ANALYST, NAME)
    for refused in (count(api), api.post(ANALYST, "/v1/queries/estimate", json=count_query(dataset=NAME))):
        assert refused.status_code == 503, refused.text
        detail = refused.json()["detail"]
        assert f"dataset '{NAME}' version 1 is being prepared (since 20" in detail
        assert "answered once its preparation has finished" in detail
    assert api.spent_micro(ANALYST, NAME) == spent  # refused before any charge
    held.set()
    done = wait_for(api, READY)
    assert done["served_version"] == "1"
    assert count(api).status_code == 200


def test_the_version_served_before_is_answered_until_the_new_one_is_ready(
        api: Api, tmp_path: Path, held: threading.Event) -> None:
    held.set()
    register(api, folder_of(tmp_path / "v1"))
    wait_for(api, READY)
    held.clear()
    registered = register(api, folder_of(tmp_path / "v2", "2", events_frame().head(30)))
    assert registered["version"] == "2"
    wait_for(api, "preparing")
    during = count(api)
    assert during.status_code == 200 and during.json()["dataset_version"] == "1", during.text
    assert status(api)["served_version"] == "1"
    held.set()
    assert wait_for(api, READY)["served_version"] == "2"
    assert count(api, epsilon=0.2).json()["dataset_version"] == "2"


def test_a_replaced_version_leaves_no_prepared_file_behind(api: Api, tmp_path: Path) -> None:
    register(api, folder_of(tmp_path / "v1"))
    first = wait_for(api, READY)["preparation"]["id"]
    assert count(api).status_code == 200
    assert snapshots(api) == [str(first)]
    # The steward overwrites the folder in place and registers it as version 2.
    folder = folder_of(tmp_path / "v1", "2", events_frame().head(40))
    second = register(api, folder)["preparation"]["id"]
    wait_for(api, READY)
    deadline = time.monotonic() + 30
    while snapshots(api) != [str(second)]:  # removed by the switch's sweep (prepared_keep_seconds=0)
        assert time.monotonic() < deadline, snapshots(api)
        time.sleep(0.05)
    assert not on_demand(api)
    with Session(api.state.db) as session:
        assert session.get(DatasetPreparation, first).state == REMOVED  # type: ignore[union-attr]
    answered = count(api, epsilon=0.3).json()
    assert answered["dataset_version"] == "2"


def test_a_failed_preparation_is_stored_and_reported_without_data(api: Api, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = folder_of(tmp_path / "data")
    build = snapshot.build_snapshot

    def broken_files(*args: Any, **kwargs: Any) -> Any:
        # After registration checked it, the steward replaces the file with one whose column is not Parquet-int.
        pl.DataFrame({"person_id": ["secret-value-7"]}).write_parquet(folder / "events.parquet")
        return build(*args, **kwargs)

    monkeypatch.setattr(snapshot, "build_snapshot", broken_files)
    register(api, folder)
    failed = wait_for(api, "failed")
    error = failed["preparation"]["error"]
    assert "table 'events'" in error and "secret-value-7" not in error, error
    assert failed["served_version"] is None and failed["preparation"]["finished_at"]
    refused = count(api)
    assert refused.status_code == 503 and "could not be prepared" in refused.json()["detail"], refused.text
    assert "secret-value-7" not in refused.text
    assert snapshots(api) == []
    with Session(api.state.db) as session:
        entry = session.exec(select(AuditEntry).where(AuditEntry.action == "dataset.prepare")).one()
        assert entry.decision == "failed" and "secret-value-7" not in entry.entry_json


def test_the_cli_reports_a_failed_preparation(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = folder_of(tmp_path / "data")
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(api.settings.data_dir))
    for name in ("CIVICDP_DATABASE_URL", "DATABASE_URL", "CIVICDP_INIT_STATE", "CIVICDP_PREPARED_DIR"):
        monkeypatch.delenv(name, raising=False)

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise snapshot.Failed("table 'events' could not be prepared: No space left on device")

    monkeypatch.setattr(snapshot, "build_snapshot", failing)
    result = civicdp("datasets", "register", folder)
    assert result.exit_code == 1, result.output
    assert "could not be prepared: table 'events' could not be prepared: No space left on device" in result.output
    assert status(api)["preparation"]["state"] == "failed"


def test_one_worker_claims_a_preparation_and_a_stopped_ones_is_taken_over(api: Api, tmp_path: Path,
                                                                         held: threading.Event) -> None:
    register(api, folder_of(tmp_path / "data"))
    claimed = wait_for(api, "preparing")["preparation"]["id"]  # by the app's own worker, held
    assert prepare.claim(api.state.db, "another-worker") is None
    with Session(api.state.db) as session:
        row = session.get(DatasetPreparation, claimed)
        assert row is not None and row.worker is not None and row.worker != "another-worker"
        row.heartbeat_at = row.heartbeat_at.replace(year=2000)  # type: ignore[union-attr]
        session.add(row)
        session.commit()
    taken = prepare.claim(api.state.db, "another-worker")
    assert taken is not None and taken.id == claimed and taken.worker == "another-worker"
    held.set()  # the first worker's claim is lost: it stops, and writes nothing
    assert prepare.run(api.state.db, api.settings.prepared_path, timedelta(0), taken,
                       "another-worker") == READY
    assert status(api)["preparation"]["state"] == READY
    assert count(api).status_code == 200
    with Session(api.state.db) as session:
        served = [json.loads(e.entry_json) for e in session.exec(
            select(AuditEntry).where(AuditEntry.action == "dataset.prepared"))]
    assert [e["detail"]["preparation"] for e in served] == [claimed]


def test_the_status_of_an_unknown_dataset_is_404_and_stewards_only(api: Api) -> None:
    assert api.get(STEWARD, "/v1/datasets/no-such/preparation").status_code == 404
    assert api.get(ANALYST, "/v1/datasets/no-such/preparation").status_code == 403
    legacy = status(api, base_metadata()["name"])  # registered without preparation (the fixture's dataset)
    assert legacy == {"dataset": base_metadata()["name"], "served_version": "1", "preparation": None}


def test_registering_the_served_folder_again_prepares_nothing_and_wins(api: Api, tmp_path: Path,
                                                                        held: threading.Event) -> None:
    """The newest registration is what is served: the unchanged v1 again gives up a v2 still being prepared."""
    held.set()
    v1 = folder_of(tmp_path / "v1")
    first = register(api, v1)["preparation"]["id"]
    wait_for(api, READY)
    held.clear()
    register(api, folder_of(tmp_path / "v2", "2"))
    wait_for(api, "preparing")
    again = register(api, v1)
    assert again["version"] == "1" and again["preparation"] == {**again["preparation"], "id": first, "state": READY}
    assert status(api)["preparation"]["state"] == "superseded"
    held.set()
    deadline = time.monotonic() + 30
    while snapshots(api) != [str(first)]:  # v2's worker stops at its next report; nothing of it is left
        assert time.monotonic() < deadline, snapshots(api)
        time.sleep(0.05)
    assert status(api)["served_version"] == "1" and count(api).json()["dataset_version"] == "1"
