"""What a declaration does to a dataset's values: counted at registration and by ``datasets check``.

:mod:`civicdp.server.state.table_checks` compares the files' schemas with the declaration
(footers only); this module reads the values. Per table it counts, in one pass:

- rows whose value is not in a column's declared ``keys``: they fall in no group, so every
  answer grouped or filtered by that column leaves them out. Registration **refuses** them
  unless the steward accepts them (``dropped_keys``): leaving a channel out of the keys once
  removed 45% of LA 311's rows from every answer, silently;
- values outside a column's declared ``bounds``: clipped into them. That is the declared
  behaviour (bounds are a privacy parameter: widening them to the data's extremes would read
  them off the data and add noise), so registration **warns** with the share clipped;
- missing values, which in a column not declared nullable are refused unless accepted
  (``undeclared_nulls``; found from the footers, counted here for the share);
- open cases: rows whose column declared ``ends_case`` is missing (a case not closed when
  the data was cut). Durations describe the closed cases only: registration warns.

Every count is shown to the steward only (it is data) and stored with the version
(:mod:`civicdp.server.state.version_findings`); analysts see the shares only if the steward
publishes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from civicdp.queries.metadata import DatasetMetadata

#: Problems a steward may accept at registration instead of fixing (``accept``), and what they mean.
ACCEPTABLE = {
    "undeclared_nulls": "missing values in a column not declared nullable: they are dropped after each "
                        "person's rows are bounded (a person with a missing value counts fewer rows)",
    "dropped_keys": "rows whose value is not in a column's declared keys: they fall in no group, so answers "
                    "grouped or filtered by that column leave them out",
}
#: A share of rows clipped or open above which registration and the check warn.
WARN_SHARE = 0.01
#: What a finding's kind means, for the steward's and the analyst's view.
KINDS = {"dropped_keys": "outside the declared keys (in no group)",
         "undeclared_nulls": "missing in a column not declared nullable (dropped after bounding)",
         "clipped": "outside the declared bounds (clipped into them)",
         "open_cases": "open cases (no end yet): durations describe closed cases only"}


@dataclass(frozen=True)
class ColumnCounts:
    table: str
    column: str
    rows: int
    missing: int = 0
    outside_keys: int = 0
    below_bounds: int = 0
    above_bounds: int = 0


@dataclass(frozen=True)
class TableCounts:
    table: str
    rows: int
    columns: tuple[ColumnCounts, ...] = ()
    #: Rows with a missing ``ends_case`` column (None: the table declares none).
    open_cases: int | None = None
    ends_case: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Finding:
    """One effect of the declaration on the data: ``rows`` of ``total`` in ``table`` (``column``)."""

    kind: str
    table: str
    column: str | None
    rows: int
    total: int

    @property
    def share(self) -> float:
        return self.rows / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "share": round(self.share, 6)}


def count_values(folder: Path, metadata: DatasetMetadata) -> list[TableCounts]:
    """Per table: rows, and per declared column missing values, rows outside keys and outside bounds."""
    out = []
    for name, table in metadata.tables.items():
        frame = pl.scan_parquet(Path(folder) / table.path)
        ends = tuple(c for c, meta in table.columns.items() if meta.ends_case)
        # One column at a time: the peak memory is one column's, not the table's (30 M steps: 0.9 GB, was 1.8).
        counts: dict[str, int] = {}
        for exprs in _column_counts(metadata, name, ends):
            counts.update(frame.select(exprs).collect().row(0, named=True))
        rows = int(counts.pop("__rows"))
        columns = tuple(ColumnCounts(name, column, rows, int(counts[f"{column}.missing"]),
                                     int(counts.get(f"{column}.outside", 0)), int(counts.get(f"{column}.below", 0)),
                                     int(counts.get(f"{column}.above", 0)))
                        for column in table.columns if f"{column}.missing" in counts)
        open_cases = int(counts["__open"]) if ends else None
        out.append(TableCounts(name, rows, columns, open_cases, ends))
    return out


def findings(metadata: DatasetMetadata, counts: list[TableCounts]) -> list[Finding]:
    """Every effect with at least one row: dropped keys, undeclared nulls, clipped values, open cases."""
    out = []
    for table in counts:
        declared = metadata.tables[table.table].columns
        for c in table.columns:
            if c.outside_keys:
                out.append(Finding("dropped_keys", c.table, c.column, c.outside_keys, c.rows))
            if c.missing and not declared[c.column].nullable:
                out.append(Finding("undeclared_nulls", c.table, c.column, c.missing, c.rows))
            if c.below_bounds + c.above_bounds:
                out.append(Finding("clipped", c.table, c.column, c.below_bounds + c.above_bounds, c.rows))
        if table.open_cases:
            out.append(Finding("open_cases", table.table, ", ".join(table.ends_case), table.open_cases, table.rows))
    return out


def refused(found: list[Finding], accept: frozenset[str]) -> list[Finding]:
    """What registration refuses unless accepted: rows outside a column's declared keys."""
    return [f for f in found if f.kind == "dropped_keys" and "dropped_keys" not in accept]


