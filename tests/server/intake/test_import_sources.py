"""``civicdp datasets init`` from Parquet (a file, a folder of files) and from PostgreSQL (a table, a query).

Typed sources keep their types, brought to the dataset's: integers as Int64, decimals as
numbers, dictionary-encoded text as text, and every time as UTC without a zone (an aware
time converted; a naive one read in --time-zone). Columns a dataset cannot hold are set
aside and named.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from civicdp import LocalDataset
from tests.server.intake.helpers import exact_counts, init

PG_URL = os.environ.get("CIVICDP_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
START = datetime(2025, 6, 1, tzinfo=timezone(timedelta(hours=2)))  # 2025-05-31 22:00 UTC


def _arrow_table(rows: int = 48) -> pa.Table:
    return pa.table({
        "person_id": pa.array([i % 12 for i in range(rows)], pa.int32()),
        "service": pa.array([f"S{i % 3}" for i in range(rows)]).dictionary_encode(),
        "fee": pa.array([Decimal(f"{i % 5}.25") for i in range(rows)], pa.decimal128(6, 2)),
        "at": pa.array([START + timedelta(hours=i) for i in range(rows)], pa.timestamp("ms", tz="Europe/Amsterdam")),
        "took": pa.array([timedelta(minutes=i) for i in range(rows)], pa.duration("s")),
    })


def test_a_parquet_file_keeps_its_types_in_utc(tmp_path: Path) -> None:
    source = tmp_path / "source.parquet"
    pq.write_table(_arrow_table(), source)
    out = tmp_path / "dataset"
    result = init(source, out)
    assert "not imported: took" in result.output  # a duration: set aside, and said
    stored = pl.read_parquet(out / "events.parquet")
    assert stored.schema == {"person_id": pl.Int64, "service": pl.String, "fee": pl.Float64, "at": pl.Datetime("us")}
    assert stored["at"][0] == datetime(2025, 5, 31, 22, 0)
    by_hour = exact_counts(out, ["at:hour"], contributions=4)
    assert by_hour == {h: 2 for h in range(24)}  # 48 consecutive hours
    columns = LocalDataset(out).metadata.tables["events"].columns
    assert columns["service"].keys == ("S0", "S1", "S2") and columns["fee"].bounds == (0.2, 4.3)  # rounded outward


def test_a_folder_of_parquet_files_is_one_table(tmp_path: Path) -> None:
    source = tmp_path / "parts"
    source.mkdir()
    table = _arrow_table().drop_columns(["took"])
    pq.write_table(table.slice(0, 20), source / "part-0.parquet")
    pq.write_table(table.slice(20), source / "part-1.parquet")
    out = tmp_path / "dataset"
    init(source, out)
    assert pl.read_parquet(out / "events.parquet").height == 48
    assert exact_counts(out, ["service"], contributions=4) == {"S0": 16, "S1": 16, "S2": 16}


@pytest.fixture
def pg_table() -> Iterator[str]:
    """A table in the PostgreSQL test database, dropped afterwards."""
    import psycopg

    name = f"intake_{uuid.uuid4().hex[:12]}"
    try:
        connection = psycopg.connect(PG_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("CIVICDP_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    with connection:
        connection.execute(f"CREATE TABLE {name} (request_id text, person_id bigint, channel varchar(10), "
                           "opened timestamptz, logged timestamp, cost numeric(8, 2), urgent boolean, "
                           "waited interval, visitor uuid, office char(4), units numeric(6, 0))")
        with connection.cursor().copy(f"COPY {name} (request_id, person_id, channel, opened, logged, cost, urgent, "
                                      "waited, visitor, office, units) FROM STDIN") as copy:
            for i in range(30):
                copy.write_row((f"R{i:04d}", i % 10, ("web", "phone", "desk")[i % 3],
                                datetime(2025, 1, 1, 23, tzinfo=timezone.utc) + timedelta(hours=i),
                                datetime(2025, 1, 2) + timedelta(hours=i), Decimal(f"{i}.50"), i % 4 == 0,
                                timedelta(minutes=i), uuid.UUID(int=i % 10), ("N", "S")[i % 2], i))
        try:
            yield name
        finally:
            connection.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.mark.postgres
def test_a_postgresql_table_imports_with_its_types(tmp_path: Path, pg_table: str) -> None:
    out = tmp_path / "dataset"
    result = init(PG_URL, out, "--table", pg_table, "--time-zone", "America/New_York")
    assert "not imported: waited" in result.output  # an interval
    stored = pl.read_parquet(out / "events.parquet").sort("request_id")
    assert stored.height == 30
    assert stored.schema == {"request_id": pl.String, "person_id": pl.Int64, "channel": pl.String,
                             "opened": pl.Datetime("us"), "logged": pl.Datetime("us"), "cost": pl.Float64,
                             "urgent": pl.Boolean, "visitor": pl.String, "office": pl.String, "units": pl.Int64}
    assert stored["visitor"][1] == str(uuid.UUID(int=1))  # a uuid as its usual text
    assert set(stored["office"]) == {"N", "S"}  # char(4) without its padding
    assert stored["opened"][0] == datetime(2025, 1, 1, 23)  # timestamptz: already UTC
    assert stored["logged"][0] == datetime(2025, 1, 2, 5)  # naive, read as New York (UTC-5)
    assert stored["cost"].sum() == pytest.approx(sum(i + 0.5 for i in range(30)))
    assert exact_counts(out, ["channel"], contributions=3) == {"desk": 10, "phone": 10, "web": 10}
    columns = LocalDataset(out).metadata.tables["events"].columns
    assert columns["request_id"].identifier  # unique text: proposed as an identifier, not keys


@pytest.mark.postgres
def test_a_postgresql_query_imports_its_rows(tmp_path: Path, pg_table: str) -> None:
    out = tmp_path / "dataset"
    init(PG_URL, out, "--query", f"SELECT person_id, channel, opened FROM {pg_table} WHERE urgent")
    stored = pl.read_parquet(out / "events.parquet")
    assert stored.height == 8 and stored.columns == ["person_id", "channel", "opened"]
