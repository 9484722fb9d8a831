"""A steward's check of a dataset folder before registering it: every registration check,
then what the declaration would do to the data.

The counting is registration's own (:mod:`civicdp.server.state.value_checks`): rows
outside a column's declared keys fall in no group (registration refuses them unless
accepted), values outside the bounds are clipped, open cases have no end yet (both
warned). This report adds what only the steward needs: a person's rows beyond the
table's row limit, which are not counted by default. It reads the steward's own files
and is shown to the steward only (``civicdp datasets check``), never to an analyst;
nothing is registered or charged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from civicdp.queries.integrity import duplicated_owner_keys
from civicdp.queries.metadata import DatasetMetadata, load_metadata
from civicdp.server.state import value_checks
from civicdp.server.state.dataset_checks import (DatasetRefused, check_declaration, check_files,
                                                 check_metadata_file, unconfirmed)
from civicdp.server.state.table_checks import check_tables
from civicdp.server.state.value_checks import WARN_SHARE, ColumnCounts, Finding, TableCounts


@dataclass
class DatasetReport:
    metadata: DatasetMetadata
    tables: list[TableCounts] = field(default_factory=list)
    beyond_contributions: dict[str, int] = field(default_factory=dict)
    #: Values still marked as proposed from the data: registration refuses until they are confirmed.
    unconfirmed: list[str] = field(default_factory=list)
    accept: frozenset[str] = frozenset()

    @property
    def rows(self) -> dict[str, int]:
        return {t.table: t.rows for t in self.tables}

    @property
    def columns(self) -> list[ColumnCounts]:
        return [c for t in self.tables for c in t.columns]

    @property
    def open_cases(self) -> dict[str, int]:
        return {t.table: t.open_cases for t in self.tables if t.open_cases is not None}

    @property
    def findings(self) -> list[Finding]:
        return value_checks.findings(self.metadata, self.tables)

    def refusals(self) -> list[str]:
        """What registration would refuse unless accepted (rows outside the keys), one line each."""
        return [f"{where}: {problem}. {fix}" for where, problem, fix in
                map(value_checks.refusal, value_checks.refused(self.findings, self.accept))]

    def warnings(self) -> list[str]:
        """Registration's warnings, and rows beyond a table's row limit above WARN_SHARE of its rows."""
        out = []
        for table, dropped in self.beyond_contributions.items():
            limit = self.metadata.row_limit(table)
            if dropped > WARN_SHARE * max(self.rows[table], 1):
                where = ("max_contributions" if self.metadata.tables[table].privacy_unit_via is None
                         else f"tables.{table}.max_contributions")
                out.append(f"{table}: {dropped:,} of {self.rows[table]:,} rows are beyond {where}={limit} rows per "
                           f"{self.metadata.privacy_unit} and are not counted by default; raise it (more noise) if "
                           "they matter")
        accepted = [f for f in self.findings if f.kind == "dropped_keys" and "dropped_keys" in self.accept]
        out += [f"tables.{f.table}.columns.{f.column}: {f.rows:,} of {f.total:,} rows ({f.share:.1%}) are outside "
                "the declared keys (accepted: they fall in no group)" for f in accepted]
        return out + value_checks.warnings(self.metadata, self.findings)


def check_folder(folder: Path, accept: frozenset[str] = frozenset()) -> DatasetReport:
    """Every registration check (raising DatasetRefused / QueryError as registration does), then the report.

    Values still marked as proposed from the data do not stop the report (a draft is
    checked before it is confirmed): they are listed in ``unconfirmed``, and registration
    refuses them. Rows outside the keys do not stop it either: they are in ``refusals()``.
    """
    folder = Path(folder).resolve()
    check_metadata_file(folder)
    metadata = load_metadata(folder)
    check_files(folder, metadata)
    check_declaration(metadata, drafts=True)
    check_tables(folder, metadata, accept)
    report = DatasetReport(metadata, value_checks.count_values(folder, metadata), unconfirmed=unconfirmed(metadata),
                           accept=accept)
    for name in metadata.tables:
        report.beyond_contributions[name] = _beyond_limit(folder, metadata, name)
    duplicated = duplicated_owner_keys(folder, metadata)
    if duplicated:
        raise DatasetRefused(duplicated[0])
    return report


def _beyond_limit(folder: Path, metadata: DatasetMetadata, name: str) -> int:
    """Rows beyond the table's row limit per privacy unit (a linked table: through its owner's key)."""
    table = metadata.tables[name]
    frame = pl.scan_parquet(folder / table.path)
    via = table.privacy_unit_via
    if via is not None:  # each row's unit through the owner table: [on] -> [on, unit]
        owner = pl.scan_parquet(folder / metadata.tables[via["table"]].path).select(via["on"], metadata.privacy_unit)
        frame = frame.select(via["on"]).join(owner.unique(via["on"], keep="first"), on=via["on"], how="inner")
    beyond = (frame.group_by(metadata.privacy_unit).agg(pl.len().alias("n"))
              .select((pl.col("n").cast(pl.Int64) - metadata.row_limit(name)).clip(lower_bound=0).sum())
              .collect().item())
    return int(beyond or 0)
