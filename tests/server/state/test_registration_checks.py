"""Steward input that must not crash, block or widen the server is refused at registration.

Each case would, registered, read beyond the dataset folder, block a worker (a FIFO),
read without end (a device), or make an identifier a group-by key; each is refused with
the file or field named, and nothing is registered.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from civicdp.server.state.models import Dataset
from tests.conftest import base_metadata, events_frame, write_dataset
from tests.server.api_fixtures import OVERSIGHT, STEWARD, Api, api, dataset_folder  # noqa: F401 - fixtures


def _folder(tmp_path: Path, change: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
    metadata = base_metadata()
    metadata["name"] = "steward-input"
    folder = write_dataset(tmp_path / "input", events_frame(), metadata)
    if change is not None:
        change(metadata, folder)
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def _table_path(value: str) -> Callable[[dict[str, Any], Path], None]:
    def change(metadata: dict[str, Any], folder: Path) -> None:
        metadata["tables"]["events"]["path"] = value
    return change


def _dotdot(metadata: dict[str, Any], folder: Path) -> None:
    os.replace(folder / "events.parquet", folder.parent / "outside.parquet")
    metadata["tables"]["events"]["path"] = "../outside.parquet"


def _symlink_out(metadata: dict[str, Any], folder: Path) -> None:
    outside = folder.parent / "outside.parquet"
    os.replace(folder / "events.parquet", outside)
    (folder / "events.parquet").symlink_to(outside)


def _fifo(metadata: dict[str, Any], folder: Path) -> None:
    (folder / "events.parquet").unlink()
    os.mkfifo(folder / "events.parquet")


def _column(name: str, **declared: Any) -> Callable[[dict[str, Any], Path], None]:
    def change(metadata: dict[str, Any], folder: Path) -> None:
        metadata["tables"]["events"]["columns"][name].update(declared)
    return change


CASES = {
    "absolute-path": (_table_path("/etc/passwd"), "must be a path relative"),
    "device": (_table_path("../../../../../../dev/zero"), "outside the dataset folder"),
    "dotdot": (_dotdot, "outside the dataset folder"),
    "symlink-out": (_symlink_out, "outside the dataset folder"),
    "fifo": (_fifo, "not a regular file"),
    "unit-not-identifier": (_column("person_id", identifier=False), "privacy unit must be declared an identifier"),
    "identifier-with-keys": (_column("event_id", keys=[1, 2, 3]), "an identifier cannot have public keys"),
    "huge-bounds": (_column("waiting_minutes", bounds=[-1.7e308, 1.7e308]), "beyond"),
    "tiny-resolution": (_column("waiting_minutes", resolution=1e-300), "resolution"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_steward_input_is_refused_with_its_reason_and_nothing_is_registered(api: Api, tmp_path: Path,  # noqa: F811
                                                                            case: str) -> None:
    change, reason = CASES[case]
    folder = _folder(tmp_path, change)
    response = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert response.status_code in (404, 422), response.text
    assert re.search(reason, response.json()["detail"]), response.json()["detail"]
    assert api.count(Dataset, Dataset.name == "steward-input") == 0
    assert api.get(STEWARD, "/v1/health").status_code == 200  # still responsive


def test_a_metadata_file_that_is_a_fifo_is_refused_before_it_is_read(api: Api, tmp_path: Path) -> None:  # noqa: F811
    folder = _folder(tmp_path)
    (folder / "metadata.json").unlink()
    os.mkfifo(folder / "metadata.json")
    response = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert response.status_code == 422 and "not a regular file" in response.json()["detail"]


def test_a_sound_folder_still_registers(api: Api, tmp_path: Path) -> None:  # noqa: F811
    response = api.post(STEWARD, "/v1/datasets", json={"path": str(_folder(tmp_path))})
    assert response.status_code in (200, 201), response.text


# -- the table files against their declaration (footer only, no data read) ------------------


def _rewrite_events(transform: Callable[[Any], Any]) -> Callable[[dict[str, Any], Path], None]:
    def change(metadata: dict[str, Any], folder: Path) -> None:
        import polars as pl

        frame = pl.read_parquet(folder / "events.parquet")
        transform(frame).write_parquet(folder / "events.parquet")
    return change


def _csv_instead(metadata: dict[str, Any], folder: Path) -> None:
    import polars as pl

    pl.read_parquet(folder / "events.parquet").write_csv(folder / "events.parquet")


TABLE_CASES = {
    "csv-file": (_csv_instead, "is not a Parquet file (it looks like CSV text)"),
    "missing-column": (_rewrite_events(lambda f: f.drop("channel")), "tables.events.columns.channel: declared, but"),
    "int-stored-as-text": (_rewrite_events(lambda f: f.with_columns(f["satisfaction"].cast(str))),
                           "tables.events.columns.satisfaction: declared int, but"),
    "time-stored-as-text": (_rewrite_events(lambda f: f.with_columns(f["request_time"].cast(str))),
                            "dates need parsing into timestamps"),
    "nulls-not-declared": (_rewrite_events(lambda f: f.with_columns(
        f["channel"].scatter([0, 3], None))), "has missing values in it but it is not declared nullable"),
}


@pytest.mark.parametrize("case", list(TABLE_CASES), ids=list(TABLE_CASES))
def test_table_files_that_do_not_match_their_declaration_are_refused(api: Api, tmp_path: Path,  # noqa: F811
                                                                     case: str) -> None:
    change, message = TABLE_CASES[case]
    folder = _folder(tmp_path, change)
    response = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"], response.json()["detail"]
    assert api.count(Dataset, Dataset.name == "steward-input") == 0


def test_undeclared_nulls_can_be_accepted_and_the_acceptance_is_audited(api: Api, tmp_path: Path) -> None:  # noqa: F811
    change, _ = TABLE_CASES["nulls-not-declared"]
    folder = _folder(tmp_path, change)
    response = api.post(STEWARD, "/v1/datasets", json={"path": str(folder), "accept": ["undeclared_nulls"]})
    assert response.status_code == 201, response.text
    page = api.get(OVERSIGHT, "/v1/audit/entries", params={"action": "dataset.register"}).json()
    assert [e["entry"]["detail"].get("accepted") for e in page["entries"]][-1] == \
        ["undeclared_nulls"], page["entries"][-1]
    assert api.post(STEWARD, "/v1/datasets", json={"path": str(folder), "accept": ["anything"]}).status_code == 422
