"""What the service-performance analyses share: periods, the public catalogue, bounded reads.

The performance report, lagged points and department scores all read the events of a
period, bounded to at most ``L`` rows per person exactly as the engine bounds a query
(filter first, then keep each person's first ``L`` remaining rows in the table's stable
random order), and compare them with the **public** service catalogue declared in the
dataset's metadata (``catalogue.path``: one row per service with its department,
complexity level and target duration; ``catalogue.steps_path``: the public target of
each processing step). The catalogue is public: reading it costs no privacy and may
happen while planning.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from civicdp.queries.backend import Backend
from civicdp.queries.context import EngineLimits, QueryContext, resolve
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.spec import Filter, QuerySpec

#: Public targets at or below zero would make every ratio infinite; the catalogue must not have them.
MIN_TARGET = 1e-6


class Period(BaseModel):
    """A time range ``[start, end)`` of the request time (either end may be left open)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: datetime | None = None
    end: datetime | None = None


def period_filters(period: Period | None, time_column: str) -> list[dict[str, Any]]:
    """The period as engine filter documents (none when no period is given)."""
    if period is None:
        return []
    return [{"column": time_column, "op": "between", "start": period.start and period.start.isoformat(),
             "end": period.end and period.end.isoformat()}]


def resolve_rows(metadata: DatasetMetadata, dataset_dir: Path, limits: EngineLimits, *, table: str,
                 filters: list[dict[str, Any]], contributions: int | None, field: str = "period") -> QueryContext:
    """Validate a period and a contribution bound the way the engine validates a query's."""
    try:
        spec = QuerySpec(table=table, aggregate="count", filters=tuple(Filter(**f) for f in filters),
                         epsilon=1.0, contributions=contributions)
    except ValueError as exc:  # pydantic: a malformed period
        raise QueryError(field, str(exc).splitlines()[-1], "Give ISO dates such as 2025-01-01") from None
    try:
        return resolve(spec, metadata, dataset_dir, limits)
    except QueryError as exc:
        name = exc.field if exc.field == "contributions" and field == "period" else field
        raise QueryError(name, exc.problem, exc.fix) from None


def bounded(backend: Backend, ctx: QueryContext, not_null: tuple[str, ...] = ()) -> pl.LazyFrame:
    """Rows of ``ctx``'s table that pass its filters, at most ``ctx.contributions`` per person.

    Same rule as the backend's aggregates (:meth:`civicdp.queries.backend.Backend.bound`): filter,
    then keep each person's first rows in the table's stable random order.
    """
    frame = backend.scan(ctx.dataset_dir, ctx.metadata, ctx.spec.table)
    conditions = [backend.row_condition(f) for f in ctx.filters] + [pl.col(c).is_not_null() for c in not_null]
    return backend.bound(frame, ctx.metadata, ctx.spec.table, ctx.contributions, conditions)  # type: ignore[arg-type]


def catalogue(metadata: DatasetMetadata, dataset_dir: Path, key: str, need: tuple[str, ...],
              which: str = "path") -> pl.DataFrame:
    """The public catalogue table named by ``metadata.catalogue[which]``, with columns ``key`` and ``need``."""
    declared = (metadata.catalogue or {}).get(which)
    label = "catalogue of processing steps" if which == "steps_path" else "service catalogue"
    if not isinstance(declared, str):
        raise QueryError("dataset", f"the dataset declares no public {label} (metadata 'catalogue.{which}')",
                         "Ask the data steward to publish the catalogue with targets, or use another analysis")
    path = Path(dataset_dir) / declared
    try:
        frame = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError):
        raise QueryError("dataset", f"the public {label} file '{declared}' cannot be read",
                         "Ask the data steward to check the catalogue file") from None
    missing = [c for c in (key, *need) if c not in frame.columns]
    if missing:
        raise QueryError("dataset", f"the public {label} has no column {missing[0]!r}",
                         f"It needs the columns {[key, *need]}")
    frame = frame.select(key, *need).unique(subset=[key, *[n for n in need if n == "step"]], keep="first")
    for column in need:
        if column.endswith("hours") and frame[column].cast(pl.Float64).fill_null(0).min() <= MIN_TARGET:  # type: ignore[operator]
            raise QueryError("dataset", f"the public {label} has a {column} that is not positive",
                             "Ask the data steward to correct the catalogue")
    return frame


def keyed_targets(keys: tuple, frame: pl.DataFrame, key: str, column: str) -> tuple[list, list[float]]:
    """The public keys that have a target in the catalogue, and their targets (catalogue order of keys)."""
    lookup = dict(zip(frame[key].to_list(), frame[column].cast(pl.Float64).to_list()))
    kept = [k for k in keys if lookup.get(k) is not None]
    return kept, [float(lookup[k]) for k in kept]
