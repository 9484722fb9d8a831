"""A planned workload for people: each part's loss and accuracy, the total, and how it fits what is left.

``describe`` is free and reads no data. ``fit`` compares what the parts still to be paid for
need with the smallest remaining budget of the caller's scopes and, where it does not fit,
names the cheapest relaxations (:func:`civicdp.privacy.planning.relax`): every target
loosened by one factor (the best uniform accuracy reachable), or one part's alone.
"""

from __future__ import annotations

from typing import Any

from civicdp.privacy.loss import compose
from civicdp.privacy.planning import accuracy_exponent, relax
from civicdp.queries.plans.planner import WorkloadPlan


def describe(plan: WorkloadPlan, cached: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Parts, groups and the total; ``cached`` groups (stored releases) are answered free."""
    accounting = plan.accounting
    groups = []
    for i, group in enumerate(plan.groups):
        groups.append({"parts": list(group.parts), "query": group.plan.spec.model_dump(mode="json"),
                       "loss": group.loss.as_dict(), "mechanisms": group.plan.calibration.describe(),
                       "cached": i in cached})
    parts = []
    for part in plan.parts:
        group = plan.groups[part.group]
        derived = part.rollup is not None
        parts.append({"name": part.name, "aggregate": part.context.spec.aggregate,
                      "target": part.part.accuracy.model_dump() if part.part.accuracy else None,
                      "weight": part.part.weight, "group": part.group,
                      "loss": None if derived else group.loss.as_dict(),
                      "derived_from": group.parts[0] if derived else None,
                      "cached": part.group in cached, "predicted": part.predicted})
    fresh = [g.loss for i, g in enumerate(plan.groups) if i not in cached]
    total = compose(g.loss for g in plan.groups)
    to_pay = compose(fresh)
    return {"dataset": plan.metadata.name, "dataset_version": plan.metadata.version,
            "accounting": accounting.as_dict(), "contributions": plan.spec.contributions or plan.metadata.max_contributions,
            "parts": parts, "groups": groups, "total": total.as_dict(),
            "to_charge": to_pay.as_dict() if fresh else {"epsilon": 0.0, "delta": 0.0},
            "to_charge_amount": accounting.charge_of(to_pay) if fresh else 0,
            "unit": accounting.unit}


def fit(plan: WorkloadPlan, available: float, cached: frozenset[int] = frozenset(),
        total_epsilon: float | None = None) -> dict[str, Any]:
    """Whether the groups still to pay for fit ``available`` (the dataset's unit) and, if not, what to loosen."""
    accounting = plan.accounting
    indices = [i for i in range(len(plan.groups)) if i not in cached]
    amounts = [plan.amounts()[i] for i in indices]
    limit = available if total_epsilon is None else min(available, accounting.budget(total_epsilon))
    p = accuracy_exponent(accounting.zcdp)
    relaxation = relax(amounts, limit, p)
    out: dict[str, Any] = {"fits": relaxation.fits, "required": relaxation.required, "available": available,
                           "unit": accounting.unit}
    if total_epsilon is not None:
        out["total_limit"] = accounting.budget(total_epsilon)
    if relaxation.fits:
        return out
    factor = relaxation.uniform_factor
    out["uniform_factor"] = factor
    out["best_reachable"] = {part.name: _scaled(part.part.accuracy, factor) for part in plan.parts
                             if part.part.accuracy is not None and part.rollup is None and part.group in indices}
    out["loosen_one"] = [{"parts": list(plan.groups[indices[i]].parts), "factor": f} for i, f in relaxation.single]
    out["note"] = ("every target's half-width times uniform_factor fits what is left (weighted parts lose accuracy by "
                   "the same factor); or loosen one group's targets alone by its factor (cheapest first)")
    return out


def _scaled(target: Any, factor: float) -> dict[str, Any]:
    out = target.model_dump(exclude_none=True)
    for field in ("half_width", "relative", "rank_half_width"):
        if field in out:
            out[field] = out[field] * factor
    return out
