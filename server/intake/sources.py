"""Where a steward's data comes from: a CSV file, Parquet (a file or a folder of files), or PostgreSQL.

Every source is read in batches of about ``rows`` rows, so a file or table larger than
memory imports in bounded memory. A CSV is read by Polars' batched reader with every
column as text (:mod:`civicdp.server.intake.text_columns` decides the types from every
value). Parquet is read with pyarrow's datasets (a folder: every ``*.parquet`` file in it,
Hive partitions as columns). PostgreSQL is read with the ADBC PostgreSQL driver (Apache
Arrow's, ``adbc-driver-postgresql``), which streams a query's rows as Arrow record batches
over PostgreSQL's binary COPY — measured faster and in a fifth of the memory of
ConnectorX (which reads a whole result before returning it); batches are taken from the
driver itself rather than through ``polars.read_database`` because Polars refuses a whole
result that holds a type it cannot import (an ``interval``), where here that column is
set aside and named. The connection is read-only.

Typed columns (Parquet, PostgreSQL) are brought to the dataset's types by
:func:`typed_frame`: integers as Int64, numbers as Float64 (decimals too), text, booleans,
and times as UTC without a zone (an aware time converted, a naive one read in the
steward's time zone; a date is that day at midnight). Columns of other types (durations,
intervals, binary, lists) are set aside with the reason.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow as pa

POSTGRES = re.compile(r"^postgres(ql)?(\+\w+)?://")


class ImportRefused(ValueError):
    """A source that cannot be imported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Source:
    kind: Literal["csv", "parquet", "postgres"]
    location: str
    table: str | None = None
    query: str | None = None
    separator: str = ","
    nulls: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """A description for the draft's description: no folder, password or SQL text."""
        if self.kind == "postgres":
            return f"PostgreSQL table {self.table}" if self.table else "a PostgreSQL query"
        name = Path(self.location).name
        return f"{name}" if self.kind == "csv" or Path(self.location).is_file() else f"the Parquet files of {name}/"

    def sql(self) -> str:
        if self.query:
            return self.query
        parts = (self.table or "").split(".")
        return "SELECT * FROM " + ".".join('"' + part.replace('"', '""') + '"' for part in parts)


def open_source(text: str, *, table: str | None = None, query: str | None = None, separator: str | None = None,
                nulls: tuple[str, ...] = ()) -> Source:
    """The source ``text`` names: a ``postgresql://`` URL (with ``table`` or ``query``), a Parquet file or
    folder, or a CSV."""
    if POSTGRES.match(text):
        if (table is None) == (query is None):
            raise ImportRefused("a PostgreSQL source needs --table NAME or --query SQL (one of them)")
        return Source("postgres", POSTGRES.sub("postgresql://", text), table=table, query=query)
    if table or query:
        raise ImportRefused("--table and --query are for a postgresql:// source")
    path = Path(text)
    if not path.exists():
        raise ImportRefused(f"no file or folder at {text}")
    if path.is_dir():
        if not any(path.rglob("*.parquet")):
            raise ImportRefused(f"{text} is a folder without .parquet files; name a CSV or Parquet file, or the folder "
                                "of a Parquet dataset")
        return Source("parquet", str(path))
    with path.open("rb") as handle:
        if handle.read(4) == b"PAR1":
            return Source("parquet", str(path))
    return Source("csv", str(path), separator=separator or _sniff_separator(path), nulls=nulls)


def _sniff_separator(path: Path) -> str:
    """The separator of a CSV's header line (comma, semicolon, tab or bar, whichever splits it most)."""
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        header = handle.readline()
    counts = {sep: len(next(csv.reader([header], delimiter=sep), [])) for sep in (",", ";", "\t", "|")}
    return max(counts, key=lambda sep: (counts[sep], sep == ","))


def text_batches(source: Source, rows: int) -> Iterator[pl.DataFrame]:
    """A CSV's rows, every column as text, ``rows`` at a time (about)."""
    try:
        reader = pl.read_csv_batched(source.location, infer_schema_length=0, batch_size=rows,
                                     separator=source.separator, null_values=list(source.nulls) or None)
        while True:
            batches = reader.next_batches(1)
            if not batches:
                return
            yield from batches
    except pl.exceptions.ComputeError as exc:
        if "utf-8" in str(exc).lower() or "utf8" in str(exc).lower():
            raise ImportRefused(f"{source.location} is not UTF-8 text; convert it first, e.g. "
                                "iconv -f latin1 -t utf-8 FILE > FILE.utf8.csv") from None
        raise ImportRefused(f"{source.location} cannot be read as CSV: {str(exc).splitlines()[0]}") from None
    except pl.exceptions.NoDataError:
        raise ImportRefused(f"{source.location} is empty") from None


def csv_rows_estimate(source: Source) -> int:
    """About how many rows a CSV holds, from the length of its first lines (for a progress bar)."""
    path = Path(source.location)
    with path.open("rb") as handle:
        head = handle.read(1 << 20)
    lines = max(head.count(b"\n"), 1)
    return max(int(path.stat().st_size / (len(head) / lines)) - 1, 1)


