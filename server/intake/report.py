"""A steward's check of a dataset folder before registering it: every registration check,
then what the declaration would do to the data.

Rows whose value is not in a column's declared keys fall in no group; values outside
a column's bounds are clipped; a person's rows beyond ``max_contributions`` are not
counted. None of these is an error, but each silently changes every answer, so the
report counts them. It reads the steward's own files and is shown to the steward only
(``civicdp datasets check``), never to an analyst; nothing is registered or charged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from civicdp.queries.integrity import duplicated_owner_keys
from civicdp.queries.metadata import DatasetMetadata, load_metadata
from civicdp.server.state.dataset_checks import (DatasetRefused, check_declaration, check_files,
                                                 check_metadata_file, unconfirmed)
from civicdp.server.state.table_checks import check_tables

#: A share of rows outside the keys (or clipped, or dropped) above which the report warns.
WARN_SHARE = 0.01


@dataclass
class ColumnReport:
    table: str
    column: str
    rows: int
    missing: int = 0
    outside_keys: int = 0
    below_bounds: int = 0
    above_bounds: int = 0


@dataclass
class DatasetReport:
    metadata: DatasetMetadata
    rows: dict[str, int] = field(default_factory=dict)
    beyond_contributions: dict[str, int] = field(default_factory=dict)
    columns: list[ColumnReport] = field(default_factory=list)
    #: Values still marked as proposed from the data: registration refuses until they are confirmed.
    unconfirmed: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line for each effect of the declaration that touches more than WARN_SHARE of a table's rows."""
        out = []
        for table, dropped in self.beyond_contributions.items():
            if dropped > WARN_SHARE * max(self.rows[table], 1):
                out.append(f"{table}: {dropped:,} of {self.rows[table]:,} rows are beyond max_contributions="
                           f"{self.metadata.max_contributions} rows per person and are not counted by default; "
                           "raise max_contributions (more noise) if they matter")
        for c in self.columns:
            if c.outside_keys > WARN_SHARE * max(c.rows, 1):
                out.append(f"{c.table}.{c.column}: {c.outside_keys:,} of {c.rows:,} rows have a value that is not "
                           "in the declared keys and fall in no group; add the missing values to 'keys'")
            clipped = c.below_bounds + c.above_bounds
            if clipped > WARN_SHARE * max(c.rows, 1):
                out.append(f"{c.table}.{c.column}: {clipped:,} of {c.rows:,} values lie outside the declared bounds "
                           f"({c.below_bounds:,} below, {c.above_bounds:,} above) and are clipped into them")
        return out


def check_folder(folder: Path) -> DatasetReport:
    """Every registration check (raising DatasetRefused / QueryError as registration does), then the report.

    Values still marked as proposed from the data do not stop the report (a draft is
    checked before it is confirmed): they are listed in ``unconfirmed``, and registration
    refuses them."""
    folder = Path(folder).resolve()
    check_metadata_file(folder)
    metadata = load_metadata(folder)
    check_files(folder, metadata)
    check_declaration(metadata, drafts=True)
    check_tables(folder, metadata)
    report = DatasetReport(metadata, unconfirmed=unconfirmed(metadata))
    for name, table in metadata.tables.items():
        frame = pl.scan_parquet(folder / table.path)
        counts = frame.select(_column_counts(metadata, name)).collect().row(0, named=True)
        report.rows[name] = counts.pop("__rows")
        for column in table.columns:
            if f"{column}.missing" not in counts:
                continue
            report.columns.append(ColumnReport(
                name, column, report.rows[name], counts[f"{column}.missing"],
                counts.get(f"{column}.outside", 0), counts.get(f"{column}.below", 0), counts.get(f"{column}.above", 0)))
        if table.privacy_unit_via is None:
            per_person = frame.group_by(metadata.privacy_unit).agg(pl.len().alias("n")).select(
                (pl.col("n").cast(pl.Int64) - metadata.max_contributions).clip(lower_bound=0).sum()).collect().item()
            report.beyond_contributions[name] = int(per_person or 0)
    duplicated = duplicated_owner_keys(folder, metadata)
    if duplicated:
        raise DatasetRefused(duplicated[0])
    return report


def _column_counts(metadata: DatasetMetadata, table: str) -> list[pl.Expr]:
    exprs = [pl.len().alias("__rows")]
    for name, column in metadata.tables[table].columns.items():
        if column.identifier:
            continue
        value = pl.col(name)
        exprs.append(value.is_null().sum().alias(f"{name}.missing"))
        if column.keys is not None:
            exprs.append((value.is_not_null() & ~value.is_in(list(column.keys))).sum().alias(f"{name}.outside"))
        if column.bounds is not None and column.type in ("int", "float"):
            lo, hi = (float(b) for b in column.bounds)
            exprs.append((value.cast(pl.Float64) < lo).sum().alias(f"{name}.below"))
            exprs.append((value.cast(pl.Float64) > hi).sum().alias(f"{name}.above"))
    return exprs
