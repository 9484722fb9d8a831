"""Monitors are frozen at definition: batches use the calibration that was charged, or are refused.

Issue 11: a monitor charged once for L = 3 was recalibrated from the dataset's current
metadata at every batch, so after a re-registration with a larger ``max_contributions``
one person was kept 11 times. Now the calibration (L, bounds, resolution, keys, noise
scales, metadata version) is stored at definition, batches rebuild the trees from it
alone, and a batch is refused once the dataset's metadata no longer gives it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from sqlmodel import Session, select

from civicdp.queries.errors import QueryError
from civicdp.server.services import admin
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import Account
from civicdp.server.state.monitor_models import MonitorBatch, MonitorCalibration, MonitorNode, MonitorRelease
from civicdp.server.monitors.service import MonitorService
from tests.conftest import base_metadata
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    MICRO, STEWARD, Api, api, dataset_folder, make_dataset_folder,
)
from tests.server.monitors.test_monitors import START, DAY, append, batch, batch_files, dataset_spent, monitor

MEAN = {"metric": "mean", "column": "waiting_minutes", "group_by": "channel", "rules": []}


def reregister(api: Api, root: Path, change: Any, frame: Any = None) -> None:
    """Register version 2 of the test dataset, its metadata changed by ``change(metadata)`` (and its
    events by ``frame``: registration checks the file holds every declared column)."""
    metadata = base_metadata()
    metadata["version"] = "2"
    change(metadata)
    folder = make_dataset_folder(root, frame, metadata=metadata)
    with session_scope(api.state.db) as session:
        admin.register_dataset(session, api.state.policies, None, folder)


def steward(api: Api) -> Caller:
    with Session(api.state.db) as session:
        account = session.exec(select(Account).where(Account.name == STEWARD)).one()
        return Caller(account_id=account.id or 0, name=STEWARD, agency=account.agency)


def service(api: Api) -> MonitorService:
    return MonitorService(api.state.db, api.settings.data_dir, api.state.caps)


def append_directly(api: Api, data: bytes, first_day: int, days: int, name: str = "daily-channel") -> dict:
    return service(api).append(steward(api), name, data, START + first_day * DAY, START + (first_day + days) * DAY)


def _waiting(metadata: dict, **changes: Any) -> None:
    metadata["tables"]["events"]["columns"]["waiting_minutes"].update(changes)


def _more_contributions(metadata: dict) -> None:
    metadata["max_contributions"] = 11


@pytest.mark.parametrize(("definition", "change", "match"), [
    ({"contributions": None}, _more_contributions, r"contributions per person \(L\) 3 -> 11"),
    (MEAN, lambda m: _waiting(m, bounds=[0.0, 200.0]), r"bounds \[0, 100\] -> \[0, 200\]"),
    (MEAN, lambda m: _waiting(m, resolution=0.5), r"resolution 0\.0001 -> 0\.5"),
], ids=["L", "bounds", "resolution"])
def test_a_batch_after_the_dataset_changed_the_calibration_is_refused(api: Api, tmp_path: Path, definition: dict,
                                                                      change: Any, match: str) -> None:
    before = dataset_spent(api)
    assert api.post(STEWARD, "/v1/monitors", json=monitor(**definition)).status_code == 201
    charged = dataset_spent(api)
    assert charged["dataset"] - before["dataset"] <= MICRO
    assert append(api, batch(0, 2), 0, 2).status_code == 201
    files, nodes = batch_files(api), api.count(MonitorNode)
    reregister(api, tmp_path / "v2", change)
    with pytest.raises(QueryError, match=match) as refused:
        append_directly(api, batch(2, 1), 2, 1)
    assert "version 1" in refused.value.problem and "version 2" in refused.value.problem
    assert "new monitor" in refused.value.fix
    answer = append(api, batch(2, 1), 2, 1)  # over HTTP: the same refusal, a 422, and on the record
    assert answer.status_code == 422 and answer.json()["field"] == "dataset", answer.text
    # Nothing written, nothing released, nothing spent beyond the charge at definition.
    assert batch_files(api) == files and api.count(MonitorBatch) == 1
    assert api.count(MonitorRelease) == 2 and api.count(MonitorNode) == nodes
    assert dataset_spent(api) == charged


@pytest.mark.parametrize("change", [
    lambda m: m.update(description="re-registered"),
    lambda m: m["tables"]["events"]["columns"]["service"].update(keys=["A", "B", "C", "D"]),
    lambda m: m["tables"]["events"]["columns"]["request_time"].update(bounds=["2025-01-01T00:00:00",
                                                                              "2026-01-01T00:00:00"]),
    _more_contributions,  # the monitor names its own L = 3
], ids=["description", "other-column-keys", "longer-time-range", "L-given-by-the-monitor"])
def test_changes_the_calibration_does_not_depend_on_do_not_stop_a_monitor(api: Api, tmp_path: Path,
                                                                          change: Any) -> None:
    assert api.post(STEWARD, "/v1/monitors", json=monitor()).status_code == 201
    assert append(api, batch(0, 1), 0, 1).status_code == 201
    reregister(api, tmp_path / "v2", change)
    answer = append(api, batch(1, 1), 1, 1)
    assert answer.status_code == 201, answer.text


def test_batches_use_the_stored_noise_and_never_more_loss_than_charged(api: Api) -> None:
    assert api.post(STEWARD, "/v1/monitors", json=monitor()).status_code == 201
    charged = dataset_spent(api)
    with session_scope(api.state.db) as session:
        stored = session.exec(select(MonitorCalibration)).one()
        document = json.loads(stored.calibration_json)
        assert document["metadata_version"] == "1" and document["contributions"] == 3
        assert document["keys"] == ["counter", "web", "mobile", "kiosk"]
        document["trees"]["counts"]["scale"] /= 2  # half the noise: twice the loss that was charged
        stored.calibration_json = json.dumps(document)
        session.add(stored)
    with pytest.raises(QueryError, match="would spend more than the 1 epsilon it was charged"):
        append_directly(api, batch(0, 1), 0, 1)
    assert api.count(MonitorBatch) == 0 and batch_files(api) == {} and dataset_spent(api) == charged


def test_a_monitor_without_a_stored_calibration_accepts_no_batch(api: Api) -> None:
    assert api.post(STEWARD, "/v1/monitors", json=monitor()).status_code == 201
    with session_scope(api.state.db) as session:
        session.delete(session.exec(select(MonitorCalibration)).one())  # as for a monitor defined before
    with pytest.raises(QueryError, match="no stored calibration"):
        append_directly(api, batch(0, 1), 0, 1)
    assert api.count(MonitorBatch) == 0


def test_a_batch_that_fails_while_computing_lets_nothing_out_and_a_retry_starts_clean(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api.set_cap("dataset", "*", 100.0)
    api.set_cap("lifetime", "*", 100.0)
    assert api.post(STEWARD, "/v1/monitors", json=monitor(epsilon=50.0, rules=[])).status_code == 201
    charged = dataset_spent(api)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk full")

    # Fails after the person use and leaves were written and the first nodes were noised.
    monkeypatch.setattr("civicdp.server.monitors.batch_files.step_rows", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        append_directly(api, batch(0, 1), 0, 1)
    assert api.count(MonitorBatch) == 0 and api.count(MonitorNode) == 0 and api.count(MonitorRelease) == 0
    folder = api.settings.data_dir / "monitors"
    assert [p.name for p in folder.rglob("*") if p.is_file()] == []  # the attempt's files are gone
    monkeypatch.undo()
    assert append(api, batch(0, 1), 0, 1).status_code == 201
    releases = api.get(STEWARD, "/v1/monitors/daily-channel/releases").json()
    # Day one: 80 events, all within L = 3. Had the failed attempt's person use been kept,
    # everyone would have been charged 2 rows already and only 40 events would count.
    assert sum(r["value"] for r in releases[0]["rows"]) > 65
    assert dataset_spent(api) == charged


def test_batches_within_a_step_carry_the_committed_state_to_the_batch_that_completes_it(api: Api) -> None:
    api.set_cap("dataset", "*", 100.0)
    api.set_cap("lifetime", "*", 100.0)
    assert api.post(STEWARD, "/v1/monitors", json=monitor(epsilon=50.0, rules=[])).status_code == 201
    frame = pl.read_parquet(io.BytesIO(batch(0, 1)))  # 80 events on day one
    noon = START + DAY / 2
    halves = []
    for part in (frame.filter(pl.col("request_time") < noon), frame.filter(pl.col("request_time") >= noon)):
        buffer = io.BytesIO()
        part.write_parquet(buffer)
        halves.append(buffer.getvalue())
    params = [(START, noon), (noon, START + DAY)]
    answers = [api.post(STEWARD, "/v1/monitors/daily-channel/batches", content=data,
                        params={"start": a.isoformat(), "end": b.isoformat()},
                        headers={"Content-Type": "application/octet-stream"}) for data, (a, b) in zip(halves, params)]
    assert [a.status_code for a in answers] == [201, 201], answers[0].text
    assert [a.json()["released_steps"] for a in answers] == [[], [0]]
    (release,) = api.get(STEWARD, "/v1/monitors/daily-channel/releases").json()
    assert 65 < sum(r["value"] for r in release["rows"]) < 95  # both halves' events, within L = 3
