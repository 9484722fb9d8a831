"""One aggregate query: its plan (cost and mechanisms, no data read) and its private run.

Validate the spec against the metadata → calibrate the kind's OpenDP mechanisms (the
loss comes from their privacy maps) → if the contribution bound is "auto", plan its
private choice with part of the loss, for the query at hand
(:mod:`civicdp.queries.auto_bound`). Running a plan asks the backend for exact bounded
aggregates, then adds noise and attaches intervals. The engine
(:mod:`civicdp.queries.engine`) and the analyses that are built from aggregate queries
(the performance report) both plan and run queries here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from civicdp.privacy.bounding import BOUND_SCORE_SENSITIVITY
from civicdp.privacy.loss import PrivacyLoss
from civicdp.privacy.mechanisms import NoisyMin
from civicdp.queries import auto_bound
from civicdp.queries.backend import AggregateRequest, Backend
from civicdp.queries.context import EngineLimits, QueryContext, resolve
from civicdp.queries.errors import QueryError, dataset_unavailable
from civicdp.queries.kinds import KINDS, Calibration, Kind
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.results import Estimate, Result
from civicdp.queries.spec import QuerySpec


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

    def request(self, contributions: int | None = None) -> AggregateRequest:
        """What the backend computes for this plan, at ``contributions`` rows per person
        (by default the calibration's: the fixed bound)."""
        ctx = self.context
        return AggregateRequest(ctx.dataset_dir, ctx.metadata, ctx.spec.table,
                                self.calibration.contributions if contributions is None else contributions,
                                ctx.filters, ctx.group_by, self.kind.measure(ctx))

    def describe(self) -> Estimate:
        """Cost and predicted accuracy, without reading data."""
        notes = []
        mechanisms = self.calibration.describe()
        if self.selector is not None:
            notes.append("contributions are chosen privately at run time; the accuracy shown is for "
                         f"the dataset's default bound of {self.calibration.contributions} rows per person; "
                         + self.auto.describe())  # type: ignore[union-attr]
            mechanisms.append(_selector_row(self.selector))
        elif self.auto is not None:
            notes.append(f"contributions 'auto' kept the dataset's bound: {self.auto.reason}")
        linked = self.context.metadata.linked_rows_note(
            self.spec.table, None if self.selector else self.calibration.contributions)
        if linked:
            notes.append(linked)
        return Estimate(self.loss, "auto" if self.selector else self.calibration.contributions,
                        self.spec.confidence, mechanisms, self.kind.predicted(self.context, self.calibration),
                        notes)

    def execute(self, backend: Backend) -> Result:
        """Read the data, add the noise, attach intervals: the private answer (charging is the caller's)."""
        started = time.perf_counter()
        ctx, calibration, notes = self.context, self.calibration, []
        mechanisms = calibration.describe()
        if self.selector is not None:
            bound = self._choose_bound(backend)
            calibration = self.kind.calibrate(ctx, bound, self.main_epsilon)
            mechanisms = calibration.describe() + [{**_selector_row(self.selector), "chosen": bound}]
            notes.append(f"contribution bound chosen privately: {bound} rows per person; "
                         + self.auto.describe())  # type: ignore[union-attr]
        elif self.auto is not None:
            notes.append(f"contributions 'auto' kept the dataset's bound: {self.auto.reason}")
        request = self.request(calibration.contributions)
        exact = _aggregate(backend, request)
        table = self.kind.release(ctx, calibration, exact)
        notes.append(_bounding_note(request))
        linked = ctx.metadata.linked_rows_note(ctx.spec.table, calibration.contributions)
        if linked:
            notes.append(linked)
        return Result(table, self.loss, calibration.contributions, ctx.spec.confidence, mechanisms,
                      ctx.spec, notes, time.perf_counter() - started)

    def _choose_bound(self, backend: Backend) -> int:
        """The private choice of L for this query (:mod:`civicdp.queries.auto_bound`).

        The profile counts people by their rows among the rows this query keeps: its
        filters applied and, for a nullable measured column, missing values dropped, as
        the backend does before bounding.
        """
        ctx, auto = self.context, self.auto
        assert auto is not None and self.selector is not None
        try:
            profile = backend.contribution_profile(ctx.dataset_dir, ctx.metadata, ctx.spec.table,
                                                   auto.top + 1, ctx.filters, self.kind.measure(ctx))
        except Exception:
            raise dataset_unavailable(ctx.spec.table) from None
        return auto.candidates[self.selector.release(auto.scores(profile).tolist())]


def plan_query(spec: QuerySpec, metadata: DatasetMetadata, dataset_dir: Path, limits: EngineLimits,
               budget: float | None = None) -> Plan:
    """Validate and calibrate ``spec``; ``budget`` (in the dataset's unit) overrides what its
    epsilon buys, for analyses that split one budget over several queries."""
    ctx = resolve(spec, metadata, dataset_dir, limits)
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
        auto_budget = budget * limits.auto_fraction  # type: ignore[operator]
        main_epsilon = budget - auto_budget  # type: ignore[operator]
        contributions = metadata.row_limit(spec.table)  # reference for estimates only
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
    check_maximum(plan.loss, limits)
    return plan


def check_maximum(loss: PrivacyLoss, limits: EngineLimits) -> None:
    """Refuse a plan that would cost more than the engine's maximum per query."""
    if loss.epsilon > limits.max_epsilon:
        raise QueryError("accuracy", f"this query would cost epsilon {float(loss.epsilon):.4g}, "
                         f"above the maximum {limits.max_epsilon} per query",
                         "Ask for a smaller epsilon, a wider accuracy, fewer contributions per person, "
                         "or coarser groups")


def _aggregate(backend: Backend, request: AggregateRequest) -> pl.DataFrame:
    try:
        return backend.aggregate(request)
    except Exception:
        # The library's message is not shown: it could quote values from the data.
        raise dataset_unavailable(request.table) from None


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
