"""Service performance analyses: the report, lagged points and department scores."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from civicdp.queries.analyses.performance import geometric_grid
from civicdp.queries.analyses.scores import rank_ranges
from civicdp.queries.engine import LocalDataset
from civicdp.queries.errors import QueryError
from tests.queries import perf_data


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> LocalDataset:
    """Nothing lagged: every service takes its target in the median."""
    return LocalDataset(perf_data.write(tmp_path_factory.mktemp("plain")))


@pytest.fixture(scope="module")
def lagged(tmp_path_factory: pytest.TempPathFactory) -> LocalDataset:
    """S3 takes 4 times its target; S7 takes 3 times."""
    return LocalDataset(perf_data.write(tmp_path_factory.mktemp("lagged"), lagged={"S3": 4.0, "S7": 3.0}))


# -- performance report ---------------------------------------------------------------


def test_report_has_every_part_with_intervals_and_one_loss(plain: LocalDataset) -> None:
    spec = {"analysis": "performance_report", "epsilon": 1.0, "by": ["department", "channel"]}
    estimate = plain.estimate(spec)
    assert math.isclose(float(estimate.loss.epsilon), 1.0, rel_tol=1e-9) and estimate.loss.delta == 0
    assert "department: duration_quantiles" in estimate.accuracy
    result = plain.run(spec)
    assert result.loss == estimate.loss
    metrics = set(result.table["metric"])
    assert metrics == {"volume", "duration_mean", "duration_median", "duration_p90", "waiting_mean",
                       "waiting_median", "waiting_p90", "satisfaction_mean"}
    assert set(result.tables) == {"by_department", "by_channel"}
    by_department = result.tables["by_department"]
    assert by_department["department"].to_list() == perf_data.DEPARTMENTS
    values = result.table.drop_nulls("value")
    assert (values["ci_low"] <= values["value"]).all() and (values["value"] <= values["ci_high"]).all()


def test_report_estimate_reads_no_data_and_names_columns(plain: LocalDataset, tmp_path: Path) -> None:
    folder = perf_data.write(tmp_path / "gone", people=50)
    local = LocalDataset(folder)
    (folder / "events.parquet").unlink()
    estimate = local.estimate({"analysis": "performance_report", "epsilon": 0.5})
    assert float(estimate.loss.epsilon) == pytest.approx(0.5)
    plan = plain.engine.plan({"analysis": "performance_report", "epsilon": 0.5, "satisfaction": None},
                             plain.metadata, plain.path)
    assert plan.columns() == {"service_id", "department", "channel", "duration_hours", "waiting_minutes"}


def test_report_split_is_exact_and_public() -> None:
    grid = geometric_grid(720)
    assert grid[0] == 0 and grid[-1] == 720 and all(b > a for a, b in zip(grid, grid[1:]))
    assert len(grid) < 500


def test_report_intervals_hold_and_are_informative(plain: LocalDataset) -> None:
    events = pl.read_parquet(plain.path / "events.parquet")
    result = plain.run({"analysis": "performance_report", "epsilon": 8.0, "by": ["channel"], "confidence": 0.999})
    table = result.tables["by_channel"]
    truth = events.group_by("channel").agg(pl.col("duration_hours").mean().alias("true"), pl.len().alias("n"))
    joined = table.join(truth, on="channel")
    # Each interval holds with probability 0.999 (the data is within the bounds, every person has at
    # most L rows): six checks, flake rate below 0.6%.
    assert ((joined["duration_mean_low"] <= joined["true"]) & (joined["true"] <= joined["duration_mean_high"])).all()
    assert ((joined["volume_low"] <= joined["n"]) & (joined["n"] <= joined["volume_high"])).all()
    # ... and they are informative: noise calibrated to the loss, not to the whole range.
    assert ((joined["duration_mean_high"] - joined["duration_mean_low"]) < 3 * joined["true"]).all()
    assert ((joined["volume_high"] - joined["volume_low"]) < 0.1 * joined["n"]).all()


# -- lagged points ------------------------------------------------------------------


def test_lagged_finds_the_planted_services(lagged: LocalDataset) -> None:
    result = lagged.run({"analysis": "lagged_points", "epsilon": 2.0, "level": "services"})
    flagged = set(result.table["service_id"])
    assert flagged == {"S3", "S7"}
    assert (result.table["ci_low"] > 0.5).all()
    services = result.tables["services"]
    # The flag is exactly "lower end above the threshold".
    assert (services["flagged"] == (services["ci_low"] > 0.5)).all()


def test_lagged_steps_follow_the_service(lagged: LocalDataset) -> None:
    result = lagged.run({"analysis": "lagged_points", "epsilon": 4.0, "level": "steps"})
    steps = result.tables["steps"]
    flagged = {(s, k) for s, k in steps.filter(pl.col("flagged")).select("service_id", "step").iter_rows()}
    assert flagged == {("S3", 1), ("S3", 2), ("S7", 1), ("S7", 2)}


def test_nothing_lagged_nothing_flagged_even_at_tiny_epsilon(plain: LocalDataset) -> None:
    """Flags need the simultaneous interval above the threshold: a false flag has probability
    at most 1 - confidence per run over all services and steps together (a union bound; here
    every share is far below 1/2). At 99.9% over three runs this test's flake rate is at most
    0.3%. The family-wise rate with every cell at the threshold: test_lagged_familywise.py."""
    for epsilon in (0.001, 0.01, 1.0):
        result = plain.run({"analysis": "lagged_points", "epsilon": epsilon, "confidence": 0.999})
        assert result.table.height == 0, epsilon
        assert not result.tables["services"]["flagged"].any()


def test_tiny_epsilon_gives_wide_intervals_and_no_false_flag(lagged: LocalDataset) -> None:
    """At epsilon 0.001 every interval is wide. A flag on a truly lagged service (S3, S7) is not
    an error, only unlikely (noise alone can push its interval above the threshold: ~4% of runs at
    95%); a flag on any other service is, with probability at most 1 - confidence = 0.1%."""
    result = lagged.run({"analysis": "lagged_points", "epsilon": 0.001, "level": "services", "confidence": 0.999})
    services = result.tables["services"]
    assert (services["ci_high"] - services["ci_low"] > 0.5).all()
    flagged = set(services.filter(pl.col("flagged"))["service_id"])
    assert flagged <= {"S3", "S7"}


def test_share_late_statistic_and_loss(lagged: LocalDataset) -> None:
    spec = {"analysis": "lagged_points", "epsilon": 1.0, "statistic": "share_late", "max_share": 0.8}
    estimate = lagged.estimate(spec)
    assert Fraction(1) - Fraction(1, 10**9) < estimate.loss.epsilon <= Fraction(1)
    assert [m["epsilon"] for m in estimate.mechanisms] == pytest.approx([0.5, 0.5])
    result = lagged.run(spec)
    services = result.tables["services"]
    assert (services["flagged"] == (services["ci_low"] > 0.8)).all()
    assert set(result.table.filter(pl.col("level") == "service")["service_id"]) <= {"S3", "S7"}


@pytest.mark.parametrize("spec", [
    {"analysis": "lagged_points", "epsilon": 1.0, "contributions": 2, "step_contributions": 3},
    {"analysis": "department_scores", "epsilon": 1.0, "contributions": 2},
    {"analysis": "performance_report", "epsilon": 1.0, "contributions": 2, "by": ["channel"]},
], ids=["lagged", "scores", "report"])
def test_answers_state_their_contribution_bound_and_what_intervals_cover(plain: LocalDataset, spec: dict) -> None:
    """Rows beyond the bound are dropped: the notes say the bound used and that the intervals cover
    the kept rows only (the number dropped is data and is not released)."""
    for notes in (plain.estimate(spec).notes, plain.run(spec).notes):
        (note,) = [n for n in notes if n.startswith("contribution bound")]
        assert "at most 2 " in note and "rows only, not all the data" in note
        if spec["analysis"] == "lagged_points":
            assert "at most 3 steps per person" in note
        if spec["analysis"] != "lagged_points":
            assert "clipped" in note and "[0, 720]" in note


# -- department scores --------------------------------------------------------------


def test_rank_ranges_by_hand() -> None:
    low = np.array([0.9, 1.0, 2.0, 2.1])
    high = np.array([1.1, 1.2, 2.2, 2.3])
    lo, hi = rank_ranges(low, high)
    assert lo.tolist() == [1, 1, 3, 3] and hi.tolist() == [2, 2, 4, 4]


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_rank_ranges_cover_the_true_ranks_at_the_stated_rate(tmp_path: Path) -> None:
    speed = {"D1": 0.7, "D2": 0.85, "D3": 1.0, "D4": 1.1, "D5": 1.3, "D6": 1.6}
    local = LocalDataset(perf_data.write(tmp_path / "ranks", people=20000, department_speed=speed))
    events = pl.read_parquet(local.path / "events.parquet")
    target = pl.DataFrame({"service_id": list(perf_data.targets()), "e": list(perf_data.targets().values())})
    # The truth on the bounded data (every person has at most L rows, so that is all of it).
    truth = (events.join(target, on="service_id").group_by("department")
             .agg((pl.col("duration_hours").sum() / pl.col("e").sum()).alias("true"))
             .with_columns(pl.col("true").rank("min").cast(pl.Int64).alias("true_rank")))
    runs, confidence = 30, 0.9
    covered, widths = 0, []
    for _ in range(runs):
        table = local.run({"analysis": "department_scores", "epsilon": 4.0,
                           "confidence": confidence}).table.join(truth, on="department")
        inside = (table["rank_low"] <= table["true_rank"]) & (table["true_rank"] <= table["rank_high"])
        covered += bool(inside.all())
        widths.append(float((table["rank_high"] - table["rank_low"]).mean()))
    # Simultaneous coverage is at least 0.9 per run; P(Binomial(30, 0.9) <= 21) < 0.4%: flake rate < 0.4%.
    assert _binomial_cdf(21, runs, confidence) < 0.004
    assert covered >= 22
    # Ranges are informative (not all of 1..6): the intervals are not trivially wide.
    assert np.mean(widths) < 3


def test_scores_loss_split_and_expected_by_complexity(plain: LocalDataset) -> None:
    for expected in ("target", "complexity"):
        spec = {"analysis": "department_scores", "epsilon": 0.6, "expected": expected}
        estimate = plain.estimate(spec)
        assert Fraction(6, 10) - Fraction(1, 10**9) < estimate.loss.epsilon <= Fraction(6, 10)
        table = plain.run(spec).table
        assert sorted(table["department"]) == perf_data.DEPARTMENTS
        assert (table["rank_low"] <= table["rank"]).all() and (table["rank"] <= table["rank_high"]).all()


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "field", "match"), [
    ({"analysis": "performance_report", "epsilon": 1, "by": ["nope"]}, "by.0", "unknown column"),
    ({"analysis": "performance_report", "epsilon": 1, "by": ["duration_hours"]}, "by.0", "no public key"),
    ({"analysis": "performance_report", "epsilon": 1, "waiting": "remark"}, "waiting", "unknown column"),
    ({"analysis": "performance_report"}, "epsilon", "privacy loss"),
    ({"analysis": "performance_report", "epsilon": 1, "metric": "p99"}, "metric", "Extra inputs"),
    ({"analysis": "lagged_points", "epsilon": 1, "target_factor": 0}, "target_factor", "greater than 0"),
    ({"analysis": "lagged_points", "epsilon": 1, "target_factor": 1000}, "target_factor", "less than or equal"),
    ({"analysis": "lagged_points", "epsilon": 1, "max_share": 0.9}, "max_share", "share_late"),
    ({"analysis": "lagged_points", "epsilon": 1, "statistic": "mean"}, "statistic", "median"),
    ({"analysis": "lagged_points", "epsilon": 1, "service": "channel"}, "dataset", "no column 'channel'"),
    ({"analysis": "lagged_points", "epsilon": 1, "period": {"start": "2030-01-01"}}, "period", "outside"),
    ({"analysis": "department_scores", "epsilon": 1, "group": "waiting_minutes"}, "group", "no public key"),
    ({"analysis": "department_scores", "epsilon": 1, "contributions": 0}, "contributions", "between"),
], ids=["report-unknown-group", "report-keyless-group", "report-unknown-column", "report-no-epsilon",
        "report-unknown-field", "lagged-zero-factor", "lagged-huge-factor", "lagged-share-with-median",
        "lagged-unknown-statistic", "lagged-service-not-in-catalogue", "lagged-period-outside",
        "scores-keyless-group", "scores-bad-contributions"])
def test_bad_input_is_refused_with_its_field(plain: LocalDataset, spec: dict, field: str, match: str) -> None:
    with pytest.raises(QueryError, match=match) as caught:
        plain.estimate(spec)
    assert caught.value.field == field


def test_report_one_pass_aggregates_equal_the_backends(tmp_path: Path) -> None:
    from civicdp.queries.kinds.base import aligned, cell_positions
    from civicdp.queries.polars_one_pass import fits_one_pass

    local = LocalDataset(perf_data.write(tmp_path / "many", people=400))
    for period in (None, {"start": "2025-03-01", "end": "2025-09-01"}):
        spec = {"analysis": "performance_report", "epsilon": 1.0, "contributions": 2, "period": period}
        plan = local.engine.plan(spec, local.metadata, local.path)
        plans = [part.plan for part in plan.parts]
        backend = local.engine.backend
        requests = [sub.request() for sub in plans]
        assert fits_one_pass(requests)  # the report's one-pass path, not one aggregate each
        for sub, fast in zip(plans, backend.aggregate_many(requests)):
            slow = backend.aggregate(sub.context and __import__("civicdp.queries.backend", fromlist=["x"]).AggregateRequest(
                sub.context.dataset_dir, sub.context.metadata, sub.context.spec.table,
                sub.calibration.contributions, sub.context.filters, sub.context.group_by,
                sub.kind.measure(sub.context)))
            if "position" in slow.columns:
                n = 2 * len(sub.kind.measure(sub.context).grid) + 1
                assert (cell_positions(sub.context, slow, n) == cell_positions(sub.context, fast, n)).all()
            else:
                cols = [c for c in ("rows", "total") if c in slow.columns]
                assert aligned(sub.context, slow, cols).equals(aligned(sub.context, fast, cols)), sub.spec
