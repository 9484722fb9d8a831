"""``civicdp datasets init`` on CSV: times in any common format, with or without offsets, stored as UTC;
types chosen from every row; names made usable in queries.

The per-hour counts are computed by hand from the rows below and compared with what the
engine counts on the imported dataset: exactly (the backend's counts before noise), and
through ``LocalDataset`` at an epsilon so large that the noise is never a whole unit.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from civicdp import LocalDataset
from civicdp.queries.context import EngineLimits
from civicdp.queries.engine import Engine
from tests.server.intake.helpers import civicdp, exact_counts, init

# person, time as written (six formats: ISO with T, space, Z, fractions and offsets; month-first slashes
# with AM/PM and with a two-digit year; "01 Mar 2025"), and the UTC time it means when times without an
# offset are read as UTC / as Europe/Amsterdam (UTC+1 in winter).
ROWS = [
    (1, "2025-03-01T08:30:00+01:00", datetime(2025, 3, 1, 7, 30), datetime(2025, 3, 1, 7, 30)),
    (2, "2025-03-01 09:15:00-05:00", datetime(2025, 3, 1, 14, 15), datetime(2025, 3, 1, 14, 15)),
    (3, "2025-03-01T07:59:59Z", datetime(2025, 3, 1, 7, 59, 59), datetime(2025, 3, 1, 7, 59, 59)),
    (4, "03/01/2025 07:10 AM", datetime(2025, 3, 1, 7, 10), datetime(2025, 3, 1, 6, 10)),
    (5, "2025-03-01 23:30:00-02:00", datetime(2025, 3, 2, 1, 30), datetime(2025, 3, 2, 1, 30)),
    (6, "3/1/25 14:45", datetime(2025, 3, 1, 14, 45), datetime(2025, 3, 1, 13, 45)),
    (7, "2025-03-01 15:00:00.250+00:00", datetime(2025, 3, 1, 15, 0, 0, 250000),
     datetime(2025, 3, 1, 15, 0, 0, 250000)),
    (8, "01 Mar 2025 16:20", datetime(2025, 3, 1, 16, 20), datetime(2025, 3, 1, 15, 20)),
    (9, "2025-02-28T22:10:00-03:30", datetime(2025, 3, 1, 1, 40), datetime(2025, 3, 1, 1, 40)),
    (10, "02/28/2025 11:05 PM", datetime(2025, 2, 28, 23, 5), datetime(2025, 2, 28, 22, 5)),
]
#: Rows per UTC hour, counted by hand from the table above.
BY_HOUR_UTC = {7: 3, 14: 2, 1: 2, 15: 1, 16: 1, 23: 1}
BY_HOUR_AMSTERDAM = {7: 2, 14: 1, 6: 1, 1: 2, 13: 1, 15: 2, 22: 1}


def _csv(tmp_path: Path) -> Path:
    lines = ["person_id,when,channel"] + [f"{p},{when},{'web' if p % 2 else 'phone'}" for p, when, *_ in ROWS]
    path = tmp_path / "mixed.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("zone", "column", "by_hour"), [("UTC", 2, BY_HOUR_UTC),
                                                          ("Europe/Amsterdam", 3, BY_HOUR_AMSTERDAM)])
def test_mixed_offsets_and_formats_import_as_utc_and_count_by_hour_as_by_hand(
        tmp_path: Path, zone: str, column: int, by_hour: dict[int, int]) -> None:
    out = tmp_path / "dataset"
    result = init(_csv(tmp_path), out, "--time-column", "when", "--time-zone", zone)
    assert "stored in UTC" in result.output
    stored = pl.read_parquet(out / "events.parquet").sort("person_id")
    assert stored.schema["when"] == pl.Datetime("us")  # UTC, without a zone: the form the engine reads
    assert stored["when"].to_list() == [row[column] for row in ROWS]
    expected = {hour: by_hour.get(hour, 0) for hour in range(24)}
    assert exact_counts(out, ["when:hour"]) == expected
    noisy = LocalDataset(out, Engine(limits=EngineLimits(max_epsilon=100))).run(
        {"aggregate": "count", "group_by": ["when:hour"], "epsilon": 100})
    assert dict(noisy.table.select("when:hour", "value").iter_rows()) == expected  # noise far below one unit


def test_types_are_chosen_from_every_row_not_the_first(tmp_path: Path) -> None:
    """A value far down the file decides: an integer column with one decimal is a float column,
    a number column with one word stays text (and says why), a code with a leading zero is text."""
    n = 60_000  # beyond the sample of the first rows
    frame = pl.DataFrame({
        "person_id": [str(i) for i in range(n)],
        "count": [str(i % 7) for i in range(n - 1)] + ["2.5"],
        "amount": [str(i % 11) for i in range(n - 1)] + ["unknown"],
        "code": [str(10 + i % 5) for i in range(n - 1)] + ["07"],
        "flag": ["true" if i % 3 else "false" for i in range(n)],
    })
    source = tmp_path / "late.csv"
    frame.write_csv(source)
    out = tmp_path / "dataset"
    result = init(source, out)
    schema = pl.read_parquet_schema(out / "events.parquet")
    assert schema == {"person_id": pl.Int64, "count": pl.Float64, "amount": pl.String, "code": pl.String,
                      "flag": pl.Boolean}
    assert "amount: kept as text" in result.output and "'unknown'" in result.output
    assert "count: read as float, not int" in result.output
    assert pl.read_parquet(out / "events.parquet")["count"].sum() == pytest.approx(
        sum(i % 7 for i in range(n - 1)) + 2.5)


def test_names_a_query_cannot_use_are_renamed_and_said(tmp_path: Path) -> None:
    source = tmp_path / "log.csv"
    source.write_text("case:concept:name,time:timestamp,org:group\nc1,2011-10-11 13:45:40.276000+02:00,G1\n"
                      "c2,2011-10-12 08:26:25.398000+02:00,G2\n")
    out = tmp_path / "dataset"
    result = init(source, out, "--time-column", "time:timestamp", person="case:concept:name")
    assert "renamed 'case:concept:name' to 'case_concept_name'" in result.output
    metadata = LocalDataset(out).metadata
    assert metadata.privacy_unit == "case_concept_name"
    assert set(metadata.tables["events"].columns) == {"case_concept_name", "time_timestamp", "org_group"}
    assert pl.read_parquet(out / "events.parquet")["time_timestamp"].to_list() == [
        datetime(2011, 10, 11, 11, 45, 40, 276000), datetime(2011, 10, 12, 6, 26, 25, 398000)]


def test_a_named_time_column_with_unreadable_values_is_refused_and_nothing_written(tmp_path: Path) -> None:
    source = tmp_path / "bad.csv"
    source.write_text("person_id,when\n1,2025-01-01 10:00\n2,next tuesday\n")
    out = tmp_path / "dataset"
    result = civicdp("datasets", "init", source, "--name", "x", "--person-column", "person_id",
                     "--time-column", "when", "--out", out)
    assert result.exit_code == 2
    assert "--time-column when" in result.output and "'next tuesday'" in result.output
    assert not (out / "events.parquet").exists() and not (out / "metadata.json").exists()
    assert list(out.glob("*.partial")) == []


def test_an_existing_declaration_is_not_replaced_without_force(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    init(_csv(tmp_path), out, "--time-column", "when")
    (out / "metadata.json").write_text('{"edited": "by the steward"}')
    again = civicdp("datasets", "init", _csv(tmp_path), "--name", "x", "--person-column", "person_id", "--out", out)
    assert again.exit_code == 2 and "--force" in again.output
    assert (out / "metadata.json").read_text() == '{"edited": "by the steward"}'


def test_a_person_column_not_in_the_source_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    result = civicdp("datasets", "init", _csv(tmp_path), "--name", "x", "--person-column", "citizen", "--out", out)
    assert result.exit_code == 2
    assert "--person-column 'citizen' is not a column" in result.output and "case or request id" in result.output
    assert not (out / "events.parquet").exists()
