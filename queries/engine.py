"""The engine: plan a spec (cost and accuracy, no data), then run it privately.

Request flow inside the engine: validate the spec against the metadata → calibrate
the kind's OpenDP mechanisms (the loss comes from their privacy maps) → if the
contribution bound is "auto", choose it privately with part of the loss, for the
query at hand (:mod:`civicdp.queries.auto_bound`) → ask the backend for exact bounded
aggregates → add noise and attach intervals. ``plan`` and ``estimate`` never read the
data. Charging a budget is the caller's job (the server
charges in the same transaction as the audit entry, before the answer leaves); the
``before_release`` hook lets it run after the cost is fixed and before any noise is
drawn or data read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import polars as pl

from civicdp.privacy.bounding import BOUND_SCORE_SENSITIVITY
from civicdp.privacy.loss import PrivacyLoss
from civicdp.privacy.mechanisms import NoisyMin
from civicdp.queries import auto_bound
from civicdp.queries.analyses import ANALYSES, AnalysisPlan, AnalysisSpec
from civicdp.queries.backend import AggregateRequest, Backend
from civicdp.queries.context import EngineLimits, QueryContext, resolve
from civicdp.queries.errors import DatasetUnavailable, QueryError
from civicdp.queries.kinds import KINDS, Calibration, Kind
from civicdp.queries.metadata import DatasetMetadata, load_metadata
from civicdp.queries.polars_backend import PolarsBackend
from civicdp.queries.request import parse_request
from civicdp.queries.results import Estimate, Result
from civicdp.queries.spec import QuerySpec

__all__ = ["AnalysisPlan", "Engine", "Estimate", "LocalDataset", "Plan", "Result"]


@dataclass(frozen=True)
class Plan:
    """A validated query with its mechanisms and exact cost, made without reading data."""

    context: QueryContext
    kind: Kind
    calibration: Calibration  # for the fixed bound, or the reference bound when "auto"
    selector: NoisyMin | None  # private choice of the bound, when "auto" (and it did not fall back)
    main_epsilon: float | None
    auto: auto_bound.AutoBound | None = None  # the rule for "auto", also when it fell back to the fixed bound

    @property
    def loss(self) -> PrivacyLoss:
        total = self.calibration.loss
        return total + self.selector.loss if self.selector else total

    @property
    def spec(self) -> QuerySpec:
        return self.context.spec

    def columns(self) -> set[str]:
        """Every column the query reads (what authorisation checks)."""
        ctx = self.context
        names = [ctx.spec.column, *(g.column for g in ctx.group_by), *(f.column for f in ctx.filters)]
        return {c for c in names if c}


class Engine:
    """Plans and runs private queries over one backend."""

    def __init__(self, backend: Backend | None = None, limits: EngineLimits | None = None) -> None:
        self.backend = backend or PolarsBackend()
        self.limits = limits or EngineLimits()

    def plan(self, spec: Any, metadata: DatasetMetadata, dataset_dir: Path,
             budget: float | None = None) -> Plan | AnalysisPlan:
        """Validate and calibrate ``spec``; ``budget`` (in the dataset's unit) overrides what its
        epsilon buys, for analyses that split one budget over engine parts."""
        request = parse_request(spec)
        if isinstance(request, AnalysisSpec):
            analysis_plan = ANALYSES[request.analysis].plan(request, metadata, Path(dataset_dir), self.limits)
            self._check_maximum(analysis_plan.loss)
            return analysis_plan
        spec = request
        ctx = resolve(spec, metadata, dataset_dir, self.limits)
        kind = KINDS.get(spec.aggregate)
        if kind is None:
            raise QueryError("aggregate", f"unknown aggregate '{spec.aggregate}'", f"Use one of {sorted(KINDS)}")
        kind.check(ctx)
        # The analyst's epsilon as a budget in the dataset's unit (epsilon, or rho on zCDP
        # datasets): the parts below split that budget, so on zCDP they compose by rho.
        if budget is None and spec.epsilon is not None:
            budget = ctx.accounting.budget(spec.epsilon)
        selector, main_epsilon, auto = None, budget, None
        contributions = ctx.contributions
        if contributions is None:  # "auto": part of the loss chooses L privately
            auto_budget = budget * self.limits.auto_fraction  # type: ignore[operator]
            main_epsilon = budget - auto_budget  # type: ignore[operator]
            contributions = metadata.max_contributions  # reference for estimates only
            calibration = kind.calibrate(ctx, contributions, main_epsilon)
            auto = auto_bound.plan(kind, ctx, calibration,
                                   ctx.accounting.selection(BOUND_SCORE_SENSITIVITY, auto_budget))
            selector = auto.selector
            if selector is None:  # a public decision: the choice would be too coarse to be safe
                main_epsilon = budget
                calibration = kind.calibrate(ctx, contributions, main_epsilon)
        else:
            calibration = kind.calibrate(ctx, contributions, main_epsilon)
        plan = Plan(ctx, kind, calibration, selector, main_epsilon, auto)
        self._check_maximum(plan.loss)
        return plan

    def _check_maximum(self, loss: PrivacyLoss) -> None:
        if loss.epsilon > self.limits.max_epsilon:
            raise QueryError("accuracy", f"this query would cost epsilon {float(loss.epsilon):.4g}, "
                             f"above the maximum {self.limits.max_epsilon} per query",
                             "Ask for a smaller epsilon, a wider accuracy, fewer contributions per person, "
                             "or coarser groups")

    def estimate(self, spec: Any, metadata: DatasetMetadata, dataset_dir: Path) -> Estimate:
        return self.describe(self.plan(spec, metadata, dataset_dir))

    def describe(self, plan: Plan | AnalysisPlan) -> Estimate:
        """Cost and predicted accuracy of a plan, without reading data."""
        if isinstance(plan, AnalysisPlan):
            return plan.describe()
        notes = []
        mechanisms = plan.calibration.describe()
        if plan.selector is not None:
            notes.append("contributions are chosen privately at run time; the accuracy shown is for "
                         f"the dataset's default bound of {plan.calibration.contributions} rows per person; "
                         + plan.auto.describe())  # type: ignore[union-attr]
            mechanisms.append(_selector_row(plan.selector))
        elif plan.auto is not None:
            notes.append(f"contributions 'auto' kept the dataset's bound: {plan.auto.reason}")
        return Estimate(plan.loss, "auto" if plan.selector else plan.calibration.contributions,
                        plan.spec.confidence, mechanisms, plan.kind.predicted(plan.context, plan.calibration),
                        notes)

    def run(self, spec: Any, metadata: DatasetMetadata, dataset_dir: Path,
            before_release: Callable[[Plan | AnalysisPlan], None] | None = None) -> Result:
        return self.execute(self.plan(spec, metadata, dataset_dir), before_release)

    def execute(self, plan: Plan | AnalysisPlan,
                before_release: Callable[[Plan | AnalysisPlan], None] | None = None) -> Result:
        """Read the data, add the noise, attach intervals: the private answer to a plan."""
        started = time.perf_counter()
        if before_release is not None:
            before_release(plan)  # e.g. charge the budget; raising stops here, before any noise
        if isinstance(plan, AnalysisPlan):
            try:
                result = plan.execute(self.backend)
            except QueryError:
                raise
            except Exception:
                # The library's message is not shown: it could quote values from the data.
                raise _unavailable(None) from None
            result.seconds = time.perf_counter() - started
            return result
        ctx, calibration, notes = plan.context, plan.calibration, []
        mechanisms = calibration.describe()
        if plan.selector is not None:
            bound = self._choose_bound(plan)
            calibration = plan.kind.calibrate(ctx, bound, plan.main_epsilon)
            mechanisms = calibration.describe() + [{**_selector_row(plan.selector), "chosen": bound}]
            notes.append(f"contribution bound chosen privately: {bound} rows per person; "
                         + plan.auto.describe())  # type: ignore[union-attr]
        elif plan.auto is not None:
            notes.append(f"contributions 'auto' kept the dataset's bound: {plan.auto.reason}")
        request = AggregateRequest(ctx.dataset_dir, ctx.metadata, ctx.spec.table, calibration.contributions,
                                   ctx.filters, ctx.group_by, plan.kind.measure(ctx))
        exact = self._aggregate(request)
        table = plan.kind.release(ctx, calibration, exact)
        notes.append(_bounding_note(request))
        return Result(table, plan.loss, calibration.contributions, ctx.spec.confidence, mechanisms,
                      ctx.spec, notes, time.perf_counter() - started)

    def _aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        try:
            return self.backend.aggregate(request)
        except Exception:
            # The library's message is not shown: it could quote values from the data.
            raise _unavailable(request.table) from None

    def _choose_bound(self, plan: Plan) -> int:
        """The private choice of L for this query (:mod:`civicdp.queries.auto_bound`).

        The profile counts people by their rows among the rows this query keeps: its
        filters applied and, for a nullable measured column, missing values dropped, as
        the backend does before bounding.
        """
        ctx, auto = plan.context, plan.auto
        assert auto is not None and plan.selector is not None
        try:
            profile = self.backend.contribution_profile(ctx.dataset_dir, ctx.metadata, ctx.spec.table,
                                                        auto.top + 1, ctx.filters, plan.kind.measure(ctx))
        except Exception:
            raise _unavailable(ctx.spec.table) from None
        return auto.candidates[plan.selector.release(auto.scores(profile).tolist())]


def _bounding_note(request: AggregateRequest) -> str:
    """What the interval covers: the bounded data (how many rows bounding dropped is data: not said)."""
    measure = request.measure
    clipped = (f", values clipped to [{measure.lower:g}, {measure.upper:g}]"
               if measure.column and measure.lower < measure.upper else "")
    return (f"at most {request.contributions} rows per person were kept (each person's first rows in a fixed "
            f"random order; the rest dropped before aggregating){clipped}: intervals cover the answer on "
            "these bounded data, not the bias of bounding")


def _selector_row(selector: NoisyMin) -> dict[str, Any]:
    return {"role": "contribution bound", "mechanism": selector.name, "scale": selector.scale,
            "sensitivity": selector.sensitivity, "epsilon": float(selector.loss.epsilon)}


def _unavailable(table: str | None) -> DatasetUnavailable:
    which = f"table '{table}'" if table else "the tables this analysis reads"
    return DatasetUnavailable("table", f"the data files of {which} are missing, unreadable, or "
                              "do not have the columns and types its metadata declares",
                              "Ask the data steward to check the dataset's files against metadata.json")


class LocalDataset:
    """A dataset folder (Parquet files plus metadata.json) queried in-process."""

    def __init__(self, path: Path, engine: Engine | None = None) -> None:
        self.path = Path(path)
        self.metadata = load_metadata(self.path)
        self.engine = engine or Engine()

    def estimate(self, spec: Any) -> Estimate:
        return self.engine.estimate(spec, self.metadata, self.path)

    def run(self, spec: Any) -> Result:
        return self.engine.run(spec, self.metadata, self.path)
