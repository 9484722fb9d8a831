"""``civicdp datasets check``: registration's checks, then what the declaration does to the data.

Counts are compared with the same figures computed directly from the test's frame: rows
outside the keys, values outside the bounds, rows beyond the contribution bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from civicdp.server.entry import app
from tests.conftest import base_metadata, events_frame, write_dataset

runner = CliRunner()


def _check(folder: Path, *extra: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["datasets", "check", str(folder), *extra])


def test_a_sound_folder_passes_with_no_warning(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "ok", events_frame(), base_metadata())
    result = _check(folder)
    assert result.exit_code == 0, result.output
    assert "registration checks pass" in result.output and "warning" not in result.output


def test_rows_outside_the_keys_are_counted_and_refused_unless_accepted(tmp_path: Path) -> None:
    """Leaving a channel out of the keys drops its rows from every answer: the check says how many and
    that registration would refuse (exit 2), or, accepted, warns (exit 1)."""
    frame = events_frame()
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["channel"]["keys"] = ["counter", "kiosk"]
    folder = write_dataset(tmp_path / "keys", frame, metadata)
    result = _check(folder, "--json")
    assert result.exit_code == 2, result.output
    report = json.loads(result.output)
    channel = next(c for c in report["columns"] if c["column"] == "channel")
    expected = frame.filter(~pl.col("channel").is_in(["counter", "kiosk"])).height
    assert channel["outside_keys"] == expected > 0
    share = f"{expected / frame.height:.1%}"
    assert [r for r in report["refusals"] if r.startswith("tables.events.columns.channel.keys")
            and f"{expected:,} of {frame.height:,} rows ({share})" in r and "--accept-dropped-keys" in r]
    accepted = _check(folder, "--json", "--accept-dropped-keys")
    assert accepted.exit_code == 1, accepted.output
    report = json.loads(accepted.output)
    assert report["refusals"] == [] and any("channel" in w and "accepted" in w for w in report["warnings"])


def test_open_cases_are_counted_with_their_share_and_warned(tmp_path: Path) -> None:
    """A column declared ends_case is missing for open cases: counted per row, warned about durations."""
    frame = events_frame().with_columns(
        pl.when(pl.col("event_id") % 4 == 0).then(None).otherwise(pl.col("request_time")).alias("closed"))
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["closed"] = {
        "type": "datetime", "bounds": metadata["tables"]["events"]["columns"]["request_time"]["bounds"],
        "nullable": True, "ends_case": True}
    folder = write_dataset(tmp_path / "open", frame, metadata)
    result = _check(folder, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    expected = frame["closed"].null_count()
    assert report["open_cases"] == {"events": expected} and expected > 0
    assert [w for w in report["warnings"] if f"{expected:,} of {frame.height:,} rows" in w
            and "durations describe closed cases only" in w]
    plain = _check(folder)
    assert f"{expected:,} open cases" in plain.output


def test_linked_rows_beyond_their_table_limit_are_counted_through_the_owner(tmp_path: Path) -> None:
    """Steps reach their person through events: rows beyond the steps table's own limit per person."""
    frame = events_frame()
    steps = pl.DataFrame({"event_id": frame["event_id"].to_list() * 2 + frame["event_id"].head(5).to_list(),
                          "step": [1] * frame.height + [2] * frame.height + [3] * 5})
    metadata = base_metadata()
    metadata["tables"]["steps"] = {"path": "steps.parquet", "privacy_unit_via": {"table": "events", "on": "event_id"},
                                   "columns": {"event_id": {"type": "int", "identifier": True},
                                               "step": {"type": "int", "keys": [1, 2, 3]}}}
    folder = write_dataset(tmp_path / "linked", frame, metadata)
    steps.write_parquet(folder / "steps.parquet")
    report = json.loads(_check(folder, "--json").output)
    per_person = steps.join(frame.select("event_id", "person_id"), on="event_id").group_by("person_id").len().cast({"len": pl.Int64})
    limit = metadata["max_contributions"]  # the default: the dataset's, the table declares none
    assert report["beyond_contributions"]["steps"] == int((per_person["len"] - limit).clip(0).sum()) > 0
    assert any("tables.steps: linked through events, it declares no max_contributions" in w
               for w in report["warnings"])
    metadata["tables"]["steps"]["max_contributions"] = 10
    (folder / "metadata.json").write_text(json.dumps(metadata))
    report = json.loads(_check(folder, "--json").output)
    assert report["beyond_contributions"]["steps"] == int((per_person["len"] - 10).clip(0).sum())
    assert not any("declares no max_contributions" in w for w in report["warnings"])


def test_clipped_values_and_rows_beyond_the_bound_are_counted(tmp_path: Path) -> None:
    frame = events_frame()
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["waiting_minutes"]["bounds"] = [0, 10]
    metadata["max_contributions"] = 1
    folder = write_dataset(tmp_path / "clip", frame, metadata)
    report = json.loads(_check(folder, "--json").output)
    waiting = next(c for c in report["columns"] if c["column"] == "waiting_minutes")
    assert waiting["above_bounds"] == frame.filter(pl.col("waiting_minutes") > 10).height > 0
    per_person = frame.group_by("person_id").len()
    assert report["beyond_contributions"]["events"] == int((per_person["len"] - 1).clip(0).sum()) > 0
    assert waiting["missing"] == frame["waiting_minutes"].null_count()


def test_a_folder_registration_would_refuse_exits_2_with_the_reason(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "csv", events_frame(), base_metadata())
    pl.read_parquet(folder / "events.parquet").write_csv(folder / "events.parquet")
    result = _check(folder)
    assert result.exit_code == 2
    assert "not a Parquet file" in result.output


def test_keys_that_cannot_be_compared_with_the_stored_values_are_a_clear_refusal(tmp_path: Path) -> None:
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["service"]["keys"] = [1, 2]  # the file stores text
    result = _check(write_dataset(tmp_path / "mismatch", events_frame(), metadata))
    assert result.exit_code == 2 and "cannot be read as Parquet with the declared columns" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
