"""Lagged points: services and processing steps that take clearly longer than their public target.

For each cell — a service, or a step within a service — the public catalogue gives a
target duration ``T`` and the spec a factor ``f``; the analysis counts, over bounded
data, the cases that took longer than ``f * T`` and those that did not, and releases
both counts with one discrete-Laplace mechanism: every kept row adds one to exactly one
of the ``2 * cells`` counts, so the vector's L1 sensitivity is the contribution bound
``L``. The share of late cases, its interval and the flag are post-processing.

Two statistics, one rule:

- ``"median"``: the median duration is above ``f * T`` exactly when more than half the
  cases took longer than ``f * T``; a cell is flagged when the lower end of the share's
  interval is above 1/2 (default ``f`` = 1.5).
- ``"share_late"``: a cell is flagged when the lower end of the interval of the share
  of cases above ``f * T`` is above ``max_share`` (default ``f`` = 1, ``max_share`` = 0.75).

Intervals are **simultaneous** over all cells of a level (Bonferroni: each cell's two
counts at ``alpha / (2 * cells)``), so with probability at least ``confidence`` no
cell whose true share is at or below the threshold is flagged: noise alone does not
flag one. Shares describe the bounded data (at most ``L`` rows per person).

A step's time is the time since the previous step of the same case ended (for the first
step, since it started, when the table has a start column); it is computed on all of
the case's steps before bounding, which only uses the person's own rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from privacy.loss import PrivacyLoss, compose
from privacy.mechanisms import LaplaceVector
from queries.analyses.base import Analysis, AnalysisPlan, AnalysisSpec, register
from queries.analyses.service_common import (
    Period, bounded, catalogue, keyed_targets, period_filters, resolve_rows,
)
from queries.backend import Backend
from queries.context import EngineLimits, QueryContext
from queries.errors import QueryError
from queries.metadata import DatasetMetadata
from queries.polars_backend import _filter_expr, _run_rank, _unit_column
from queries.results import Estimate, Result

DEFAULT_FACTOR = {"median": 1.5, "share_late": 1.0}
MAX_CELLS = 100_000
_CELL = "__lag_cell"


class LaggedSpec(AnalysisSpec):
    """``{"analysis": "lagged_points", "epsilon": 1, ...}``: see the module docstring."""

    analysis: Literal["lagged_points"] = "lagged_points"
    level: Literal["services", "steps", "both"] = "both"
    statistic: Literal["median", "share_late"] = "median"
    target_factor: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    max_share: float = Field(default=0.75, gt=0, lt=1)
    period: Period | None = None
    contributions: int | None = None
    step_contributions: int | None = None
    service: str = "service_id"
    duration: str = "duration_hours"
    time: str = "request_time"
    steps_table: str = "steps"
    step: str = "step"
    step_end: str = "ended"
    step_start: str | None = "started"
    step_target_hours: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @property
    def factor(self) -> float:
        return self.target_factor if self.target_factor is not None else DEFAULT_FACTOR[self.statistic]

    @property
    def share_threshold(self) -> float:
        return 0.5 if self.statistic == "median" else self.max_share


@dataclass(frozen=True)
class LevelPlan:
    """One level (services or steps): its cells, their public thresholds, rows and mechanism."""

    name: str
    cells: pl.DataFrame  # [service, (step), target_hours, threshold_hours, __lag_cell]
    rows: QueryContext  # table, period filters and contribution bound of the bounded read
    mechanism: LaplaceVector
    alpha: float

    @property
    def n_cells(self) -> int:
        return self.cells.height

    def half_width(self) -> float:
        """Simultaneous half-width of each released count (all cells' two counts at once)."""
        return self.mechanism.accuracy(self.alpha / (2 * self.n_cells))


class LaggedPlan(AnalysisPlan):
    def __init__(self, spec: LaggedSpec, levels: list[LevelPlan], columns: set[str]) -> None:
        self.spec = spec
        self.levels = levels
        self._columns = columns

    @property
    def loss(self) -> PrivacyLoss:
        return compose(level.mechanism.loss for level in self.levels)

    def columns(self) -> set[str]:
        return set(self._columns)

    def _mechanisms(self) -> list[dict[str, Any]]:
        return [{"role": f"{lv.name}: cases above / not above threshold", "mechanism": lv.mechanism.name,
                 "scale": lv.mechanism.scale, "sensitivity": lv.mechanism.sensitivity,
                 "epsilon": float(lv.mechanism.loss.epsilon), "cells": lv.n_cells} for lv in self.levels]

    def describe(self) -> Estimate:
        threshold = self.spec.share_threshold
        accuracy: dict[str, Any] = {"unit": "cases", "simultaneous": True,
                                    "rule": _rule(self.spec)}
        for lv in self.levels:
            half = lv.half_width()
            # A cell whose every case is late is flagged once (n - h) / (n + h) > threshold.
            accuracy[lv.name] = {"count_half_width": half, "cells": lv.n_cells,
                                 "cases_needed_to_flag": math.ceil(half * (1 + threshold) / (1 - threshold))}
        return Estimate(self.loss, self.levels[0].rows.contributions or 0, self.spec.confidence,
                        self._mechanisms(), accuracy,
                        ["intervals hold for all cells of a level at once (Bonferroni), so noise alone "
                         "flags no cell with the stated confidence"])

    def execute(self, backend: Backend) -> Result:
        spec = self.spec
        tables: dict[str, pl.DataFrame] = {}
        for lv in self.levels:
            exact = _exact_counts(backend, spec, lv)
            tables[lv.name] = _release(spec, lv, exact)
        flagged = pl.concat([_flag_rows(name, t, spec) for name, t in tables.items()], how="diagonal_relaxed")
        flagged = flagged.sort(["ci_low", "share_above"], descending=True)
        notes = [f"{_rule(spec)}; intervals at {spec.confidence:.0%} hold for all cells of a level at once",
                 f"flagged: {flagged.height} of {sum(lv.n_cells for lv in self.levels)} cells"]
        return Result(flagged, self.loss, self.levels[0].rows.contributions or 0, spec.confidence,
                      self._mechanisms(), spec, notes, tables=tables)


def _rule(spec: LaggedSpec) -> str:
    if spec.statistic == "median":
        return (f"flagged when the median time is certainly above {spec.factor:g} x the public target "
                "(lower end of the share of cases above it > 0.5)")
    return (f"flagged when the share of cases above {spec.factor:g} x the public target is certainly "
            f"above {spec.max_share:g} (lower end of its interval)")


def _flag_rows(level: str, table: pl.DataFrame, spec: LaggedSpec) -> pl.DataFrame:
    return table.filter(pl.col("flagged")).with_columns(pl.lit(level[:-1]).alias("level")).select(
        "level", *[c for c in table.columns if c not in ("flagged",)])


def _exact_counts(backend: Backend, spec: LaggedSpec, lv: LevelPlan) -> np.ndarray:
    """Exact bounded counts ``[above per cell..., not above per cell...]`` (cell order)."""
    keys = [spec.service] if lv.name == "services" else [spec.service, spec.step]
    cells = lv.cells.select(*keys, "threshold_hours", _CELL)
    if lv.name == "services":
        rows = bounded(backend, lv.rows, not_null=(spec.duration,))
        hours = pl.col(spec.duration).cast(pl.Float64)
        # rows: [service, duration] of kept cases
        frame = rows.select(pl.col(spec.service), hours.alias("__hours"))
    else:
        frame = _step_rows(backend, spec, lv)
    joined = frame.join(cells.lazy(), on=keys, how="inner")
    # joined: [keys..., __hours, threshold_hours, __lag_cell] -> counts per cell and side
    counts = (joined.group_by(_CELL).agg((pl.col("__hours") > pl.col("threshold_hours")).sum().alias("above"),
                                          pl.len().alias("rows"))
              .collect())
    above = np.zeros(lv.n_cells, dtype=np.int64)
    total = np.zeros(lv.n_cells, dtype=np.int64)
    index = counts[_CELL].to_numpy()
    above[index] = counts["above"].to_numpy()
    total[index] = counts["rows"].to_numpy()
    return np.concatenate([above, total - above])


def _step_rows(backend: Backend, spec: LaggedSpec, lv: LevelPlan) -> pl.LazyFrame:
    """Kept steps with their service and time since the previous step: ``[service, step, __hours]``."""
    ctx = lv.rows
    metadata, dataset_dir = ctx.metadata, ctx.dataset_dir
    via = metadata.tables[spec.steps_table].privacy_unit_via or {}
    on = via.get("on", "event_id")
    steps = backend.scan(dataset_dir, metadata, spec.steps_table)  # type: ignore[attr-defined]
    end = pl.col(spec.step_end)
    previous = end.shift(1).over(on, order_by=[spec.step_end, spec.step])  # consecutive in time
    if spec.step_start is not None:
        previous = pl.when(previous.is_null()).then(pl.col(spec.step_start)).otherwise(previous)
    hours = (end - previous).dt.total_microseconds().cast(pl.Float64) / 3.6e9
    # steps: [unit, rank, event, step, __hours] in the cache's order (person, rank)
    steps = steps.with_columns(hours.alias("__hours"))
    events = backend.scan(dataset_dir, metadata, via.get("table", "events"))  # type: ignore[attr-defined]
    event_columns = [on, spec.service] + ([spec.time] if ctx.filters else [])
    steps = steps.join(events.select(event_columns), on=on, how="left", maintain_order="left")
    conditions = [pl.col("__hours").is_not_null(), pl.col(spec.service).is_not_null(),
                  *(_filter_expr(f) for f in ctx.filters)]
    # Filter, then bound: re-rank each person's remaining steps in the cached order.
    steps = steps.filter(pl.all_horizontal(conditions))
    steps = steps.filter(_run_rank(_unit_column(metadata, spec.steps_table)) <= ctx.contributions)
    return steps.select(spec.service, spec.step, "__hours")


def _release(spec: LaggedSpec, lv: LevelPlan, exact: np.ndarray) -> pl.DataFrame:
    n = lv.n_cells
    noisy = np.asarray(lv.mechanism.release(exact.tolist()), dtype=np.float64)
    above, below = noisy[:n], noisy[n:]
    half = lv.half_width()
    a_lo, a_hi = np.maximum(above - half, 0), np.maximum(above + half, 0)
    b_lo, b_hi = np.maximum(below - half, 0), np.maximum(below + half, 0)
    a, b = np.maximum(above, 0), np.maximum(below, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # share = a / (a + b) rises with a and falls with b: the corners give its interval.
        share = np.where(a + b > 0, a / (a + b), np.nan)
        low = np.where(a_lo + b_hi > 0, a_lo / (a_lo + b_hi), 0.0)
        high = np.where(a_hi + b_lo > 0, a_hi / (a_hi + b_lo), 1.0)
    cases = above + below
    table = lv.cells.drop(_CELL).with_columns(
        pl.Series("cases", cases.round().astype(np.int64)),
        pl.Series("cases_ci_low", np.round(cases - 2 * half).astype(np.int64)),
        pl.Series("cases_ci_high", np.round(cases + 2 * half).astype(np.int64)),
        pl.Series("share_above", share, nan_to_null=True),
        pl.Series("ci_low", low),
        pl.Series("ci_high", high),
        pl.Series("flagged", low > spec.share_threshold),
    )
    return table.sort(["flagged", "ci_low"], descending=True)


class LaggedPoints(Analysis):
    name = "lagged_points"
    spec_model = LaggedSpec

    def plan(self, spec: AnalysisSpec, metadata: DatasetMetadata, dataset_dir: Path,
             limits: EngineLimits) -> LaggedPlan:
        assert isinstance(spec, LaggedSpec)
        if spec.dataset is not None and spec.dataset != metadata.name:
            raise QueryError("dataset", f"this dataset is '{metadata.name}', not '{spec.dataset}'",
                             "Name the dataset you are querying, or leave 'dataset' out")
        if spec.epsilon is None:
            raise QueryError("epsilon", "give the privacy loss to spend", 'For example "epsilon": 1')
        if spec.statistic == "median" and "max_share" in spec.model_fields_set:
            raise QueryError("max_share", "applies to the 'share_late' statistic only",
                             "Remove 'max_share', or ask for \"statistic\": \"share_late\"")
        events = metadata.tables.get("events")
        names = ["services", "steps"] if spec.level == "both" else [spec.level]
        epsilon = spec.epsilon / len(names)
        alpha = 1 - spec.confidence
        columns = {spec.service}
        services = _service_targets(spec, metadata, dataset_dir, events)
        levels = []
        for name in names:
            if name == "services":
                _need(events, spec.duration, "duration", numeric=True)
                ctx = resolve_rows(metadata, dataset_dir, limits, table="events",
                                   filters=period_filters(spec.period, spec.time), contributions=spec.contributions)
                cells = services
                columns |= {spec.duration, *(f.column for f in ctx.filters)}
            else:
                ctx, cells = _steps_level(spec, metadata, dataset_dir, limits, services)
                columns |= {spec.step, spec.step_end, *([spec.step_start] if spec.step_start else []),
                            *(f.column for f in ctx.filters)}
            if cells.height == 0:
                raise QueryError("level", f"no {name} have a public target", "Ask for another level")
            cells = cells.with_columns((pl.col("target_hours") * spec.factor).alias("threshold_hours"))
            cells = cells.with_row_index(_CELL).with_columns(pl.col(_CELL).cast(pl.Int64))
            mechanism = LaplaceVector.for_epsilon(ctx.contributions or 1, epsilon)
            levels.append(LevelPlan(name, cells, ctx, mechanism, alpha))
        return LaggedPlan(spec, levels, columns)


def _need(table: Any, column: str, field: str, numeric: bool = False) -> None:
    meta = table.columns.get(column) if table is not None else None
    if meta is None:
        raise QueryError(field, f"unknown column '{column}'",
                         f"Use one of {sorted(table.columns) if table is not None else []}")
    if numeric and meta.type not in ("int", "float"):
        raise QueryError(field, f"'{column}' is not a numeric column", "Name a duration in hours")


def _service_targets(spec: LaggedSpec, metadata: DatasetMetadata, dataset_dir: Path,
                     events: Any) -> pl.DataFrame:
    """``[service, target_hours]`` for every public service key with a public target."""
    if events is None:
        raise QueryError("dataset", "the dataset has no 'events' table", "Use a dataset of service events")
    _need(events, spec.service, "service")
    keys = events.columns[spec.service].keys
    if keys is None:
        raise QueryError("service", f"'{spec.service}' has no public key set",
                         "Name the column whose public keys are the service catalogue")
    frame = catalogue(metadata, dataset_dir, spec.service, ("target_hours",))
    kept, targets = keyed_targets(tuple(keys), frame, spec.service, "target_hours")
    return pl.DataFrame({spec.service: kept, "target_hours": targets})


def _steps_level(spec: LaggedSpec, metadata: DatasetMetadata, dataset_dir: Path, limits: EngineLimits,
                 services: pl.DataFrame) -> tuple[QueryContext, pl.DataFrame]:
    table = metadata.tables.get(spec.steps_table)
    if table is None or table.privacy_unit_via is None:
        raise QueryError("steps_table", f"no table '{spec.steps_table}' of processing steps linked to the events",
                         "Name the steps table (declared with privacy_unit_via), or ask for \"level\": \"services\"")
    _need(table, spec.step, "step")
    step_keys = table.columns[spec.step].keys
    if step_keys is None:
        raise QueryError("step", f"'{spec.step}' has no public key set", "Name the step column of the table")
    for name, column in (("step_end", spec.step_end), ("step_start", spec.step_start)):
        if column is not None:
            _need(table, column, name)
            if table.columns[column].type != "datetime":
                raise QueryError(name, f"'{column}' is not a time column", "Name the step's time column")
    owner = metadata.tables[table.privacy_unit_via["table"]]
    if spec.service not in owner.columns:
        raise QueryError("service", f"the steps' table '{table.privacy_unit_via['table']}' has no column "
                         f"'{spec.service}'", "Name the service column of the events")
    ctx = resolve_rows(metadata, dataset_dir, limits, table=spec.steps_table, filters=[],
                       contributions=spec.step_contributions or spec.contributions, field="step_contributions")
    filters = period_filters(spec.period, spec.time)
    if filters:
        # The period applies to the case's request time, a column of the events table.
        owner_ctx = resolve_rows(metadata, dataset_dir, limits, table=table.privacy_unit_via["table"],
                                 filters=filters, contributions=None)
        ctx = replace(ctx, filters=owner_ctx.filters)
    if spec.step_target_hours is not None:
        grid = [(s, k) for s in services[spec.service].to_list() for k in step_keys]
        cells = pl.DataFrame({spec.service: [g[0] for g in grid], spec.step: [g[1] for g in grid],
                              "target_hours": [spec.step_target_hours] * len(grid)}, strict=False)
    else:
        frame = catalogue(metadata, dataset_dir, spec.service, (spec.step, "target_hours"), which="steps_path")
        public = set(services[spec.service].to_list())
        frame = frame.filter(pl.col(spec.service).is_in(list(public)) & pl.col(spec.step).is_in(list(step_keys)))
        cells = frame.select(spec.service, spec.step, pl.col("target_hours").cast(pl.Float64)).sort(
            spec.service, spec.step)
    if cells.height > MAX_CELLS:
        raise QueryError("level", f"{cells.height} steps is more than the {MAX_CELLS} allowed", "Ask for services")
    return ctx, cells


register(LaggedPoints())
