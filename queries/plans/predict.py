"""Each part's predicted accuracy, in the terms of its target, computed from its group's mechanisms only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from civicdp.privacy.bounding import alpha_fraction
from civicdp.queries.kinds import KINDS
from civicdp.queries.plans import sharing, targets

if TYPE_CHECKING:  # the planner imports this module
    from civicdp.queries.plans.planner import Group, PartPlan


def predicted(part: PartPlan, group: Group) -> dict[str, Any]:
    """What the part's answer will state: half-widths (or rows of rank) at its confidence, and whether its target holds."""
    ctx, target, calibration = part.context, part.part.accuracy, group.plan.calibration
    confidence = ctx.spec.confidence
    if part.rollup is not None:
        half = sharing.rollup_half_width(calibration.mechanisms["counts"], part.rollup.widest, ctx.alpha)
        out: dict[str, Any] = {"half_width": half, "unit": "rows", "confidence": confidence,
                               "derived_from": group.parts[0],
                               "note": f"the sum of the released {part.rollup.fine_column} counts under each "
                                       f"{part.rollup.coarse_column} of the public catalogue: post-processing, free"}
    elif ctx.spec.aggregate == "mean" and (target is not None and target.min_rows is not None):
        half = targets.mean_half_width(group.plan.context, calibration, target.min_rows)
        out = {"half_width": half, "min_rows": target.min_rows, "unit": ctx.spec.column, "confidence": confidence,
               "note": f"for every group of at least {target.min_rows} rows, wherever its mean lies"}
    elif ctx.spec.aggregate == "quantiles":
        m = len(KINDS["quantiles"].grid(group.plan.context))  # type: ignore[attr-defined]
        alpha = (1 - confidence) * targets.SELECTION_ALPHA
        ranks = {f"{q:g}": calibration.mechanisms[f"q{q:g}"].score_error(m, alpha) / alpha_fraction(q).denominator
                 for q in ctx.spec.quantiles or ()}
        out = {"rank_half_width": ranks, "unit": "rows of rank", "confidence": confidence,
               "interval_confidence": group.plan.spec.confidence}
        if len(group.parts) > 1:
            out["shares_with"] = [p for p in group.parts if p != part.name]
    else:
        out = {**KINDS[ctx.spec.aggregate].predicted(group.plan.context, calibration), "confidence": confidence}
    if target is not None:
        out["target_met"] = _meets(out, target, part)
    return out


def _meets(out: dict[str, Any], target: Any, part: PartPlan) -> bool:
    if target.rank_half_width is not None:
        return all(v <= target.rank_half_width * (1 + 1e-9) for v in out["rank_half_width"].values())
    wanted = target.half_width if target.relative is None else targets.mean_target(part.context, target)
    return bool(out.get("half_width", float("inf")) <= wanted * (1 + 1e-9))
