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

Intervals are **simultaneous over every cell the answer can flag** — all services and
all steps together when ``level`` is ``"both"`` (Bonferroni over the union: each of the
``N`` cells at ``alpha / N``) — so with probability at least ``confidence`` every share
lies in its interval and no cell whose true share is at or below the threshold is
flagged: noise alone does not flag one, at any loss. A share's interval inverts a test
of each candidate share ``p`` (:mod:`civicdp.queries.analyses.ratio_intervals`): at the truth,
``(1 - p) * above - p * below`` is pure noise with a known bound, which needs far fewer
cases to flag than bounding the two counts separately. The cases' intervals form a second
family with the same guarantee. Shares, intervals and flags describe the **bounded**
data (at most ``L`` rows per person, the rest dropped before counting), not all rows.

A step's time is the time since the previous step of the same case ended (for the first
step, since it started, when the table has a start column); it is computed on all of
the case's steps before bounding, which only uses the person's own rows.

Here: the plan (noise, intervals, flags) and the planner with the public cells of each
level. The spec and a level's public plan are in
:mod:`~civicdp.queries.analyses.lagged_spec`, the exact bounded counts (the one step that
reads data) in :mod:`~civicdp.queries.analyses.lagged_counts`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from civicdp.privacy.accounting import Additive
from civicdp.privacy.loss import PrivacyLoss, compose
from civicdp.queries.analyses.base import Analysis, AnalysisPlan, AnalysisSpec, register
from civicdp.queries.analyses.lagged_counts import exact_counts
from civicdp.queries.analyses.lagged_spec import CELL, LaggedSpec, LevelPlan
from civicdp.queries.analyses.ratio_intervals import inverted_intervals, share_grid
from civicdp.queries.analyses.service_common import catalogue, keyed_targets, period_filters, resolve_rows
from civicdp.queries.backend import Backend
from civicdp.queries.context import EngineLimits, QueryContext
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.results import Estimate, Result

MAX_CELLS = 100_000


class LaggedPlan(AnalysisPlan):
    def __init__(self, spec: LaggedSpec, levels: list[LevelPlan], columns: set[str]) -> None:
        self.spec = spec
        self.levels = levels
        self._columns = columns

    @property
    def loss(self) -> PrivacyLoss:
        return compose(level.mechanism.loss for level in self.levels)

    @property
    def n_cells(self) -> int:
        return sum(lv.n_cells for lv in self.levels)

    def columns(self) -> set[str]:
        return set(self._columns)

    def _mechanisms(self) -> list[dict[str, Any]]:
        return [{"role": f"{lv.name}: cases above / not above threshold", "mechanism": lv.mechanism.name,
                 "scale": lv.mechanism.scale, "sensitivity": lv.mechanism.sensitivity,
                 "epsilon": float(lv.mechanism.loss.epsilon), "cells": lv.n_cells} for lv in self.levels]

    def _family_note(self) -> str:
        names = " and ".join(lv.name for lv in self.levels)
        return (f"intervals at {self.spec.confidence:.0%} hold for all {self.n_cells} cells ({names} together) "
                f"at once: each cell at error level {1 - self.spec.confidence:g} / {self.n_cells} (Bonferroni), "
                "so with that confidence noise alone flags no cell, at any loss")

    def _bounding_note(self) -> str:
        bounds = "; ".join(f"{lv.name}: at most {lv.rows.contributions} {'event' if lv.name == 'services' else 'step'}"
                           f"{'' if lv.rows.contributions == 1 else 's'} per person" for lv in self.levels)
        return (f"contribution bound ({bounds}; each person's first rows in a fixed random order): rows beyond it "
                "are dropped before counting, and shares, intervals and flags describe the kept rows only, "
                "not all the data")

    def _linked_notes(self) -> list[str]:
        """The steps table's row limit per person and where its default comes from (a linked table)."""
        notes = (lv.rows.metadata.linked_rows_note(lv.rows.spec.table, lv.rows.contributions) for lv in self.levels)
        return [note for note in notes if note]

    def describe(self) -> Estimate:
        threshold = self.spec.share_threshold
        accuracy: dict[str, Any] = {"unit": "cases", "simultaneous": True, "rule": _rule(self.spec),
                                    "family": {"cells": self.n_cells, "alpha": round(1 - self.spec.confidence, 12),
                                               "cell_alpha": self.levels[0].cell_alpha}}
        for lv in self.levels:
            accuracy[lv.name] = {"cells": lv.n_cells, "cases_half_width": math.floor(lv.cases_margin),
                                 "cases_needed_to_flag": lv.cases_needed_to_flag(threshold)}
        return Estimate(self.loss, self.levels[0].rows.contributions or 0, self.spec.confidence,
                        self._mechanisms(), accuracy,
                        [self._family_note(), self._bounding_note(), *self._linked_notes()])

    def execute(self, backend: Backend) -> Result:
        return self.release(self.exact_counts(backend))

    def exact_counts(self, backend: Backend) -> dict[str, np.ndarray]:
        """Per level, the exact bounded counts ``[above per cell..., not above per cell...]`` (reads data)."""
        return {lv.name: exact_counts(backend, self.spec, lv) for lv in self.levels}

    def release(self, exact: dict[str, np.ndarray]) -> Result:
        """The private answer from the exact counts: noise, then post-processing only."""
        spec = self.spec
        tables = {lv.name: _release(spec, lv, exact[lv.name]) for lv in self.levels}
        flagged = pl.concat([_flag_rows(name, t, spec) for name, t in tables.items()], how="diagonal_relaxed")
        flagged = flagged.sort(["ci_low", "share_above"], descending=True)
        notes = [_rule(spec), self._family_note(), self._bounding_note(), *self._linked_notes(),
                 f"flagged: {flagged.height} of {self.n_cells} cells"]
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



def _release(spec: LaggedSpec, lv: LevelPlan, exact: np.ndarray) -> pl.DataFrame:
    n = lv.n_cells
    noisy = np.asarray(lv.mechanism.release(exact.tolist()), dtype=np.float64)
    above, below = noisy[:n], noisy[n:]
    grid, w1, w2 = share_grid()
    first, last = inverted_intervals(above, below, w1, w2, lv.share_margins)
    low, high = grid[first], grid[last]
    a, b = np.maximum(above, 0), np.maximum(below, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(a + b > 0, np.clip(a / (a + b), low, high), np.nan)
    cases = above + below  # integers; the true count is an integer, so the bound rounds down
    margin = math.floor(lv.cases_margin)
    table = lv.cells.drop(CELL).with_columns(
        pl.Series("cases", cases.astype(np.int64)),
        pl.Series("cases_ci_low", (cases - margin).astype(np.int64)),
        pl.Series("cases_ci_high", (cases + margin).astype(np.int64)),
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
        # The analyst's epsilon as the dataset's budget (epsilon, or rho on zCDP), split over the levels.
        budget = metadata.accounting.rule.budget(spec.epsilon) / len(names)
        columns = {spec.service}
        services = _service_targets(spec, metadata, dataset_dir, events)
        levels: list[tuple[str, pl.DataFrame, QueryContext, Additive]] = []
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
            cells = cells.with_row_index(CELL).with_columns(pl.col(CELL).cast(pl.Int64))
            mechanism = metadata.accounting.rule.additive(ctx.contributions or 1, budget)
            levels.append((name, cells, ctx, mechanism))
        # One family over every cell the answer can flag, both levels together.
        cell_alpha = (1 - spec.confidence) / sum(level[1].height for level in levels)
        plans = [LevelPlan(*level, cell_alpha=cell_alpha) for level in levels]
        return LaggedPlan(spec, plans, columns)


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
