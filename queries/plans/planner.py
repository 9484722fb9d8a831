"""Plan a workload: the cheapest mechanisms for every part's target, shared work done once, no data read.

Steps, all from the spec and the public metadata (and the public catalogue file):

1. validate every part as the query it is, with the plan's contribution bound (one ``L``
   for all parts, so shared work is shareable and the bound is the plan's, not a part's);
2. group parts answered by one query (quantile levels of one column: :mod:`.sharing`);
3. calibrate each group for its targets (:mod:`.targets`): the least budget meeting them;
4. drop a count whose target a roll-up of a finer count in the plan already meets (free);
5. give weighted parts what the ``total`` leaves after the targets, in proportion to weight.

The result lists each part's loss (its group's), its predicted accuracy, and the total,
composed by the dataset's accounting (rho adds under zCDP, epsilon under pure DP).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from civicdp.privacy.loss import PrivacyLoss, compose
from civicdp.privacy.planning import weighted_shares
from civicdp.queries.context import EngineLimits, QueryContext, resolve
from civicdp.queries.errors import QueryError
from civicdp.queries.kinds import KINDS
from civicdp.queries.kinds.base import Calibration
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.plans import sharing, targets
from civicdp.queries.plans.predict import predicted
from civicdp.queries.plans.spec import PlanPart, PlanSpec, Target, parse_plan
from civicdp.queries.query_plan import Plan, check_maximum


@dataclass(frozen=True)
class Group:
    """One query the plan runs: its engine plan (mechanisms fixed) and the parts it answers."""

    plan: Plan
    parts: tuple[str, ...]

    @property
    def loss(self) -> PrivacyLoss:
        return self.plan.loss

    @property
    def question(self) -> str:
        """Canonical text of the question and its mechanisms: equal texts, the same release."""
        return json.dumps({"plan_part": self.plan.spec.canonical(), "contributions": self.plan.calibration.contributions,
                           "mechanisms": self.plan.calibration.describe()}, sort_keys=True, separators=(",", ":"))

    @property
    def question_hash(self) -> str:
        return hashlib.sha256(self.question.encode()).hexdigest()


@dataclass(frozen=True)
class PartPlan:
    """One part: which group answers it (or which group it is rolled up from), and its predicted accuracy."""

    part: PlanPart
    context: QueryContext
    group: int
    rollup: sharing.RollUp | None = None  # answered by summing group ``group``'s cells
    predicted: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.part.name


@dataclass(frozen=True)
class WorkloadPlan:
    """A planned workload: its groups (what runs and is charged) and its parts (what is answered)."""

    spec: PlanSpec
    metadata: DatasetMetadata
    dataset_dir: Path
    groups: tuple[Group, ...]
    parts: tuple[PartPlan, ...]

    @property
    def loss(self) -> PrivacyLoss:
        return compose(g.loss for g in self.groups)

    @property
    def accounting(self):  # noqa: ANN201 - civicdp.privacy.accounting.Accounting
        return self.metadata.accounting.rule

    def amounts(self) -> list[float]:
        """Each group's budget in the dataset's unit (epsilon, or rho)."""
        return [self.accounting.amount(g.loss) for g in self.groups]


def plan_workload(raw: Any, metadata: DatasetMetadata, dataset_dir: Path, limits: EngineLimits) -> WorkloadPlan:
    """Validate and plan a workload (see the module text); raises :class:`QueryError` naming the field."""
    spec = parse_plan(raw)
    if spec.dataset is not None and spec.dataset != metadata.name:
        raise QueryError("dataset", f"this dataset is '{metadata.name}', not '{spec.dataset}'", "Name the dataset")
    bound = spec.contributions or metadata.max_contributions
    contexts = [_context(i, part, bound, metadata, dataset_dir, limits) for i, part in enumerate(spec.parts)]
    groups: list[tuple[QueryContext, Calibration, list[int]]] = []
    for members in _target_groups(spec, contexts):
        groups.append(_calibrated(members, spec, contexts, bound, metadata, dataset_dir, limits))
    rolled = _rollups(spec, contexts, groups, metadata, dataset_dir)
    groups = [g for i, g in enumerate(groups) if i not in rolled.dropped]
    weighted = [i for i, p in enumerate(spec.parts) if p.weight is not None]
    if weighted:
        groups += _weighted(spec, contexts, weighted, groups, bound)
    return _assemble(spec, metadata, dataset_dir, contexts, groups, rolled, limits)


def _context(index: int, part: PlanPart, bound: int, metadata: DatasetMetadata, dataset_dir: Path,
             limits: EngineLimits) -> QueryContext:
    query = part.query
    if query.contributions == "auto":
        raise QueryError(f"parts.{index}.contributions", "a plan is made before any data is read, so its "
                         "contribution bound cannot be chosen from the data", "Give a whole number, or leave it out")
    if query.contributions is None:
        query = query.model_copy(update={"contributions": bound})
    if query.contributions != bound:
        raise QueryError(f"parts.{index}.contributions", "every part of a plan has the plan's contribution bound, "
                         "so their work can be shared", "Set 'contributions' on the plan, not on parts")
    if part.accuracy is not None and query.accuracy is None:
        query = query.model_copy(update={"confidence": part.accuracy.confidence})
    try:
        ctx = resolve(query, metadata, dataset_dir, limits)
        KINDS[query.aggregate].check(ctx)
        if part.accuracy is not None:
            targets.needs(ctx, part.accuracy)
    except QueryError as exc:
        raise QueryError(f"parts.{index}.{exc.field}", exc.problem, exc.fix) from None
    return ctx


def _target_groups(spec: PlanSpec, contexts: list[QueryContext]) -> list[list[int]]:
    """Indices of target parts answered together (quantile levels of one column), in part order."""
    merged: dict[str, list[int]] = {}
    groups: list[list[int]] = []
    for i, part in enumerate(spec.parts):
        if part.accuracy is None:
            continue
        key = sharing.merge_key(contexts[i].spec)
        if key is None:
            groups.append([i])
        elif key in merged:
            merged[key].append(i)
        else:
            merged[key] = [i]
            groups.append(merged[key])
    return groups


def _calibrated(members: list[int], spec: PlanSpec, contexts: list[QueryContext], bound: int,
                metadata: DatasetMetadata, dataset_dir: Path, limits: EngineLimits
                ) -> tuple[QueryContext, Calibration, list[int]]:
    first = contexts[members[0]]
    if first.spec.aggregate != "quantiles":
        return first, targets.for_target(first, bound, spec.parts[members[0]].accuracy), members  # type: ignore[arg-type]
    levels: dict[float, Target] = {}
    for i in members:
        target = spec.parts[i].accuracy
        for level in contexts[i].spec.quantiles or ():
            if level not in levels or target.rank_half_width < levels[level].rank_half_width:  # type: ignore[union-attr,operator]
                levels[level] = target  # type: ignore[assignment]
    confidence = targets.interval_confidence(max(t.confidence for t in levels.values()))
    query = first.spec.model_copy(update={"quantiles": tuple(sorted(levels)), "confidence": round(confidence, 9)})
    ctx = resolve(query, metadata, dataset_dir, limits)
    return ctx, targets.quantiles_for_targets(ctx, bound, levels), members


@dataclass(frozen=True)
class _Rolled:
    dropped: frozenset[int]  # groups answered by a roll-up instead
    sources: dict[int, tuple[int, sharing.RollUp]]  # part index -> (a part of the source group, roll-up)


def _rollups(spec: PlanSpec, contexts: list[QueryContext], groups: list[tuple[QueryContext, Calibration, list[int]]],
             metadata: DatasetMetadata, dataset_dir: Path) -> _Rolled:
    """Counts whose target the cells of a finer count in the plan already meet, summed (free)."""
    dropped: set[int] = set()
    sources: dict[int, tuple[int, sharing.RollUp]] = {}
    used: set[int] = set()
    for gi, (ctx, _, members) in enumerate(groups):
        if len(members) != 1 or ctx.spec.aggregate != "count" or gi in used:
            continue
        target = spec.parts[members[0]].accuracy
        for fi, (fine_ctx, fine_cal, fine_members) in enumerate(groups):
            if fi == gi or fi in dropped:
                continue
            rollup = sharing.rollup_of(ctx.spec, fine_ctx.spec, metadata, dataset_dir)
            if rollup is None:
                continue
            half = sharing.rollup_half_width(fine_cal.mechanisms["counts"], rollup.widest, ctx.alpha)
            if half <= target.half_width:  # type: ignore[union-attr,operator]
                dropped.add(gi)
                used.add(fi)
                sources[members[0]] = (fine_members[0], rollup)
                break
    return _Rolled(frozenset(dropped), sources)


def _weighted(spec: PlanSpec, contexts: list[QueryContext], weighted: list[int],
              groups: list[tuple[QueryContext, Calibration, list[int]]], bound: int
              ) -> list[tuple[QueryContext, Calibration, list[int]]]:
    """Weighted parts share what the total leaves after the targets, in proportion to their weights."""
    if spec.total is None:
        raise QueryError("total", "weighted parts share a total loss, and the plan gives none",
                         'Add "total": {"epsilon": 0.5}, or give those parts accuracy targets')
    accounting = contexts[0].accounting
    used = sum(accounting.amount(cal.loss) for _, cal, _ in groups)
    left = accounting.budget(spec.total.epsilon) - used
    if left <= 0:
        raise QueryError("total", f"the targets alone need {used:.6g} {accounting.unit}, the whole total of "
                         f"epsilon {spec.total.epsilon:g}", "Raise the total, loosen targets, or drop weighted parts")
    shares = weighted_shares([spec.parts[i].weight for i in weighted])  # type: ignore[misc]
    out = []
    for i, share in zip(weighted, shares):
        ctx = contexts[i]
        out.append((ctx, KINDS[ctx.spec.aggregate].calibrate(ctx, bound, left * share), [i]))
    return out


def _assemble(spec: PlanSpec, metadata: DatasetMetadata, dataset_dir: Path, contexts: list[QueryContext],
              groups: list[tuple[QueryContext, Calibration, list[int]]], rolled: _Rolled,
              limits: EngineLimits) -> WorkloadPlan:
    built: list[Group] = []
    part_group: dict[int, int] = {}  # part index -> its group's index
    for ctx, calibration, members in groups:
        loss = calibration.loss
        check_maximum(loss, limits)
        # The question as a query spec with the loss it costs (rounded up for display), not the placeholder.
        shown = float(f"{float(loss.epsilon) * (1 + 1e-9):.6g}")
        query = ctx.spec.model_copy(update={"epsilon": shown, "accuracy": None})
        plan = Plan(replace(ctx, spec=query), KINDS[ctx.spec.aggregate], calibration, None, None)
        for i in members:
            part_group[i] = len(built)
        built.append(Group(plan, tuple(spec.parts[i].name for i in members)))
    parts = []
    for i, part in enumerate(spec.parts):
        if i in rolled.sources:
            source_part, rollup = rolled.sources[i]
            pp = PartPlan(part, contexts[i], part_group[source_part], rollup)
        else:
            pp = PartPlan(part, contexts[i], part_group[i])
        parts.append(replace(pp, predicted=predicted(pp, built[pp.group])))
    return WorkloadPlan(spec, metadata, dataset_dir, tuple(built), tuple(parts))
