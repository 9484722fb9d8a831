"""The performance report: volumes, durations, waiting times and satisfaction, in one request.

For each grouping (by default service, department, centre and channel) the report
asks the engine's own aggregate kinds: the volume (count), the mean, median and 90th
percentile of response duration and of waiting time, and the mean satisfaction — every
value with its interval at the requested confidence. It is one request with one stated
privacy loss: the loss is split between the groupings (each person's rows count in every
grouping) in proportion to the square root of their public key counts, and, within a
grouping, between the parts by fixed public weights
(:data:`WEIGHTS`: the quantiles, which pay for their intervals, get the largest shares).
Volumes keep the dataset's contribution bound; the value parts keep at most
:data:`VALUE_CONTRIBUTIONS` rows per person unless ``value_contributions`` says otherwise.
The parts compose sequentially (pure DP, losses add), so the report's loss is their sum;
``estimate`` shows it and every part's accuracy before any data is read.

Quantiles use a public geometric grid of candidates (2% apart from 0.1 unit up to the
column's upper bound), so short and long durations are located with the same relative
precision. Parts whose column the dataset lacks are left out (``"waiting": null``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field

from civicdp.privacy.loss import PrivacyLoss, compose
from civicdp.queries.analyses.base import Analysis, AnalysisPlan, AnalysisSpec, register
from civicdp.queries.analyses.service_common import Period, period_filters
from civicdp.queries.backend import Backend
from civicdp.queries.context import EngineLimits
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.query_plan import Plan, plan_query
from civicdp.queries.results import Estimate, Result
from civicdp.queries.spec import parse_spec

#: Public shares of a grouping's loss per part (normalised over the parts present).
WEIGHTS = {"volume": 1.0, "duration_mean": 1.5, "duration_quantiles": 3.0,
           "waiting_mean": 1.0, "waiting_quantiles": 2.0, "satisfaction_mean": 1.5}
DEFAULT_BY = ("service_id", "department", "centre", "channel")
GRID_RATIO = 1.02  # consecutive quantile candidates differ by 2%
GRID_START = 0.1
#: Default rows per person for the value parts (means, quantiles). A person's heavy use adds
#: noise to every value but little information about a typical case: on the demo data at
#: epsilon 1, 3 rows instead of 10 halve the median error of department mean durations
#: (35% -> 18%), while volumes keep the dataset's bound (their bias grows fast as L falls).
VALUE_CONTRIBUTIONS = 3


class ReportSpec(AnalysisSpec):
    """``{"analysis": "performance_report", "epsilon": 1}``: see the module docstring."""

    analysis: Literal["performance_report"] = "performance_report"
    by: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=8)  # None: DEFAULT_BY present
    period: Period | None = None
    contributions: int | None = None  # volumes: rows per person (default: the dataset's)
    value_contributions: int | None = None  # durations, waiting, satisfaction (default: min(3, volumes'))
    duration: str | None = "duration_hours"
    waiting: str | None = "waiting_minutes"
    satisfaction: str | None = "satisfaction"
    time: str = "request_time"


@dataclass(frozen=True)
class Part:
    """One aggregate of the report: its grouping, metric name and its query plan."""

    by: str
    metric: str
    plan: Plan


class ReportPlan(AnalysisPlan):
    def __init__(self, spec: ReportSpec, parts: list[Part], contributions: int, value_contributions: int) -> None:
        self.spec = spec
        self.parts = parts
        self.contributions = contributions
        self.value_contributions = value_contributions

    @property
    def loss(self) -> PrivacyLoss:
        return compose(p.plan.loss for p in self.parts)

    def columns(self) -> set[str]:
        return set().union(*(p.plan.columns() for p in self.parts))

    def _mechanisms(self) -> list[dict[str, Any]]:
        return [{**m, "part": f"{p.by}: {p.metric}"} for p in self.parts for m in p.plan.calibration.describe()]

    def _bounding_note(self) -> str:
        """The contribution bounds and clipping used, said plainly (the rows dropped are not released)."""
        clipped = {}
        for part in self.parts:
            column = part.plan.context.spec.column
            bounds = part.plan.context.column.bounds if part.plan.context.column is not None else None
            if column is not None and bounds is not None:
                clipped[column] = f"{column} to [{float(bounds[0]):g}, {float(bounds[1]):g}]"
        clipping = f"; values clipped to their declared bounds ({', '.join(clipped.values())})" if clipped else ""
        return (f"contribution bound: at most {self.contributions} row{'' if self.contributions == 1 else 's'} per "
                f"person in volumes and {self.value_contributions} in durations, waiting times and satisfaction "
                "(each person's first rows "
                f"in a fixed random order){clipping}; rows beyond the bound are dropped, and every value and "
                "interval describes the kept, clipped rows only, not all the data (volumes of all the data are "
                "higher where people have more rows than the bound)")

    def describe(self) -> Estimate:
        accuracy = {f"{p.by}: {p.metric}": {**p.plan.describe().accuracy,
                                            "epsilon": float(p.plan.loss.epsilon)} for p in self.parts}
        return Estimate(self.loss, self.contributions, self.spec.confidence, self._mechanisms(), accuracy,
                        [f"one loss for the whole report, split over {len({p.by for p in self.parts})} "
                         "groupings (by the square root of their key counts) and their parts",
                         self._bounding_note()])

    def execute(self, backend: Backend) -> Result:
        plans = [part.plan for part in self.parts]
        if all(g.bucket is None for p in plans for g in p.context.group_by):
            # One read of the data for every part where the backend can (same bounding, same exact values).
            exact = backend.aggregate_many([p.request() for p in plans])
            released = [p.kind.release(p.context, p.calibration, e) for p, e in zip(plans, exact)]
        else:
            released = [p.execute(backend).table for p in plans]
        long_rows: list[pl.DataFrame] = []
        wide: dict[str, pl.DataFrame] = {}
        for part, table in zip(self.parts, released):
            key = pl.col(part.by).cast(pl.String).alias("key")
            if "quantile" in table.columns:
                for level, name in ((0.5, "median"), (0.9, "p90")):
                    metric = f"{part.metric.removesuffix('_quantiles')}_{name}"
                    rows = table.filter(pl.col("quantile") == level).select(key, *_values(metric))
                    long_rows.append(_long(part.by, metric, rows))
                    wide[part.by] = _join(wide.get(part.by), rows, metric)
            else:
                rows = table.select(key, *_values(part.metric))
                long_rows.append(_long(part.by, part.metric, rows))
                wide[part.by] = _join(wide.get(part.by), rows, part.metric)
        main = pl.concat(long_rows, how="vertical_relaxed")
        tables = {f"by_{by}": frame.rename({"key": by}) for by, frame in wide.items()}
        notes = [f"intervals at {self.spec.confidence:.0%} per value, not simultaneous: among many values about "
                 f"{1 - self.spec.confidence:.0%} of the intervals miss; counts may be negative near zero",
                 self._bounding_note()]
        return Result(main, self.loss, self.contributions, self.spec.confidence, self._mechanisms(),
                      self.spec, notes, tables=tables)


def _values(metric: str) -> list[pl.Expr]:
    return [pl.col("value").cast(pl.Float64).alias(metric),
            pl.col("ci_low").cast(pl.Float64).alias(f"{metric}_low"),
            pl.col("ci_high").cast(pl.Float64).alias(f"{metric}_high")]


def _long(by: str, metric: str, rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select(pl.lit(by).alias("by"), "key", pl.lit(metric).alias("metric"),
                       pl.col(metric).alias("value"), pl.col(f"{metric}_low").alias("ci_low"),
                       pl.col(f"{metric}_high").alias("ci_high"))


def _join(current: pl.DataFrame | None, rows: pl.DataFrame, metric: str) -> pl.DataFrame:
    return rows if current is None else current.join(rows, on="key", how="left", maintain_order="left")


def geometric_grid(upper: float, start: float = GRID_START) -> list[float]:
    """Public candidates ``0, start, start * r, ...`` up to ``upper`` (last point ``upper``)."""
    points = [0.0]
    value = start
    while value < upper:
        points.append(round(value, 4))
        value *= GRID_RATIO
    if points[-1] < upper:
        points.append(float(upper))
    return points


class PerformanceReport(Analysis):
    name = "performance_report"
    spec_model = ReportSpec

    def plan(self, spec: AnalysisSpec, metadata: DatasetMetadata, dataset_dir: Path,
             limits: EngineLimits) -> ReportPlan:
        assert isinstance(spec, ReportSpec)
        if spec.dataset is not None and spec.dataset != metadata.name:
            raise QueryError("dataset", f"this dataset is '{metadata.name}', not '{spec.dataset}'",
                             "Name the dataset you are querying, or leave 'dataset' out")
        if spec.epsilon is None:
            raise QueryError("epsilon", "give the privacy loss for the whole report", 'For example "epsilon": 1')
        events = metadata.tables.get("events")
        if events is None:
            raise QueryError("dataset", "the dataset has no 'events' table", "Use a dataset of service events")
        by = spec.by or tuple(c for c in DEFAULT_BY if c in events.columns and events.columns[c].keys)
        if not by:
            raise QueryError("by", "no grouping given and none of the usual ones exists",
                             f"Name the groupings, e.g. {list(DEFAULT_BY)}")
        if len(set(by)) != len(by):
            raise QueryError("by", "the same grouping appears twice", "List each grouping once")
        for field in ("duration", "waiting", "satisfaction"):
            column = getattr(spec, field)
            if column is not None and column not in events.columns:
                raise QueryError(field, f"unknown column '{column}'",
                                 f"Use one of {sorted(events.columns)}, or null to leave the part out")
        metrics = _metrics(spec, events)
        if not metrics:
            raise QueryError("duration", "the report has no part left", "Name at least one measured column")
        total_weight = sum(WEIGHTS[name] for name, _ in metrics)
        filters = period_filters(spec.period, spec.time)
        shares = _grouping_shares(by, events)
        # One budget for the whole report, split over its parts: epsilon, or rho on zCDP
        # datasets (where the parts then compose to the report's epsilon at the dataset's delta).
        budget = metadata.accounting.rule.budget(spec.epsilon)
        value_bound = spec.value_contributions or min(VALUE_CONTRIBUTIONS, spec.contributions or metadata.max_contributions)
        parts = []
        for index, column in enumerate(by):
            for name, extra in metrics:
                bound = spec.contributions if name == "volume" else value_bound
                share = shares[index] * WEIGHTS[name] / total_weight
                document = {"aggregate": "count", "group_by": [column], "filters": filters,
                            "epsilon": spec.epsilon * share,
                            "confidence": spec.confidence, "contributions": bound, **extra}
                try:
                    plan = plan_query(parse_spec(document), metadata, dataset_dir, limits, budget=budget * share)
                except QueryError as exc:
                    field = f"by.{index}" if exc.field.startswith("group_by") else (
                        "period" if exc.field.startswith("filters") else exc.field)
                    raise QueryError(field, exc.problem, exc.fix) from None
                parts.append(Part(column, name, plan))
        contributions = parts[0].plan.calibration.contributions
        return ReportPlan(spec, parts, contributions, value_bound)


def _grouping_shares(by: tuple[str, ...], events: Any) -> list[float]:
    """Each grouping's share of the loss: proportional to the square root of its public key count.

    A grouping with more keys has fewer rows per key, so its relative error at a given loss is
    larger; weighting by the square root of the key count balances the groupings' relative
    errors part way without starving the coarse ones. Only public key counts are used.
    """
    sizes = []
    for index, column in enumerate(by):
        name, _, bucket = column.partition(":")
        meta = events.columns.get(name)
        if meta is None:
            raise QueryError(f"by.{index}", f"unknown column '{name}'", f"Use one of {sorted(events.columns)}")
        keys = meta.keys if not bucket else None
        sizes.append(math.sqrt(len(keys)) if keys else math.sqrt(24 if bucket in ("hour", "") else 53))
    total = sum(sizes)
    return [size / total for size in sizes]


def _metrics(spec: ReportSpec, events: Any) -> list[tuple[str, dict[str, Any]]]:
    metrics: list[tuple[str, dict[str, Any]]] = [("volume", {})]
    for name, column in (("duration", spec.duration), ("waiting", spec.waiting)):
        if column is None:
            continue
        bounds = events.columns[column].bounds
        if bounds is None or events.columns[column].type not in ("int", "float"):
            raise QueryError(name, f"'{column}' needs to be numeric with declared bounds",
                             f"Name another column, or null to leave the {name} out")
        upper = float(bounds[1])
        if float(bounds[0]) != 0 or not math.isfinite(upper):
            grid: Any = None  # the kind's default grid over the declared bounds
        else:
            grid = geometric_grid(upper)
        metrics.append((f"{name}_mean", {"aggregate": "mean", "column": column}))
        quantiles: dict[str, Any] = {"aggregate": "quantiles", "column": column, "quantiles": [0.5, 0.9]}
        if grid is not None:
            quantiles["candidates"] = grid
        metrics.append((f"{name}_quantiles", quantiles))
    if spec.satisfaction is not None:
        metrics.append(("satisfaction_mean", {"aggregate": "mean", "column": spec.satisfaction}))
    return metrics


register(PerformanceReport())
