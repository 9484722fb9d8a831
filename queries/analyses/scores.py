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
``L * ceil(max expected / resolution)`` (public numbers). The loss is split between them
in the ratio ``(sensitivity of O / sensitivity of E) ** (2/3)``, which minimises the noise
of ``O - E`` (the score test at score 1) for the total loss; durations bounded by 720 h
against targets of a few hours give ``O`` most of it (discrete Laplace on integers).

Intervals are simultaneous over departments: each department's score interval inverts a
test of every candidate score ``r`` (:mod:`civicdp.queries.analyses.ratio_intervals`; at the true
score ``O - r * E`` is pure noise with a known bound) at ``alpha / departments``
(Bonferroni), so with probability at least ``confidence`` every department's score lies in
its interval. The **rank range** is post-processing of those intervals: a department ranks
after every department whose interval lies wholly below its own and before every one
wholly above, so when all intervals hold, every true rank (1 = lowest score, i.e. fastest
against expectation) lies in its range at once. Scores, intervals and ranks describe the
**bounded** data: at most ``L`` rows per person (the rest dropped), durations clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from civicdp.privacy.loss import PrivacyLoss, compose
from civicdp.privacy.accounting import Additive
from civicdp.queries.analyses.base import Analysis, AnalysisPlan, AnalysisSpec, register
from civicdp.queries.analyses.ratio_intervals import inverted_intervals, is_gaussian, ratio_grid, segment_margins
from civicdp.queries.analyses.service_common import Period, bounded, catalogue, period_filters, resolve_rows
from civicdp.queries.backend import Backend
from civicdp.queries.context import EngineLimits, QueryContext, key_texts, sum_units
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.results import Estimate, Result


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
    observed_mechanism: Additive
    expected_mechanism: Additive

    @property
    def loss(self) -> PrivacyLoss:
        return compose([self.observed_mechanism.loss, self.expected_mechanism.loss])

    def columns(self) -> set[str]:
        return {self.spec.group, self.spec.service, self.spec.duration, *(f.column for f in self.rows.filters)}

    @property
    def alpha(self) -> float:
        """Error level of each department's interval: the family's alpha over all public groups."""
        return (1 - self.spec.confidence) / len(self.groups)

    @cached_property
    def margins(self) -> np.ndarray:
        """Noise bound of the score test on each segment of the ratio grid, in units (public numbers)."""
        _, w1, w2 = ratio_grid()
        return segment_margins(w1, w2, self.observed_mechanism.scale, self.expected_mechanism.scale, self.alpha,
                               is_gaussian(self.observed_mechanism))

    def _mechanisms(self) -> list[dict[str, Any]]:
        return [{"role": role, "mechanism": m.name, "scale": m.scale, "sensitivity": m.sensitivity,
                 "epsilon": float(m.loss.epsilon)}
                for role, m in (("observed hours", self.observed_mechanism),
                                ("expected hours", self.expected_mechanism))]

    def _notes(self) -> list[str]:
        spec = self.spec
        return [f"score = observed / expected duration ({spec.expected}-based expectation); rank 1 = lowest score; "
                f"intervals and rank ranges hold for all {len(self.groups)} groups at once with "
                f"{spec.confidence:.0%} confidence (each group at error level {1 - spec.confidence:g} / "
                f"{len(self.groups)})",
                f"contribution bound: at most {_rows(self.rows.contributions)} per person (each person's first rows "
                f"in a fixed random order), durations clipped to [0, {self.upper:g}] hours; rows beyond the bound "
                "are dropped, and scores, intervals and rank ranges describe the kept, clipped rows only, not "
                "all the data"]

    def describe(self) -> Estimate:
        ratio, _, _ = ratio_grid()
        at_one = int(np.searchsorted(ratio, 1.0)) - 1  # the segment holding score 1
        # At score 1 the test reads |O - E| <= margin / cos(pi / 4); a department expected to take
        # E hours then gets about 1 +- margin_hours / E.
        margin_hours = float(self.margins[at_one]) * math.sqrt(2) * self.resolution
        return Estimate(self.loss, self.rows.contributions or 0, self.spec.confidence, self._mechanisms(), {
            "margin_hours": margin_hours, "unit": "score", "groups": len(self.groups), "simultaneous": True,
            "group_alpha": self.alpha,
            "note": "score = observed / expected; near 1 a group's interval is about score +- margin_hours / "
                    "(its expected hours), holding for all groups at once; rank ranges follow from the intervals"},
            self._notes())

    def execute(self, backend: Backend) -> Result:
        return self.release(self.exact_totals(backend))

    def exact_totals(self, backend: Backend) -> pl.DataFrame:
        """``[group, observed, expected]``: exact bounded totals in units, one row per public group (reads data)."""
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
        return pl.DataFrame({spec.group: keys}).join(sums, on=spec.group, how="left").fill_null(0)

    def release(self, totals: pl.DataFrame) -> Result:
        """The private answer from the exact totals: noise, then post-processing only."""
        spec = self.spec
        observed = np.asarray(self.observed_mechanism.release(totals["observed"].to_list()), float)
        expected = np.asarray(self.expected_mechanism.release(totals["expected"].to_list()), float)
        table = score_table(totals[spec.group].to_list(), observed, expected, self.margins, spec.group,
                            self.resolution)
        return Result(table, self.loss, self.rows.contributions or 0, spec.confidence, self._mechanisms(),
                      spec, self._notes())


