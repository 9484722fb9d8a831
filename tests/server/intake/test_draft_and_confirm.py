"""The draft declaration marks what it read off the data, and registration refuses it until confirmed.

Keys and bounds read off the data are not public knowledge: ``datasets init`` lists each
in ``proposed_from_data.fields``; registration over the API (steward's key) refuses the
declaration naming every listed field and how to confirm it, registers nothing, and
accepts it once ``datasets confirm`` (or an edit) has removed the marks. The person column
is an identifier, never keys; other id-like columns are proposed as identifiers.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from civicdp.server.state.models import Dataset
from tests.server.api_fixtures import ANALYST, STEWARD, Api, api, dataset_folder, wait_prepared  # noqa: F401 - fixtures
from tests.server.intake.helpers import civicdp, init

KEYS = "tables.events.columns.channel.keys"


def _source(tmp_path: Path, people: int = 4) -> Path:
    """Few people with many rows each: the person column has fewer values than --max-keys."""
    rows = 120
    frame = pl.DataFrame({
        "person_id": [i % people for i in range(rows)],
        "ticket_id": [f"T-{i:05d}" for i in range(rows)],
        "channel": [("web", "phone", "desk")[i % 3] for i in range(rows)],
        "wait": [float(i % 40) / 2 for i in range(rows)],
        "opened": [f"2025-01-{1 + i % 28:02d} {i % 24:02d}:00:00" for i in range(rows)],
    })
    path = tmp_path / "tickets.csv"
    frame.write_csv(path)
    return path


def _draft(tmp_path: Path) -> Path:
    out = tmp_path / "tickets"
    init(_source(tmp_path), out, "--time-column", "opened")
    return out


def _metadata(folder: Path) -> dict:
    return json.loads((folder / "metadata.json").read_text())


def test_the_draft_marks_what_it_read_off_the_data_and_the_person_column_is_never_keys(tmp_path: Path) -> None:
    folder = _draft(tmp_path)
    metadata = _metadata(folder)
    columns = metadata["tables"]["events"]["columns"]
    assert columns["person_id"] == {"type": "int", "identifier": True}  # 4 values, still no keys, no bounds
    assert columns["ticket_id"] == {"type": "str", "identifier": True}
    assert columns["channel"]["keys"] == ["desk", "phone", "web"]
    assert columns["wait"]["bounds"] == [0, 20] and columns["opened"]["bounds"] == ["2025-01-01T00:00:00",
                                                                                    "2025-01-29T00:00:00"]
    fields = metadata["proposed_from_data"]["fields"]
    assert set(fields) == {"max_contributions", "tables.events.columns.ticket_id.identifier", KEYS,
                           "tables.events.columns.wait.bounds", "tables.events.columns.wait.resolution",
                           "tables.events.columns.opened.bounds"}
    assert not any(".person_id." in f for f in fields)
    assert "not public knowledge" in metadata["proposed_from_data"]["notice"]


def test_a_time_column_named_as_an_end_with_missing_values_is_drafted_as_ending_a_case(tmp_path: Path) -> None:
    rows = 30
    frame = pl.DataFrame({
        "person_id": list(range(rows)),
        "opened": [f"2025-01-{1 + i % 28:02d} 08:00:00" for i in range(rows)],
        "ClosedDate": [None if i % 5 == 0 else f"2025-02-{1 + i % 28:02d} 08:00:00" for i in range(rows)],
        "UpdatedDate": [None if i % 5 == 0 else f"2025-02-{1 + i % 28:02d} 09:00:00" for i in range(rows)],
        "VendorDate": [None if i % 5 == 0 else f"2025-02-{1 + i % 28:02d} 10:00:00" for i in range(rows)],
    })
    frame.write_csv(tmp_path / "cases.csv")
    out = tmp_path / "cases"
    result = init(tmp_path / "cases.csv", out)
    assert result.exit_code == 0, result.output
    columns = _metadata(out)["tables"]["events"]["columns"]
    assert columns["ClosedDate"]["ends_case"] is True and columns["ClosedDate"]["nullable"] is True
    assert "ends_case" not in columns["UpdatedDate"] and "ends_case" not in columns["VendorDate"]
    assert "ends_case" not in columns["opened"]  # no missing values: nothing says it is open
    report = json.loads(civicdp("datasets", "check", out, "--json").output)
    assert report["open_cases"] == {"events": rows // 5}


def test_check_reports_a_draft_and_says_registration_would_refuse(tmp_path: Path) -> None:
    folder = _draft(tmp_path)
    result = civicdp("datasets", "check", folder, "--json")
    assert result.exit_code == 2
    report = json.loads(result.output)
    assert KEYS in report["unconfirmed"] and report["rows"] == {"events": 120}


def test_drafted_keys_cannot_be_registered_unconfirmed_and_can_after_confirming(api: Api, tmp_path: Path  # noqa: F811
                                                                                ) -> None:
    folder = _draft(tmp_path)
    refused = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert body["field"] == "proposed_from_data"
    assert KEYS in body["detail"] and "civicdp datasets confirm" in body["detail"]
    assert api.count(Dataset, Dataset.name == "imported") == 0  # nothing registered

    partly = civicdp("datasets", "confirm", folder, "--field", "channel.keys", "--yes")
    assert partly.exit_code == 0 and "confirmed 1 value" in partly.output
    still = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert still.status_code == 422
    assert KEYS not in still.json()["detail"] and "tables.events.columns.wait.bounds" in still.json()["detail"]

    declined = civicdp("datasets", "confirm", folder, input="n\n")
    assert declined.exit_code == 2 and "tables.events.columns.wait.bounds" in declined.output
    assert "proposed_from_data" in _metadata(folder)

    confirmed = civicdp("datasets", "confirm", folder, input="y\n")
    assert confirmed.exit_code == 0 and "nothing is marked any more" in confirmed.output
    assert "proposed_from_data" not in _metadata(folder)
    registered = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert registered.status_code == 201, registered.text
    wait_prepared(api, "imported")  # prepared in the background
    answer = api.query(ANALYST, {"dataset": "imported", "aggregate": "count", "group_by": ["channel"],
                                 "epsilon": 0.5})
    assert answer.status_code == 200, answer.text


def test_removing_the_marks_by_hand_confirms_too(api: Api, tmp_path: Path) -> None:  # noqa: F811
    folder = _draft(tmp_path)
    metadata = _metadata(folder)
    metadata["tables"]["events"]["columns"]["channel"]["keys"] = ["desk", "phone", "web", "mail"]  # the public list
    del metadata["proposed_from_data"]
    (folder / "metadata.json").write_text(json.dumps(metadata))
    assert api.post(STEWARD, "/v1/datasets", json={"path": str(folder)}).status_code == 201


def test_a_mark_naming_no_field_is_refused_by_name(api: Api, tmp_path: Path) -> None:  # noqa: F811
    folder = _draft(tmp_path)
    metadata = _metadata(folder)
    metadata["proposed_from_data"]["fields"] = ["tables.events.columns.chanel.keys"]
    (folder / "metadata.json").write_text(json.dumps(metadata))
    refused = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert refused.status_code == 422
    assert "'tables.events.columns.chanel.keys' names no field" in refused.json()["detail"]
