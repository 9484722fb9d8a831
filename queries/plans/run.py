"""Answers of a planned workload: each group's release, and each part's table read off it.

A group is run like any query plan (``Plan.execute``: exact bounded aggregates, then the
group's noise); the caller charges first. A part's table is its group's table (quantile
parts: their own levels' rows) or, for a roll-up, the sum of its source's cells
(post-processing of the released table: no data read, no noise drawn).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from civicdp.queries.backend import Backend
from civicdp.queries.plans.planner import Group, PartPlan, WorkloadPlan
from civicdp.queries.plans.sharing import release_rollup
from civicdp.queries.results import Result


def execute_group(group: Group, backend: Backend) -> Result:
    """The private answer of one group (its charge is the caller's, made before this)."""
    return group.plan.execute(backend)


def part_table(part: PartPlan, group: Group, table: pl.DataFrame) -> pl.DataFrame:
    """The part's answer from its group's released ``table``."""
    if part.rollup is not None:
        return release_rollup(table, part.rollup, group.plan.calibration.mechanisms["counts"], part.context.alpha)
    if part.context.spec.aggregate == "quantiles" and "quantile" in table.columns:
        return table.filter(pl.col("quantile").is_in(list(part.context.spec.quantiles or ())))
    return table


def table_of(body: dict[str, Any]) -> pl.DataFrame:
    """A stored release body's main table as a DataFrame."""
    return pl.DataFrame(body["rows"], schema=body["columns"], orient="row", strict=False) if body["rows"] \
        else pl.DataFrame(schema=body["columns"])


def answers(plan: WorkloadPlan, tables: dict[int, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """Every part's table, from its group's table (``tables`` by group index)."""
    return {p.name: part_table(p, plan.groups[p.group], tables[p.group]) for p in plan.parts}