def _rows(bound: int | None) -> str:
    return f"{bound} row" if bound == 1 else f"{bound} rows"


def rank_ranges(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (1 = lowest) each group can have when every true value lies in its interval."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    certainly_below = (high[None, :] < low[:, None]).sum(axis=1)  # [d, e]: e wholly below d
    possibly_below = (low[None, :] < high[:, None]).sum(axis=1) - (low < high)  # minus d itself
    return 1 + certainly_below, 1 + possibly_below


def score_table(keys: list[str], observed: np.ndarray, expected: np.ndarray, margins: np.ndarray,
                group: str, resolution: float) -> pl.DataFrame:
    """Scores, simultaneous intervals and rank ranges from the released totals in units (post-processing)."""
    ratio, w1, w2 = ratio_grid()
    first, last = inverted_intervals(observed, expected, w1, w2, margins)
    low, high = ratio[first], ratio[last]
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.where(expected > 0, np.clip(np.maximum(observed, 0.0) / expected, low, high), np.nan)
    rank_low, rank_high = rank_ranges(low, high)
    ordered = np.where(np.isnan(point), math.inf, point)
    rank = 1 + (ordered[None, :] < ordered[:, None]).sum(axis=1)
    table = pl.DataFrame({
        group: keys, "observed_hours": observed * resolution, "expected_hours": expected * resolution,
        "score": pl.Series(point, dtype=pl.Float64, nan_to_null=True), "ci_low": low,
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
        top = float(expected["__expected"].max())  # type: ignore[arg-type]
        observed_units = contributions * sum_units(spec.duration, 0, hi, resolution)
        expected_units = contributions * sum_units(spec.duration, 0, top, resolution)
        accounting = metadata.accounting.rule  # the budget is epsilon, or rho on zCDP datasets
        observed_epsilon, expected_epsilon = split_loss(accounting.budget(spec.epsilon), observed_units,
                                                        expected_units)
        observed_mechanism = accounting.additive(observed_units, observed_epsilon)
        expected_mechanism = accounting.additive(expected_units, expected_epsilon)
        return ScoresPlan(spec, ctx, tuple(group.keys), expected, hi, resolution,  # type: ignore[arg-type]
                          observed_mechanism, expected_mechanism)


def split_loss(epsilon: float, observed_sensitivity: int, expected_sensitivity: int) -> tuple[float, float]:
    """Losses of ``O`` and ``E`` summing exactly to ``epsilon``, from the public sensitivities.

    The noise of ``O - E`` has variance ``2 * ((dO / eO) ** 2 + (dE / eE) ** 2)``, least for a
    given ``eO + eE`` when each loss is proportional to its sensitivity to the power 2/3.
    """
    weight = (max(observed_sensitivity, 1) / max(expected_sensitivity, 1)) ** (2 / 3)
    observed = epsilon * weight / (1 + weight)
    if weight < 1:  # keep the larger share computed, the smaller one its exact complement
        expected = epsilon / (1 + weight)
        return epsilon - expected, expected
    return observed, epsilon - observed


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
