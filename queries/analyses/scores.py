"""Department scores: observed against expected duration, with intervals and rank ranges.

A department's score is ``O / E`` (indirect standardisation, as in hospital league
tables): ``O`` is the total duration of its cases (each clipped to the column's declared
bounds), ``E`` the total of their expected durations, where a case's expected duration
comes from the **public** catalogue: its service's target (``"expected": "target"``), or
the median target of all catalogue services of the same complexity level
(``"expected": "complexity"``, which does not let a department's lenient targets flatter
it). A score of 1.3 means cases took 30% longer than expected for that case mix.

Privacy: each kept row adds its clipped duration to one department's ``O`` and its
expected duration to the same department's ``E``; with at most ``L`` rows per person the
two vectors have L1 sensitivities ``L * ceil(upper / resolution)`` and
``L * ceil(max expected / resolution)`` (public numbers). Each gets half the loss
(discrete Laplace on integers).

Intervals are simultaneous over departments: every ``O`` and ``E`` at
``alpha / (2 * departments)`` (Bonferroni), so with probability at least ``confidence``
every department's score lies in its interval. The **rank range** is post-processing of
those intervals: a department ranks after every department whose interval lies wholly
below its own and before every one wholly above, so when all intervals hold, every true
rank (1 = lowest score, i.e. fastest against expectation) lies in its range at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from privacy import accuracy
from privacy.loss import PrivacyLoss, compose
from privacy.mechanisms import LaplaceVector
from queries.analyses.base import Analysis, AnalysisPlan, AnalysisSpec, register
from queries.analyses.service_common import Period, bounded, catalogue, period_filters, resolve_rows
from queries.backend import Backend
from queries.context import EngineLimits, QueryContext, key_texts, sum_units
from queries.errors import QueryError
from queries.metadata import DatasetMetadata
from queries.results import Estimate, Result


class ScoresSpec(AnalysisSpec):
    """``{"analysis": "department_scores", "epsilon": 0.5}``: see the module docstring."""

    analysis: Literal["department_scores"] = "department_scores"
    expected: Literal["target", "complexity"] = "target"
    group: str = "department"
    period: Period | None = None
    contributions: int | None = None
    service: str = "service_id"
    duration: str = "duration_hours"
    time: str = "request_time"


@dataclass(frozen=True)
class ScoresPlan(AnalysisPlan):
    spec: ScoresSpec  # type: ignore[misc]
    rows: QueryContext
    groups: tuple[Any, ...]
    expected: pl.DataFrame  # [service, __expected] public expected hours per service
    upper: float
    resolution: float
    observed_mechanism: LaplaceVector
    expected_mechanism: LaplaceVector

    @property
    def loss(self) -> PrivacyLoss:
        return compose([self.observed_mechanism.loss, self.expected_mechanism.loss])

    def columns(self) -> set[str]:
        return {self.spec.group, self.spec.service, self.spec.duration, *(f.column for f in self.rows.filters)}

    @property
    def alpha(self) -> float:
        return (1 - self.spec.confidence) / (2 * len(self.groups))

    def _mechanisms(self) -> list[dict[str, Any]]:
        return [{"role": role, "mechanism": m.name, "scale": m.scale, "sensitivity": m.sensitivity,
                 "epsilon": float(m.loss.epsilon)}
                for role, m in (("observed hours", self.observed_mechanism),
                                ("expected hours", self.expected_mechanism))]

    def describe(self) -> Estimate:
        return Estimate(self.loss, self.rows.contributions or 0, self.spec.confidence, self._mechanisms(), {
            "observed_half_width_hours": self.observed_mechanism.accuracy(self.alpha) * self.resolution,
            "expected_half_width_hours": self.expected_mechanism.accuracy(self.alpha) * self.resolution,
            "unit": "hours", "groups": len(self.groups), "simultaneous": True,
            "note": "score = observed / expected; its interval is (O ± observed) / (E ± expected), "
                    "holding for all groups at once; rank ranges follow from the intervals"}, [])

    def execute(self, backend: Backend) -> Result:
        spec = self.spec
        rows = bounded(backend, self.rows, not_null=(spec.duration,))
        hours = pl.col(spec.duration).cast(pl.Float64).clip(0.0, self.upper)
        units = lambda e: (e / self.resolution).round(0).cast(pl.Int64)  # noqa: E731
        # rows: [group, service, duration] -> with the public expected hours of its service
        sums = (rows.select(pl.col(spec.group).cast(pl.String), spec.service, hours.alias("__hours"))
                .join(self.expected.lazy(), on=spec.service, how="inner")
                .group_by(spec.group)
                .agg(units(pl.col("__hours")).sum().alias("observed"),
                     units(pl.col("__expected")).sum().alias("expected"))
                .collect())
        keys = key_texts(self.groups)  # as the cast above writes them (booleans: "true"/"false")
        frame = pl.DataFrame({spec.group: keys}).join(sums, on=spec.group, how="left").fill_null(0)
        observed = np.asarray(self.observed_mechanism.release(frame["observed"].to_list()), float) * self.resolution
        expected = np.asarray(self.expected_mechanism.release(frame["expected"].to_list()), float) * self.resolution
        table = score_table(keys, observed, expected,
                            self.observed_mechanism.accuracy(self.alpha) * self.resolution,
                            self.expected_mechanism.accuracy(self.alpha) * self.resolution, spec.group)
        notes = [f"score = observed / expected duration ({spec.expected}-based expectation); rank 1 = lowest "
                 f"score; intervals and rank ranges hold for all {len(keys)} groups at once "
                 f"with {spec.confidence:.0%} confidence"]
        return Result(table, self.loss, self.rows.contributions or 0, spec.confidence, self._mechanisms(),
                      spec, notes)


def rank_ranges(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (1 = lowest) each group can have when every true value lies in its interval."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    certainly_below = (high[None, :] < low[:, None]).sum(axis=1)  # [d, e]: e wholly below d
    possibly_below = (low[None, :] < high[:, None]).sum(axis=1) - (low < high)  # minus d itself
    return 1 + certainly_below, 1 + possibly_below


def score_table(keys: list[str], observed: np.ndarray, expected: np.ndarray, observed_half: float,
                expected_half: float, group: str) -> pl.DataFrame:
    """Scores, simultaneous intervals and rank ranges from the released totals (post-processing)."""
    scores, lows, highs = [], [], []
    for o, e in zip(observed, expected):
        interval = accuracy.ratio(o, observed_half, e, expected_half, 0.0, math.inf)
        scores.append(max(o, 0.0) / e if e > 0 else None)
        lows.append(interval.low)
        highs.append(interval.high)
    low, high = np.asarray(lows), np.asarray(highs)
    rank_low, rank_high = rank_ranges(low, high)
    point = np.asarray([s if s is not None else math.inf for s in scores])
    rank = 1 + (point[None, :] < point[:, None]).sum(axis=1)
    table = pl.DataFrame({
        group: keys, "observed_hours": observed, "expected_hours": expected,
        "score": pl.Series(scores, dtype=pl.Float64), "ci_low": low,
        "ci_high": pl.Series(high, dtype=pl.Float64).replace(math.inf, None),
        "rank": rank, "rank_low": rank_low, "rank_high": rank_high,
    })
    return table.sort("rank", group)


class DepartmentScores(Analysis):
    name = "department_scores"
    spec_model = ScoresSpec

    def plan(self, spec: AnalysisSpec, metadata: DatasetMetadata, dataset_dir: Path,
             limits: EngineLimits) -> ScoresPlan:
        assert isinstance(spec, ScoresSpec)
        if spec.dataset is not None and spec.dataset != metadata.name:
            raise QueryError("dataset", f"this dataset is '{metadata.name}', not '{spec.dataset}'",
                             "Name the dataset you are querying, or leave 'dataset' out")
        if spec.epsilon is None:
            raise QueryError("epsilon", "give the privacy loss to spend", 'For example "epsilon": 0.5')
        events = metadata.tables.get("events")
        if events is None:
            raise QueryError("dataset", "the dataset has no 'events' table", "Use a dataset of service events")
        for field in ("group", "service", "duration"):
            column = getattr(spec, field)
            if column not in events.columns:
                raise QueryError(field, f"unknown column '{column}'", f"Use one of {sorted(events.columns)}")
        group, duration = events.columns[spec.group], events.columns[spec.duration]
        if group.keys is None:
            raise QueryError("group", f"'{spec.group}' has no public key set",
                             "Group by a column with declared keys, e.g. 'department'")
        if events.columns[spec.service].keys is None:
            raise QueryError("service", f"'{spec.service}' has no public key set", "Name the service column")
        if duration.type not in ("int", "float") or duration.bounds is None:
            raise QueryError("duration", f"'{spec.duration}' needs to be numeric with declared bounds",
                             "Name a duration column with public bounds")
        lo, hi = (float(b) for b in duration.bounds)  # type: ignore[arg-type]
        if lo < 0:
            raise QueryError("duration", "a duration's declared bounds must not be negative",
                             "Ask the data steward to declare bounds from 0")
        ctx = resolve_rows(metadata, dataset_dir, limits, table="events",
                           filters=period_filters(spec.period, spec.time), contributions=spec.contributions)
        expected = _expected(spec, metadata, dataset_dir, events.columns[spec.service].keys, hi)
        resolution = duration.value_resolution
        contributions = ctx.contributions or 1
        half = spec.epsilon / 2
        observed_mechanism = LaplaceVector.for_epsilon(contributions * sum_units(spec.duration, 0, hi, resolution),
                                                       half)
        top = float(expected["__expected"].max())  # type: ignore[arg-type]
        expected_mechanism = LaplaceVector.for_epsilon(contributions * sum_units(spec.duration, 0, top, resolution),
                                                       half)
        return ScoresPlan(spec, ctx, tuple(group.keys), expected, hi, resolution,  # type: ignore[arg-type]
                          observed_mechanism, expected_mechanism)


def _expected(spec: ScoresSpec, metadata: DatasetMetadata, dataset_dir: Path, keys: Any,
              upper: float) -> pl.DataFrame:
    """``[service, __expected]``: public expected hours of each service (clipped like durations)."""
    need = ("target_hours", "complexity") if spec.expected == "complexity" else ("target_hours",)
    frame = catalogue(metadata, dataset_dir, spec.service, need).filter(pl.col(spec.service).is_in(list(keys)))
    if spec.expected == "complexity":
        typical = frame.group_by("complexity").agg(pl.col("target_hours").median().alias("__expected"))
        frame = frame.join(typical, on="complexity", how="left")
    else:
        frame = frame.with_columns(pl.col("target_hours").alias("__expected"))
    frame = frame.select(spec.service, pl.col("__expected").cast(pl.Float64).clip(0.0, upper)).drop_nulls()
    if frame.height == 0:
        raise QueryError("service", "no service of the catalogue has a public target", "Check the catalogue")
    return frame


register(DepartmentScores())
