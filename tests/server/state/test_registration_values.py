"""Registration reads the values (issue 14): rows outside the declared keys are refused unless
accepted, with the column, count and share named, and nothing replaced; clipped values and
open cases are warned of; what the check found is stored with the version, shown to
stewards, and to analysts only if the steward publishes the shares.

Counts are compared with the same figures computed from the test's frame.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from civicdp.server.state.models import Dataset
from civicdp.server.state import version_findings
from civicdp.server.state.version_findings import DatasetFindings
from tests.conftest import base_metadata, events_frame, write_dataset
from tests.server.api_fixtures import ANALYST, OVERSIGHT, STEWARD, Api, api, dataset_folder  # noqa: F401 - fixtures
from tests.server.intake.helpers import civicdp

NAME = "values-set"
FEW_CHANNELS = ["counter", "kiosk"]


def _folder(root: Path, version: str = "1", frame: pl.DataFrame | None = None, **columns: dict[str, Any]) -> Path:
    metadata = {**base_metadata(), "name": NAME, "version": version}
    for column, change in columns.items():
        metadata["tables"]["events"]["columns"].setdefault(column, {}).update(change)
    return write_dataset(root / f"v{version}", events_frame() if frame is None else frame, metadata)


def _outside(frame: pl.DataFrame) -> int:
    return frame.filter(~pl.col("channel").is_in(FEW_CHANNELS)).height


def test_rows_outside_the_keys_are_refused_naming_column_count_share_and_fix(api: Api, tmp_path: Path) -> None:  # noqa: F811
    frame = events_frame()
    assert api.post(STEWARD, "/v1/datasets", json={"path": str(_folder(tmp_path))}).status_code == 201
    refused = api.post(STEWARD, "/v1/datasets", json={"path": str(_folder(tmp_path, "2", channel={
        "keys": FEW_CHANNELS}))})
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    rows = _outside(frame)
    assert detail.startswith("tables.events.columns.channel.keys: ")
    assert f"{rows:,} of {frame.height:,} rows ({rows / frame.height:.1%})" in detail and rows > 0
    assert "--accept-dropped-keys" in detail and '"accept": ["dropped_keys"]' in detail
    # Nothing replaced: version 1 is still the one served, and no findings of version 2 are kept.
    assert api.get(ANALYST, f"/v1/datasets/{NAME}").json()["version"] == "1"
    assert api.count(Dataset, Dataset.name == NAME) == 1
    assert api.count(DatasetFindings, DatasetFindings.version == "2") == 0


def test_accepted_dropped_keys_register_with_their_share_stored_private_by_default(api: Api,  # noqa: F811
                                                                                 tmp_path: Path) -> None:
    frame = events_frame()
    folder = _folder(tmp_path, channel={"keys": FEW_CHANNELS})
    answer = api.post(STEWARD, "/v1/datasets", json={"path": str(folder), "accept": ["dropped_keys"]})
    assert answer.status_code == 201, answer.text
    found = answer.json()["findings"]
    assert found["published"] is False
    dropped = [f for f in found["findings"] if f["kind"] == "dropped_keys"]
    assert dropped == [{"kind": "dropped_keys", "table": "events", "column": "channel", "rows": _outside(frame),
                        "total": frame.height, "share": round(_outside(frame) / frame.height, 6), "accepted": True}]
    assert answer.json()["accepted_shares"] is None
    assert api.get(ANALYST, f"/v1/datasets/{NAME}").json()["accepted_shares"] is None  # the shares are data
    assert api.get(STEWARD, f"/v1/datasets/{NAME}/findings").json() == found
    for other in (ANALYST, OVERSIGHT):
        assert api.get(other, f"/v1/datasets/{NAME}/findings").status_code == 403
    entry = [r for r in api.records("dataset.register") if r.target == NAME][-1]
    assert json.loads(entry.entry_json)["detail"]["accepted"] == ["dropped_keys"]


def test_published_shares_are_shown_to_analysts_rounded_without_counts(api: Api, tmp_path: Path) -> None:  # noqa: F811
    frame = events_frame()
    folder = _folder(tmp_path, channel={"keys": FEW_CHANNELS})
    answer = api.post(STEWARD, "/v1/datasets", json={"path": str(folder), "accept": ["dropped_keys"],
                                                      "publish_accepted_shares": True})
    assert answer.status_code == 201, answer.text
    shown = api.get(ANALYST, f"/v1/datasets/{NAME}").json()["accepted_shares"]
    assert {"kind": "dropped_keys", "table": "events", "column": "channel",
            "share": max(0.01, round(_outside(frame) / frame.height, 2)), "accepted": True} in shown
    assert all("rows" not in s and "total" not in s for s in shown)


@pytest.mark.parametrize(("rows", "of", "shown"), [(1, 400, 0.01), (0, 400, 0.01), (3, 400, 0.01), (40, 400, 0.1),
                                                    (479, 1000, 0.48)])
def test_a_published_share_does_not_tell_one_row_apart(rows: int, of: int, shown: float) -> None:
    assert version_findings.published_share(rows / of) == shown
    assert version_findings.published_share(1 / 400) == version_findings.published_share(2 / 400)


def test_clipped_values_and_open_cases_register_with_warnings(api: Api, tmp_path: Path) -> None:  # noqa: F811
    frame = events_frame().with_columns(
        pl.when(pl.col("event_id") % 3 == 0).then(None).otherwise(pl.col("request_time")).alias("closed"))
    bounds = base_metadata()["tables"]["events"]["columns"]["request_time"]["bounds"]
    folder = _folder(tmp_path, frame=frame, waiting_minutes={"bounds": [0, 10]},
                     closed={"type": "datetime", "bounds": bounds, "nullable": True, "ends_case": True})
    answer = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    clipped, opened = frame.filter(pl.col("waiting_minutes") > 10).height, frame["closed"].null_count()
    assert {(f["kind"], f["column"], f["rows"]) for f in body["findings"]["findings"]} >= {
        ("clipped", "waiting_minutes", clipped), ("open_cases", "closed", opened)}
    assert any(w.startswith("tables.events.columns.waiting_minutes:") and f"{clipped:,} of" in w
               and "clipped" in w for w in body["warnings"])
    assert any(f"{opened:,} of {frame.height:,} rows" in w and "durations describe closed cases only" in w
               for w in body["warnings"])


def test_the_cli_refuses_accepts_and_shows_findings(api: Api, tmp_path: Path, monkeypatch) -> None:  # noqa: F811, ANN001
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(api.settings.data_dir))
    for name in ("CIVICDP_DATABASE_URL", "DATABASE_URL", "CIVICDP_INIT_STATE", "CIVICDP_PREPARED_DIR"):
        monkeypatch.delenv(name, raising=False)
    frame = events_frame()
    folder = _folder(tmp_path, channel={"keys": FEW_CHANNELS})
    refused = civicdp("datasets", "register", folder)
    assert refused.exit_code == 2 and "tables.events.columns.channel.keys" in refused.output, refused.output
    assert api.count(Dataset, Dataset.name == NAME) == 0
    accepted = civicdp("datasets", "register", folder, "--accept-dropped-keys")
    assert accepted.exit_code == 0, accepted.output
    assert f"{_outside(frame):,} of {frame.height:,}" in accepted.output
    shown = civicdp("datasets", "findings", NAME, "--json")
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.output)
    assert document["accepted"] == ["dropped_keys"] and document["published"] is False
    assert [f["rows"] for f in document["findings"] if f["kind"] == "dropped_keys"] == [_outside(frame)]
