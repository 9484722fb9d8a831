"""Lagged points' exact bounded counts per cell: the one step that reads data.

For each cell of a level, the kept cases above its public threshold and those not above
it, over rows bounded to at most ``L`` per person as the backend bounds a query. A step's
time is the time since the previous step of the same case ended (for the first step,
since it started, when the table has a start column); it is computed on all of the
case's steps before bounding, which only uses the person's own rows.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from civicdp.queries.analyses.lagged_spec import CELL, LaggedSpec, LevelPlan
from civicdp.queries.analyses.service_common import bounded
from civicdp.queries.backend import Backend, person_column


def exact_counts(backend: Backend, spec: LaggedSpec, lv: LevelPlan) -> np.ndarray:
    """Exact bounded counts ``[above per cell..., not above per cell...]`` (cell order)."""
    keys = [spec.service] if lv.name == "services" else [spec.service, spec.step]
    cells = lv.cells.select(*keys, "threshold_hours", CELL)
    if lv.name == "services":
        rows = bounded(backend, lv.rows, not_null=(spec.duration,))
        hours = pl.col(spec.duration).cast(pl.Float64)
        # rows: [service, duration] of kept cases
        frame = rows.select(pl.col(spec.service), hours.alias("__hours"))
    else:
        frame = _step_rows(backend, spec, lv)
    joined = frame.join(cells.lazy(), on=keys, how="inner")
    # joined: [keys..., __hours, threshold_hours, __lag_cell] -> counts per cell and side
    counts = (joined.group_by(CELL).agg((pl.col("__hours") > pl.col("threshold_hours")).sum().alias("above"),
                                          pl.len().alias("rows"))
              .collect())
    above = np.zeros(lv.n_cells, dtype=np.int64)
    total = np.zeros(lv.n_cells, dtype=np.int64)
    index = counts[CELL].to_numpy()
    above[index] = counts["above"].to_numpy()
    total[index] = counts["rows"].to_numpy()
    return np.concatenate([above, total - above])


def _step_rows(backend: Backend, spec: LaggedSpec, lv: LevelPlan) -> pl.LazyFrame:
    """Kept steps with their service and time since the previous step: ``[service, step, __hours]``."""
    ctx = lv.rows
    metadata, dataset_dir = ctx.metadata, ctx.dataset_dir
    via = metadata.tables[spec.steps_table].privacy_unit_via or {}
    on = via.get("on", "event_id")
    unit = person_column(metadata, spec.steps_table)
    steps = backend.scan(dataset_dir, metadata, spec.steps_table)
    # steps: [unit, rank, event, step, __hours] in the cache's order (person, rank)
    steps = steps.with_columns(_hours_since_previous(steps, spec, unit, on).alias("__hours"))
    events = backend.scan(dataset_dir, metadata, via.get("table", "events"))
    event_columns = [pl.col(on), pl.col(metadata.privacy_unit).alias(unit), pl.col(spec.service),
                     *([pl.col(spec.time)] if ctx.filters else [])]
    steps = steps.join(events.select(event_columns), on=[on, unit], how="left", maintain_order="left")
    conditions = [pl.col("__hours").is_not_null(), pl.col(spec.service).is_not_null(),
                  *(backend.row_condition(f) for f in ctx.filters)]
    # Filter, then bound: each person's first remaining steps in the table's stable order.
    steps = backend.bound(steps, metadata, spec.steps_table, ctx.contributions, conditions)  # type: ignore[arg-type]
    return steps.select(spec.service, spec.step, "__hours")


def _hours_since_previous(steps: pl.LazyFrame, spec: LaggedSpec, unit: str, on: str) -> pl.Series:
    """Each step's hours since the previous step of its case ended (for a case's first step, since it
    started, when the table has a start column; else null), in the rows' order.

    A case is an event of one person: event ids are not checked for uniqueness, so another
    person's steps under the same id must not become a step's predecessor. The steps are
    sorted once by (person, case, end, step) (stable: ties keep the rows' order), each takes
    the end of the row before it in the same case, and the hours are put back in the rows'
    order by their row numbers (a scatter, not a second sort): a window ``over`` 29 M rows
    in 10 M cases took most of a minute.
    """
    end = pl.col(spec.step_end)
    same_case = (pl.col(unit).eq_missing(pl.col(unit).shift(1)) & pl.col(on).eq_missing(pl.col(on).shift(1)))
    previous = pl.when(same_case).then(end.shift(1))
    if spec.step_start is not None:
        previous = pl.when(previous.is_null()).then(pl.col(spec.step_start)).otherwise(previous)
    hours = (end - previous).dt.total_microseconds().cast(pl.Float64) / 3.6e9
    # ordered: [__row, __hours] sorted by (person, case, end, step)
    ordered = (steps.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("__row"), unit, on, spec.step_end,
                            spec.step, *([spec.step_start] if spec.step_start else []))
               .sort([unit, on, spec.step_end, spec.step], maintain_order=True)
               .select("__row", hours.alias("__hours")).collect())
    out = np.full(ordered.height, np.nan)
    out[ordered["__row"].to_numpy()] = ordered["__hours"].to_numpy()
    return pl.Series("__hours", out, nan_to_null=True)