def arrow_batches(source: Source, rows: int) -> Iterator[pa.RecordBatch]:
    """A Parquet or PostgreSQL source's rows as Arrow record batches."""
    if source.kind == "parquet":
        yield from _dataset(source).to_batches(batch_size=rows)
        return
    import adbc_driver_postgresql.dbapi as adbc

    try:
        with adbc.connect(source.location) as connection, connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION READ ONLY")
            cursor.execute(source.sql())
            yield from cursor.fetch_record_batch()
    except adbc.Error as exc:
        raise ImportRefused(f"PostgreSQL refused: {str(exc).splitlines()[0]}") from None


def total_rows(source: Source) -> int | None:
    """Rows of a Parquet source (from the files' footers) or of a PostgreSQL table; None: not known before reading."""
    if source.kind == "parquet":
        return _dataset(source).count_rows()
    if source.kind == "postgres" and source.table:
        import adbc_driver_postgresql.dbapi as adbc

        try:
            with adbc.connect(source.location) as connection, connection.cursor() as cursor:
                cursor.execute(f"SELECT count(*) FROM ({source.sql()}) AS counted")
                return int(cursor.fetchone()[0])  # type: ignore[index]
        except adbc.Error as exc:
            raise ImportRefused(f"PostgreSQL refused: {str(exc).splitlines()[0]}") from None
    return None


def _dataset(source: Source):  # type: ignore[no-untyped-def]
    import pyarrow.dataset as ds

    path = Path(source.location)
    try:
        return ds.dataset(path, format="parquet", partitioning="hive" if path.is_dir() else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ImportRefused(f"{source.location} cannot be read as Parquet: {exc}") from None


def typed_frame(batch: pa.RecordBatch, time_zone: str) -> tuple[pl.DataFrame, dict[str, str]]:
    """A typed batch in the dataset's types, and the columns set aside (name -> why)."""
    arrays, names, aside = [], [], {}
    for field, column in zip(batch.schema, batch.columns):
        array, why = _storable(field, column)
        if why:
            aside[field.name] = why
        else:
            arrays.append(array)
            names.append(field.name)
    frame = pl.from_arrow(pa.RecordBatch.from_arrays(arrays, names=names))
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns([_polars_type(name, dtype, time_zone) for name, dtype in frame.schema.items()]), aside


def _storable(field: pa.Field, column: pa.Array) -> tuple[pa.Array, str]:
    """The column as an Arrow type Polars reads and the dataset stores, or why it is set aside."""
    kind = field.type
    if isinstance(kind, pa.BaseExtensionType):
        name = getattr(kind, "extension_name", "")
        storage = column.storage  # type: ignore[attr-defined]
        if name == "arrow.uuid":
            hexed = pl.from_arrow(storage).bin.encode("hex")  # type: ignore[union-attr]
            parts = ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))
            dashed = pl.concat_str([hexed.str.slice(a, b - a) for a, b in parts], separator="-")
            return pl.select(dashed).to_series().to_arrow(), ""
        if name == "arrow.opaque" and getattr(kind, "type_name", "") == "numeric":
            typmod = int((field.metadata or {}).get(b"POSTGRESQL:typmod", b"-1"))
            scale = (typmod - 4) & 0xFFFF if typmod >= 4 else -1
            target = pl.Int64 if scale == 0 else pl.Float64
            return pl.from_arrow(storage).cast(target, strict=False).to_arrow(), ""  # type: ignore[union-attr]
        if pa.types.is_string(storage.type) or pa.types.is_large_string(storage.type):
            return storage, ""
        return column, f"of type {name or kind}, which a dataset cannot hold"
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    if pa.types.is_decimal(kind):
        return column.cast(pa.int64() if kind.scale == 0 and kind.precision <= 18 else pa.float64()), ""
    if pa.types.is_null(kind):
        return column, "without any value"
    if (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_timestamp(kind)
            or pa.types.is_date(kind)):
        if (field.metadata or {}).get(b"POSTGRESQL:type") == b"bpchar":  # char(n): the padding is not data
            return pl.from_arrow(column).str.strip_chars_end(" ").to_arrow(), ""  # type: ignore[union-attr]
        return column, ""
    return column, f"of type {kind}, which a dataset cannot hold (convert it in the source, e.g. to text or a number)"


def _polars_type(name: str, dtype: pl.DataType, time_zone: str) -> pl.Expr:
    value = pl.col(name)
    if dtype.is_integer():
        return value.cast(pl.Int64, strict=False)
    if dtype.is_float():
        return value.cast(pl.Float64)
    if dtype == pl.Date:
        return value.cast(pl.Datetime("us"))
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            value = value.dt.replace_time_zone(time_zone, ambiguous="earliest", non_existent="null")
        return value.dt.convert_time_zone("UTC").dt.replace_time_zone(None).dt.cast_time_unit("us")
    if dtype in (pl.Categorical, pl.Enum) or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return value.cast(pl.String)
    return value
