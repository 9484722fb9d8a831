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


def test_rows_outside_the_keys_are_counted_and_warned(tmp_path: Path) -> None:
    """Leaving a channel out of the keys drops its rows from every answer: the check says how many."""
    frame = events_frame()
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["channel"]["keys"] = ["counter", "kiosk"]
    folder = write_dataset(tmp_path / "keys", frame, metadata)
    result = _check(folder, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    channel = next(c for c in report["columns"] if c["column"] == "channel")
    expected = frame.filter(~pl.col("channel").is_in(["counter", "kiosk"])).height
    assert channel["outside_keys"] == expected > 0
    assert any("channel" in w and "not in the declared keys" in w for w in report["warnings"])


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
