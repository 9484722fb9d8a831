"""Checks of a dataset's table files against their declaration, before registration.

Registration replaces the version being served, so a file that does not match its
metadata would break every analyst's queries with an error naming no column. Each table
file must be Parquet, hold every declared column with a compatible type, and have no
missing values in a column not declared ``nullable`` (from the row groups' statistics:
the file's footer is read, never its data). Refusals name the table, column and fix.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from civicdp.queries.metadata import ColumnMeta, DatasetMetadata
from civicdp.server.state.dataset_checks import DatasetRefused
from civicdp.server.state.value_checks import ACCEPTABLE  # noqa: F401 - what ``accept`` may name

PARQUET_MAGIC = b"PAR1"


def check_tables(folder: Path, metadata: DatasetMetadata, accept: frozenset[str] = frozenset()) -> None:
    """Every table file is Parquet and matches its declared columns (names, types, nulls).

    ``accept`` names problems of :data:`ACCEPTABLE` the steward accepts rather than fixes; the
    values themselves are counted by :mod:`civicdp.server.state.value_checks`.
    """
    for name, table in metadata.tables.items():
        path = folder / table.path
        _check_parquet(path, name)
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DatasetRefused(f"the file of table '{name}' ({table.path}) cannot be read as Parquet: {exc}. "
                                 "Write it again as Parquet") from None
        schema = parquet.schema_arrow
        for column, declared in table.columns.items():
            where = f"tables.{name}.columns.{column}"
            if column not in schema.names:
                raise DatasetRefused(f"{where}: declared, but {table.path} has no column '{column}' (it has "
                                     f"{', '.join(schema.names[:20])}). Rename the column or correct the metadata")
            problem = _type_problem(declared, schema.field(column).type)
            if problem:
                raise DatasetRefused(f"{where}: declared {declared.type}, but {table.path} stores {problem}. "
                                     "Convert the column or declare its type")
            if not declared.nullable and "undeclared_nulls" not in accept and _nulls(parquet, column) > 0:
                raise DatasetRefused(f"{where}: {table.path} has missing values in it but it is not declared "
                                     "nullable. Add \"nullable\": true, fill the missing values, or accept them "
                                     "(--accept-undeclared-nulls; API: \"accept\": [\"undeclared_nulls\"])")


def _check_parquet(path: Path, name: str) -> None:
    with path.open("rb") as handle:
        head = handle.read(4)
        size = path.stat().st_size
        handle.seek(max(0, size - 4))
        tail = handle.read(4)
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        looks = " (it looks like CSV text)" if head and all(32 <= byte < 127 or byte in (9, 10, 13) for byte in head) else ""
        raise DatasetRefused(f"the file of table '{name}' ({path.name}) is not a Parquet file{looks}. "
                             "Convert it to Parquet, e.g. pandas.read_csv(...).to_parquet(...)")


def _type_problem(declared: ColumnMeta, stored: pa.DataType) -> str | None:
    """What is wrong with a stored Arrow type for the declared column type, or None."""
    if pa.types.is_dictionary(stored):
        stored = stored.value_type
    ok = {
        "int": pa.types.is_integer(stored),
        "float": pa.types.is_floating(stored) or pa.types.is_integer(stored) or pa.types.is_decimal(stored),
        "str": pa.types.is_string(stored) or pa.types.is_large_string(stored),
        "bool": pa.types.is_boolean(stored),
        "datetime": pa.types.is_timestamp(stored) or pa.types.is_date(stored),
    }[declared.type]
    if ok:
        return None
    if pa.types.is_null(stored):
        return "a column with no values at all"
    return f"{stored}" + (" (text: dates need parsing into timestamps)" if declared.type == "datetime"
                          and (pa.types.is_string(stored) or pa.types.is_large_string(stored)) else "")


def _nulls(parquet: pq.ParquetFile, column: str) -> int:
    """Missing values of a column by the row groups' statistics (0 where a file has none recorded)."""
    index = parquet.schema_arrow.names.index(column)
    meta = parquet.metadata
    leaf = _leaf_index(parquet, column, index)
    total = 0
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(leaf).statistics
        if stats is not None and stats.has_null_count:
            total += stats.null_count
    return total


def _leaf_index(parquet: pq.ParquetFile, column: str, fallback: int) -> int:
    names = [parquet.schema.column(i).path for i in range(len(parquet.schema))]
    return names.index(column) if column in names else fallback
