"""W8 — workload plans: a fixed review workload planned within a budget (issue 18).

Usage::

    python -m bench.plans [--people 200000] [--runs 200] [--accounting pure|zcdp|both] [--data DIR]

On demo data it plans WORKLOAD (13 statistics: counts, a roll-up, means, quantiles) and prints:

- the planner's total loss against (a) an even split (every query the same loss, enough for
  the most demanding target) and (b) the smallest loss of each query found one by one with
  today's search (``accuracy`` for counts; the least epsilon whose predicted accuracy meets
  the target for means and quantiles, bisected on free estimates), summed — in the ledger's
  unit (epsilon, or rho under zCDP: what running them one by one would be charged) and as
  epsilon;
- every target's met rate over ``--runs`` releases with noise on (each group's exact
  aggregates read once, then released ``runs`` times by the kinds' own release code);
- at a fixed total loss (half the planner's), the worst target's achieved / wanted ratio of
  the planner (every target loosened by one factor) and of the even split.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from bench.demo import demo_dataset
from civicdp.privacy.bounding import alpha_fraction
from civicdp.privacy.planning import accuracy_exponent, even_split_total, relax
from civicdp.queries.context import EngineLimits, resolve
from civicdp.queries.engine import Engine
from civicdp.queries.kinds import KINDS
from civicdp.queries.kinds.base import aligned, cell_positions
from civicdp.queries.kinds.quantiles import value_scores
from civicdp.queries.kinds.statistics import value_bounds
from civicdp.queries.metadata import load_metadata
from civicdp.queries.plans.planner import WorkloadPlan, plan_workload
from civicdp.queries.plans.run import part_table
from civicdp.queries.plans.targets import mean_half_width
from civicdp.queries.polars_backend import PolarsBackend

LIMITS = EngineLimits(max_epsilon=1000.0)


def _count(name: str, group_by: list[str], half_width: float) -> dict[str, Any]:
    return {"name": name, "aggregate": "count", "group_by": group_by, "accuracy": {"half_width": half_width}}


def _quantile(name: str, column: str, level: float, by: str, rank: float, step: float) -> dict[str, Any]:
    # A grid of a few hundred candidates: every release noises one tree of counts per group over it.
    top = {"waiting_minutes": 240, "duration_hours": 720}[column]
    return {"name": name, "aggregate": "quantiles", "column": column, "quantiles": [level], "group_by": [by],
            "candidates": {"start": 0, "stop": top, "step": step}, "accuracy": {"rank_half_width": rank}}


#: The review workload of docs/benchmarks.md (W8): 13 statistics with their targets (95% confidence).
WORKLOAD: dict[str, Any] = {"dataset": "civic-demo", "contributions": 10, "parts": [
    _count("volume_by_service", ["service_id"], 100),
    _count("volume_by_department", ["department"], 400),  # a roll-up of the service counts
    _count("volume_by_channel", ["channel"], 100),
    _count("volume_by_centre", ["centre"], 100),
    _count("volume_by_channel_hour", ["channel", "request_time:hour"], 100),
    _count("volume_by_month", ["request_time:month"], 100),
    {"name": "mean_duration_by_department", "aggregate": "mean", "column": "duration_hours",
     "group_by": ["department"], "accuracy": {"half_width": 10, "min_rows": 5000}},
    {"name": "mean_wait_by_channel", "aggregate": "mean", "column": "waiting_minutes",
     "group_by": ["channel"], "accuracy": {"half_width": 2, "min_rows": 20000}},
    _quantile("median_wait_by_channel", "waiting_minutes", 0.5, "channel", 300, 1),
    _quantile("p90_wait_by_channel", "waiting_minutes", 0.9, "channel", 300, 1),
    _quantile("median_duration_by_department", "duration_hours", 0.5, "department", 300, 8),
    _quantile("p90_duration_by_department", "duration_hours", 0.9, "department", 300, 8),
    _count("volume_by_satisfaction", ["satisfaction"], 100),
]}


# -- (b): each query alone, with today's search ---------------------------------------------------


def _query(part: dict[str, Any], **changes: Any) -> dict[str, Any]:
    query = {k: v for k, v in part.items() if k not in ("name", "accuracy")}
    return {**query, "dataset": "civic-demo", "contributions": WORKLOAD["contributions"], **changes}


def _meets_alone(engine: Engine, part: dict[str, Any], epsilon: float, md: Any, data: Path) -> bool:
    plan = engine.plan(_query(part, epsilon=epsilon), md, data)
    target = part["accuracy"]
    if part["aggregate"] == "mean":
        return mean_half_width(plan.context, plan.calibration, target["min_rows"]) <= target["half_width"]
    predicted = plan.describe().accuracy
    return all(v <= target["rank_half_width"] for v in predicted["rank_error"].values())


def alone(engine: Engine, part: dict[str, Any], md: Any, data: Path) -> float:
    """The least loss (dataset's unit) of the part asked on its own with today's engine."""
    accounting = md.accounting.rule
    if part["aggregate"] == "count":
        plan = engine.plan(_query(part, accuracy=part["accuracy"]["half_width"]), md, data)
        return accounting.amount(plan.loss)
    low, high = 1e-3, 100.0  # bisect epsilon on free estimates (geometrically: 24 steps are within 0.0001%)
    for _ in range(24):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if _meets_alone(engine, part, middle, md, data) else (middle, high)
    return accounting.amount(engine.plan(_query(part, epsilon=high), md, data).loss)


# -- met rates over releases ---------------------------------------------------------------------------


def _truth(plan: WorkloadPlan, backend: PolarsBackend) -> dict[int, pl.DataFrame]:
    return {i: backend.aggregate(g.plan.request()) for i, g in enumerate(plan.groups)}


def _met(part: Any, group: Any, exact: pl.DataFrame, table: pl.DataFrame, truth_tables: dict) -> tuple[int, int]:
    """(cells meeting the target, cells judged) of one release of one part."""
    ctx, target = group.plan.context, part.part.accuracy
    if part.rollup is not None:
        fine = aligned(ctx, exact, ["rows"])
        true = dict(zip(fine[part.rollup.fine_column].to_list(), fine["rows"].to_list()))
        sums = {k: sum(true[m] for m in members) for k, members in part.rollup.members.items()}
        errors = [abs(v - sums[k]) for k, v in zip(table[part.rollup.coarse_column].to_list(), table["value"].to_list())]
        return sum(e <= target.half_width for e in errors), len(errors)
    if ctx.spec.aggregate == "count":
        true = aligned(ctx, exact, ["rows"])["rows"].to_numpy()
        errors = np.abs(table["value"].to_numpy() - true)
        return int((errors <= target.half_width).sum()), len(errors)
    if ctx.spec.aggregate == "mean":
        lo, hi = value_bounds(ctx)
        frame = aligned(ctx, exact, ["rows", "total"])
        rows, total = frame["rows"].to_numpy(), frame["total"].to_numpy()
        keep = rows >= target.min_rows
        true = (lo + hi) / 2 + total * ctx.column.value_resolution / np.maximum(rows, 1)
        values = np.asarray(table["value"].to_list(), dtype=float)
        return int((np.abs(values - true)[keep] <= target.half_width).sum()), int(keep.sum())
    grid = np.asarray(KINDS["quantiles"].grid(ctx))
    positions = cell_positions(ctx, exact, 2 * len(grid) + 1)
    met = judged = 0
    # The part's table: its own levels (in the group's order) for every cell, cell after cell.
    levels = [q for q in ctx.spec.quantiles or () if q in (part.context.spec.quantiles or ())]
    cells = [c for c in range(ctx.n_cells) for _ in levels]
    for cell, level, value in zip(cells, table["quantile"].to_list(), table["value"].to_list(), strict=True):
        if positions[cell].sum() == 0:
            continue
        score = value_scores(positions[cell], level)[int(np.searchsorted(grid, value))]
        met += score / alpha_fraction(level).denominator <= target.rank_half_width
        judged += 1
    return met, judged


def met_rates(plan: WorkloadPlan, runs: int) -> dict[str, float]:
    backend = PolarsBackend()
    exact = _truth(plan, backend)
    counts = {p.name: [0, 0] for p in plan.parts}
    for _ in range(runs):
        tables = {i: g.plan.kind.release(g.plan.context, g.plan.calibration, exact[i]) for i, g in enumerate(plan.groups)}
        for part in plan.parts:
            group = plan.groups[part.group]
            met, judged = _met(part, group, exact[part.group], part_table(part, group, tables[part.group]), exact)
            counts[part.name][0] += met
            counts[part.name][1] += judged
    return {name: (m / j if j else float("nan")) for name, (m, j) in counts.items()}


# -- the benchmark -------------------------------------------------------------------------------------


def with_accounting(data: Path, mode: str) -> Path:
    """The demo folder, or a copy of its metadata declaring zCDP (the data files linked, not copied)."""
    if mode == "pure":
        return data
    target = data.parent / f"{data.name}-zcdp"
    target.mkdir(exist_ok=True)
    for item in data.iterdir():
        if item.name != "metadata.json" and not (target / item.name).exists():
            (target / item.name).symlink_to(item.resolve())
    metadata = json.loads((data / "metadata.json").read_text())
    metadata["accounting"] = {"mode": "zcdp", "delta": 1e-7}
    (target / "metadata.json").write_text(json.dumps(metadata))
    return target


def bench(data: Path, runs: int) -> dict[str, Any]:
    md, engine = load_metadata(data), Engine(limits=LIMITS)
    accounting = md.accounting.rule
    p = accuracy_exponent(accounting.zcdp)
    started = time.perf_counter()
    plan = plan_workload(WORKLOAD, md, data, LIMITS)
    seconds = time.perf_counter() - started
    planned = accounting.amount(plan.loss)
    separately = [alone(engine, part, md, data) for part in WORKLOAD["parts"]]
    even = even_split_total(separately)
    half = planned / 2
    share = half / len(separately)
    out = {"accounting": accounting.mode, "statistics": len(WORKLOAD["parts"]), "groups": len(plan.groups),
           "planning_seconds": seconds, "unit": accounting.unit,
           "planner": planned, "planner_epsilon": float(plan.loss.epsilon),
           "separately_summed": sum(separately), "even_split": even,
           "separately_epsilon_summed": sum(float(accounting.loss_of(b).epsilon) for b in separately),
           "saving_vs_separately": 1 - planned / sum(separately), "saving_vs_even": 1 - planned / even,
           "fixed_total": half,
           "worst_ratio_planner_at_fixed": relax(plan.amounts(), half, p).uniform_factor,
           "worst_ratio_even_at_fixed": max((b / share) ** p for b in separately),
           "met": met_rates(plan, runs), "runs": runs}
    return out


def show(result: dict[str, Any]) -> None:
    unit = result["unit"]
    print(f"\n== accounting {result['accounting']}: {result['statistics']} statistics in {result['groups']} queries "
          f"(planned in {result['planning_seconds']:.2f} s)")
    print(f"planner total               {result['planner']:.6g} {unit} (epsilon {result['planner_epsilon']:.4g})")
    print(f"(b) one by one, summed      {result['separately_summed']:.6g} {unit}  -> planner "
          f"{100 * result['saving_vs_separately']:.1f}% less   (as epsilons summed: "
          f"{result['separately_epsilon_summed']:.4g})")
    print(f"(a) even split              {result['even_split']:.6g} {unit}  -> planner {100 * result['saving_vs_even']:.1f}% less")
    print(f"at a fixed total of {result['fixed_total']:.4g} {unit}: worst achieved/target half-width "
          f"planner {result['worst_ratio_planner_at_fixed']:.3f}, even split {result['worst_ratio_even_at_fixed']:.3f}")
    print(f"targets met over {result['runs']} releases (share of cells within target):")
    for name, rate in result["met"].items():
        print(f"  {name:32s} {100 * rate:6.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--accounting", choices=("pure", "zcdp", "both"), default="both")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    data = demo_dataset("w8", args.people, args.seed, args.data)
    modes = ("pure", "zcdp") if args.accounting == "both" else (args.accounting,)
    for mode in modes:
        started = time.perf_counter()
        show(bench(with_accounting(data, mode), args.runs))
        print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
