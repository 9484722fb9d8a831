"""The workload planner: data-independent plans, shared work, optimal splits, roll-ups and met targets.

The dataset is the demo generator's (3,000 people, seed 3) in a temporary folder, with its
public catalogue (services under departments), so roll-ups can be planned.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from civicdp.privacy.mechanisms import LaplaceVector
from civicdp.privacy.planning import even_split_total, optimal_shares, relax
from civicdp.queries.context import EngineLimits
from civicdp.queries.engine import Engine
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import load_metadata
from civicdp.queries.plans import report
from civicdp.queries.plans.planner import plan_workload
from civicdp.queries.plans.sharing import RollUp, release_rollup
from civicdp.queries.plans.targets import mean_half_width
from civicdp.synthetic.demo_data import generate

LIMITS = EngineLimits(max_epsilon=100.0)
PEOPLE = 3000


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plans") / "demo"
    generate(PEOPLE, folder, seed=3)
    return folder


def count(name: str, by: list[str], half_width: float) -> dict[str, Any]:
    return {"name": name, "aggregate": "count", "group_by": by, "accuracy": {"half_width": half_width}}


def quantile(name: str, level: float, rank: float) -> dict[str, Any]:
    return {"name": name, "aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [level],
            "group_by": ["channel"], "candidates": {"start": 0, "stop": 240, "step": 2},
            "accuracy": {"rank_half_width": rank}}


MEAN = {"name": "duration", "aggregate": "mean", "column": "duration_hours", "group_by": ["department"],
        "accuracy": {"half_width": 40, "min_rows": 200}}
WORKLOAD = {"dataset": "civic-demo", "contributions": 5, "parts": [
    count("by_service", ["service_id"], 30), count("by_department", ["department"], 120), MEAN,
    quantile("median", 0.5, 80), quantile("p90", 0.9, 80), count("by_channel", ["channel"], 20)]}


def plan(folder: Path, workload: dict[str, Any] = WORKLOAD) -> Any:
    return plan_workload(workload, load_metadata(folder), folder, LIMITS)


def test_a_plan_does_not_depend_on_the_data(demo: Path, tmp_path: Path) -> None:
    before = report.describe(plan(demo))
    public = tmp_path / "public"
    shutil.copytree(demo, public)
    for private in ("events.parquet", "steps.parquet"):  # the data; metadata and catalogue are public
        (public / private).unlink()
    assert report.describe(plan(public)) == {**before}
    other = tmp_path / "other"  # other people entirely (same public metadata and catalogue)
    generate(500, other, seed=11)
    for name in ("metadata.json", "services.parquet"):
        shutil.copy(demo / name, other / name)
    assert report.describe(plan(other)) == before


def test_shared_work_is_done_once(demo: Path) -> None:
    planned = plan(demo)
    groups = [g.parts for g in planned.groups]
    assert ("median", "p90") in groups  # one tree of counts for both levels
    assert not any("by_department" in g for g in groups)  # a roll-up of the service counts: free
    department = next(p for p in planned.parts if p.name == "by_department")
    assert department.rollup is not None and department.predicted["half_width"] <= 120
    assert department.predicted["derived_from"] == "by_service"
    alone = plan(demo, {**WORKLOAD, "parts": [quantile("median", 0.5, 80)]}).loss.epsilon \
        + plan(demo, {**WORKLOAD, "parts": [quantile("p90", 0.9, 80)]}).loss.epsilon
    merged = next(g for g in planned.groups if g.parts == ("median", "p90")).loss.epsilon
    assert merged < alone * 0.9  # the tree is paid for once, at the more demanding level's budget


def test_a_count_too_tight_for_a_roll_up_is_asked_itself(demo: Path) -> None:
    tight = {**WORKLOAD, "parts": [count("by_service", ["service_id"], 30), count("by_department", ["department"], 40)]}
    planned = plan(demo, tight)
    assert [g.parts for g in planned.groups] == [("by_service",), ("by_department",)]
    assert all(p.rollup is None and p.predicted["target_met"] for p in planned.parts)


def test_a_mean_costs_no_more_than_the_least_even_split_meeting_its_target(demo: Path) -> None:
    planned = plan(demo, {**WORKLOAD, "parts": [MEAN]})
    group = planned.groups[0]
    assert mean_half_width(group.plan.context, group.plan.calibration, 200) <= 40
    engine, metadata = Engine(limits=LIMITS), load_metadata(demo)
    spec = {k: v for k, v in MEAN.items() if k not in ("name", "accuracy")}
    low, high = 0.01, 100.0  # today's mean (loss halved between sum and count): its least loss for the target
    for _ in range(40):
        middle = (low * high) ** 0.5
        even = engine.plan({**spec, "contributions": 5, "epsilon": middle}, metadata, demo)
        low, high = (low, middle) if mean_half_width(even.context, even.calibration, 200) <= 40 else (middle, high)
    assert float(group.loss.epsilon) <= high * 1.001


def test_roll_up_sums_the_released_cells_by_hand() -> None:
    fine = pl.DataFrame({"service_id": ["a", "b", "c"], "value": [10, 20, 5], "ci_low": [0, 0, 0],
                         "ci_high": [0, 0, 0]})
    rollup = RollUp("service_id", "department", {"D1": ("a", "c"), "D2": ("b",), "D3": ()})
    mechanism = LaplaceVector(1, 2.0)
    out = release_rollup(fine, rollup, mechanism, 0.05)
    assert out["value"].to_list() == [15, 20, 0]
    assert out["ci_high"][1] - out["value"][1] == pytest.approx(mechanism.accuracy(0.05))  # one cell: its own half-width
    assert out["ci_high"][0] - out["value"][0] > mechanism.accuracy(0.05)  # two noises: wider
    assert out["ci_low"][2] == out["ci_high"][2] == 0  # no service: exactly zero


def test_weights_share_what_the_total_leaves(demo: Path) -> None:
    weighted = {"dataset": "civic-demo", "total": {"epsilon": 1.0}, "parts": [
        count("by_channel", ["channel"], 100),
        {"name": "a", "aggregate": "count", "group_by": ["centre"], "weight": 1},
        {"name": "b", "aggregate": "count", "group_by": ["satisfaction"], "weight": 3}]}
    planned = plan(demo, weighted)
    assert float(planned.loss.epsilon) == pytest.approx(1.0, rel=1e-6)
    a, b = (float(g.loss.epsilon) for g in planned.groups[1:])
    assert b == pytest.approx(3 * a, rel=1e-6)
    with pytest.raises(QueryError, match="total"):
        plan(demo, {**weighted, "total": {"epsilon": 0.01}})


def test_allocation_math() -> None:
    assert optimal_shares([1.0, 9.0], 1.0) == pytest.approx([1 / 4, 3 / 4])  # sqrt(a) under pure DP
    assert optimal_shares([1.0, 8.0], 0.5) == pytest.approx([1 / 5, 4 / 5])  # a^(2/3) under zCDP
    fitted = relax([1.0, 3.0], 2.0, 0.5)
    assert not fitted.fits and fitted.uniform_factor == pytest.approx(2 ** 0.5)
    assert fitted.single == ((1, pytest.approx(3 ** 0.5)),)  # only the larger part can absorb the excess
    assert relax([1.0, 1.0], 2.0, 1.0).fits
    assert even_split_total([1.0, 3.0]) == 6.0


@pytest.mark.slow
def test_targets_are_met_at_their_confidence(demo: Path) -> None:
    """200 releases with noise on. Counts are calibrated to miss 5% of cells: the bound
    [0.93, 0.975] over 200 x (channels 5, services 300) cells fails with probability below
    0.1% per run (binomial), and fails if the noise is removed or halved (rate ~100%).
    Means, quantiles and roll-ups are conservative (union bounds, worst-case locations; 99-100%
    observed at scale S, docs/benchmarks.md W8): held to 0.93, a flake rate far below 0.1%."""
    from bench.plans import met_rates  # noqa: PLC0415 - the benchmark's own judge of releases

    rates = met_rates(plan(demo), 200)
    for name in ("by_service", "by_channel"):
        assert 0.93 <= rates[name] <= 0.975, (name, rates[name])
    for name in ("by_department", "duration", "median", "p90"):
        assert rates[name] >= 0.93, (name, rates[name])


def test_a_zcdp_dataset_is_planned_in_rho(demo: Path, tmp_path: Path) -> None:
    import json  # noqa: PLC0415

    folder = tmp_path / "zcdp"
    shutil.copytree(demo, folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "accounting": {"mode": "zcdp", "delta": 1e-7}}))
    planned = plan(folder)
    assert all(g.loss.is_zcdp for g in planned.groups)
    assert planned.loss.rho == sum(g.loss.rho for g in planned.groups)  # rho adds, exactly
    assert all(p.predicted["target_met"] for p in planned.parts if p.part.accuracy is not None)
    noise = {type(m).__name__ for g in planned.groups for m in g.plan.calibration.mechanisms.values()}
    assert noise == {"GaussianVector", "NoisyMin"}