def refusal(f: Finding) -> tuple[str, str, str]:
    """``(field, problem, fix)`` of a refused finding, in words for the steward (counts included)."""
    return (f"tables.{f.table}.columns.{f.column}.keys",
            f"{f.rows:,} of {f.total:,} rows ({f.share:.1%}) hold a value that is not in the declared keys; they "
            f"fall in no group, so every answer grouped or filtered by {f.column} leaves them out",
            "Add the missing values to 'keys' (from the public list, not from the data), or accept the loss: "
            "--accept-dropped-keys (API: \"accept\": [\"dropped_keys\"])")


def warnings(metadata: DatasetMetadata, found: list[Finding]) -> list[str]:
    """What registration and the check warn of: clipped values and open cases above WARN_SHARE, and
    linked tables that take the dataset's row limit because they declare none of their own."""
    out = []
    for f in found:
        if f.kind == "clipped" and f.share > WARN_SHARE:
            out.append(f"tables.{f.table}.columns.{f.column}: {f.rows:,} of {f.total:,} values ({f.share:.1%}) lie "
                       "outside the declared bounds and are clipped into them (declared behaviour: answers on "
                       "them are biased toward the bounds); widen the bounds only to a public range")
        if f.kind == "open_cases":
            out.append(f"{f.table}: {f.rows:,} of {f.total:,} rows ({f.share:.1%}) are open cases ({f.column} "
                       "missing): durations describe closed cases only, which are often the faster ones; say so "
                       "to analysts")
    for name, table in metadata.tables.items():
        if table.privacy_unit_via is not None and table.max_contributions is None:
            out.append(f"tables.{name}: linked through {table.privacy_unit_via['table']}, it declares no "
                       f"max_contributions, so queries keep at most {metadata.max_contributions} of its rows per "
                       f"{metadata.privacy_unit} (the dataset's max_contributions); declare its own, e.g. "
                       "\"max_contributions\": 20 for up to 20 steps per case")
    return out


def _column_counts(metadata: DatasetMetadata, table: str, ends: tuple[str, ...]) -> list[list[pl.Expr]]:
    """The counts to take, grouped by the column they read."""
    groups = [[pl.len().alias("__rows")]]
    for name, column in metadata.tables[table].columns.items():
        if column.identifier:
            continue
        value = pl.col(name)
        exprs = [value.is_null().sum().alias(f"{name}.missing")]
        if column.keys is not None:
            exprs.append((value.is_not_null() & ~value.is_in(list(column.keys))).sum().alias(f"{name}.outside"))
        if column.bounds is not None and column.type in ("int", "float"):
            lo, hi = (float(b) for b in column.bounds)  # type: ignore[arg-type]
            exprs.append((value.cast(pl.Float64) < lo).sum().alias(f"{name}.below"))
            exprs.append((value.cast(pl.Float64) > hi).sum().alias(f"{name}.above"))
        groups.append(exprs)
    if ends:
        groups.append([pl.any_horizontal([pl.col(c).is_null() for c in ends]).sum().alias("__open")])
    return groups
