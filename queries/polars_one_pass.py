"""Exact aggregates of many requests in one pass over the data (the Polars backend's ``aggregate_many``).

A report asks ~24 aggregates of the same table. Asking :meth:`aggregate` for each one
reads and bounds the table 24 times; here the needed columns are read once, each
bounding variant (all rows of the period; rows with a waiting time; rows with a
satisfaction score) is computed once as a mask, group keys become integer codes (their
position in the public key list, which is the cell order), and every exact aggregate is
an integer ``bincount``. The results have exactly the shape and values
:meth:`civicdp.queries.polars_backend.PolarsBackend.aggregate` returns (a test checks it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from civicdp.queries.backend import AggregateRequest, person_column
from civicdp.queries.context import key_texts
from civicdp.queries.metadata import TableMeta
from civicdp.queries.polars_exprs import row_condition
from civicdp.queries.polars_rank_cache import RANK

_INT64 = (-(2**63), 2**63 - 1)


def fits_one_pass(requests: Sequence[AggregateRequest]) -> bool:
    """Whether :func:`one_pass_aggregates` answers ``requests``: one table, the same filters,
    and one grouping each, on public keys (no time bucket)."""
    if not requests:
        return False
    first = requests[0]
    return all(r.dataset_dir == first.dataset_dir and r.table == first.table and r.filters == first.filters
               and (r.metadata is first.metadata or r.metadata == first.metadata)
               and len(r.group_by) == 1 and r.group_by[0].bucket is None for r in requests)


def one_pass_aggregates(frame: pl.LazyFrame, requests: Sequence[AggregateRequest]) -> list[pl.DataFrame]:
    """Exact bounded aggregates of ``requests`` (see :func:`fits_one_pass`) from ``frame``, the table's scan."""
    first = requests[0]
    metadata, table = first.metadata, first.table
    meta = metadata.tables[table]
    unit = person_column(metadata, table)
    columns = {unit, RANK}
    for request in requests:
        columns |= _columns(request)
    frame = frame.select(sorted(columns))
    # frame: [unit, rank, groups..., measured columns...], sorted by person and rank
    conditions = [row_condition(f) for f in first.filters]
    masks: dict[tuple[str | None, int], str] = {}
    exprs = []
    for request in requests:
        key = _mask_key(request, meta)
        if key not in masks:
            masks[key] = f"__keep{len(masks)}"
            column, limit = key
            extra = [pl.col(column).is_not_null()] if column is not None else []
            cond = conditions + extra
            if cond:
                ok = pl.all_horizontal(cond)
                # Filter, then bound: the rank among the person's remaining rows (rows sorted by person).
                rank = pl.when(ok).then(_run_rank_within(unit, ok)).otherwise(None)
                keep = ok & (rank <= limit)
            else:
                keep = pl.col(RANK) <= limit
            exprs.append(keep.fill_null(False).alias(masks[key]))
    groups = {g.name: g for request in requests for g in request.group_by}
    for name, group in groups.items():
        exprs.append(pl.col(group.column).cast(pl.String).replace_strict(
            key_texts(group.keys), list(range(len(group.keys))), default=None,
            return_dtype=pl.Int64).alias(f"__code_{name}"))
    data = frame.with_columns(exprs).collect()
    positions: dict[tuple, np.ndarray] = {}  # grid positions of a column's kept values, shared by groupings
    return [_aggregate(request, data, masks[_mask_key(request, meta)], positions) for request in requests]


def _columns(request: AggregateRequest) -> set[str]:
    """Every column the request reads."""
    names = [request.measure.column, *(g.column for g in request.group_by), *(f.column for f in request.filters)]
    return {c for c in names if c}


def _run_rank_within(unit: str, ok: pl.Expr) -> pl.Expr:
    """Position of each row among its person's rows that satisfy ``ok`` (rows sorted by person)."""
    count = ok.cast(pl.UInt32).cum_sum()
    first = (pl.col(unit) != pl.col(unit).shift(1)).fill_null(True)
    before = pl.when(first).then(count - ok.cast(pl.UInt32)).forward_fill()
    return count - before


def _mask_key(request: AggregateRequest, meta: TableMeta) -> tuple[str | None, int]:
    column = request.measure.column
    nullable = column is not None and meta.columns[column].nullable
    return (column if nullable else None), request.contributions


def _aggregate(request: AggregateRequest, data: pl.DataFrame, mask: str,
               positions: dict[tuple, np.ndarray]) -> pl.DataFrame:
    (group,) = request.group_by
    measure = request.measure
    keep = data[mask].to_numpy()
    if measure.column is not None:
        # The scan already made NaN and infinities null; checked again so no cast below can see one.
        keep = keep & data[measure.column].cast(pl.Float64).is_finite().fill_null(False).to_numpy()
    codes = data[f"__code_{group.name}"].fill_null(-1).to_numpy()
    valid = keep & (codes >= 0)  # values outside the public keys are dropped
    n_keys = len(group.keys)
    keys = pl.Series(group.name, list(group.keys), strict=False)
    if measure.kind == "rows":
        rows = np.bincount(codes[valid], minlength=n_keys)
        return pl.DataFrame([keys, pl.Series("rows", rows.astype(np.int64))])
    if measure.kind == "grid":
        # The kept values' positions depend on the column, the bounding and the grid, not the
        # grouping: computed once for every grouping of the report that asks them.
        key = (mask, measure.column, measure.grid)
        if key not in positions:
            kept = data[measure.column].cast(pl.Float64).to_numpy()[keep]
            grid = np.asarray(measure.grid, dtype=np.float64)
            positions[key] = np.searchsorted(grid, kept, side="left") + np.searchsorted(grid, kept, side="right")
        in_keys = codes[keep] >= 0  # values outside the public keys are dropped
        return _grid_counts(keys, codes[keep][in_keys], positions[key][in_keys], n_keys, len(measure.grid))
    x = data[measure.column].cast(pl.Float64).to_numpy()[valid]
    c = codes[valid]
    if measure.kind == "sum":
        # Values are finite here (the scan made NaN and infinities null, dropped above), and
        # planning refused resolutions whose sums could overflow: integer units, summed exactly.
        units = np.round((np.clip(x, measure.lower, measure.upper) - measure.offset) / measure.resolution)
        rows = np.bincount(c, minlength=n_keys)
        # Summed in Int128 and saturated to Int64 as the backend's aggregate sums (np.add.at would
        # wrap, and is several times slower).
        sums = (pl.DataFrame([pl.Series("c", c), pl.Series("u", units.astype(np.int64))]).group_by("c")
                .agg(pl.col("u").cast(pl.Int128).sum().clip(*_INT64).cast(pl.Int64)))
        total = np.zeros(n_keys, dtype=np.int64)
        total[sums["c"].to_numpy()] = sums["u"].to_numpy()
        return pl.DataFrame([keys, pl.Series("rows", rows.astype(np.int64)), pl.Series("total", total)])
    raise ValueError(f"unknown measure {measure.kind!r}")


def _grid_counts(keys: pl.Series, c: np.ndarray, positions: np.ndarray, n_keys: int, m: int) -> pl.DataFrame:
    """Rows per (key, grid position), the non-empty ones: [group, position, rows]."""
    width = 2 * m + 1
    counts = np.bincount(c * width + positions, minlength=n_keys * width).reshape(n_keys, width)
    cell, position = np.nonzero(counts)
    return pl.DataFrame([keys.gather(cell), pl.Series("position", position.astype(np.int64)),
                         pl.Series("rows", counts[cell, position].astype(np.int64))])
