"""Department scores: intervals and rank ranges that hold at the stated rate on bounded data.

Departments close together (true scores 1.04-1.41) and one row per person, so bounding
drops about half the rows: the truth is the score of the **kept** rows, which is what the
intervals cover. Many releases are drawn from one exact bounded computation
(``plan.release``), so each costs only its noise and post-processing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from civicdp.queries.analyses.scores import ScoresPlan, split_loss
from civicdp.queries.analyses.service_common import bounded
from civicdp.queries.engine import LocalDataset
from tests.queries import perf_data

SPEEDS = {"D1": 0.97, "D2": 1.0, "D3": 1.02, "D4": 1.05, "D5": 1.1, "D6": 1.3}


@pytest.fixture(scope="module")
def close(tmp_path_factory: pytest.TempPathFactory) -> LocalDataset:
    return LocalDataset(perf_data.write(tmp_path_factory.mktemp("close"), people=20000, department_speed=SPEEDS))


def _plan(local: LocalDataset, epsilon: float, confidence: float) -> tuple[ScoresPlan, pl.DataFrame, pl.DataFrame]:
    """The plan, its exact bounded totals, and the truth ``[department, true, true_rank]`` of the kept rows."""
    spec = {"analysis": "department_scores", "epsilon": epsilon, "contributions": 1, "confidence": confidence}
    plan = local.engine.plan(spec, local.metadata, local.path)
    assert isinstance(plan, ScoresPlan)
    rows = bounded(local.engine.backend, plan.rows, not_null=("duration_hours",)).collect()
    assert rows.height < 0.6 * pl.read_parquet(local.path / "events.parquet").height  # bounding dropped rows
    target = pl.DataFrame({"service_id": list(perf_data.targets()), "e": list(perf_data.targets().values())})
    truth = (rows.join(target, on="service_id").group_by("department")
             .agg((pl.col("duration_hours").clip(0, 720).sum() / pl.col("e").sum()).alias("true"))
             .with_columns(pl.col("true").rank("min").cast(pl.Int64).alias("true_rank")))
    return plan, plan.exact_totals(local.engine.backend), truth


def test_rank_ranges_contain_every_true_rank_at_the_stated_rate(close: LocalDataset) -> None:
    """All six rank ranges hold at once in at least 95% of releases by construction (measured: 100%
    of 2,000, as ranges from non-overlapping intervals are conservative). Over 1,200 releases,
    P(below 93% | 95%) < 0.1%: flake rate below 0.1%. The ranges are informative: 2.5 ranks wide
    on average at epsilon 4 (the old construction, Bonferroni boxes of both totals and half the
    loss each: 4.0)."""
    plan, totals, truth = _plan(close, 4.0, 0.95)
    releases, held, widths = 1200, 0, []
    for _ in range(releases):
        table = plan.release(totals).table.join(truth, on="department")
        held += bool(((table["rank_low"] <= table["true_rank"]) & (table["true_rank"] <= table["rank_high"])).all())
        widths.append(float((table["rank_high"] - table["rank_low"] + 1).mean()))
    assert held / releases >= 0.93, held / releases
    assert np.mean(widths) < 3.3, np.mean(widths)


def test_score_intervals_hold_together_at_the_stated_rate(close: LocalDataset) -> None:
    """All six score intervals hold at once in about ``confidence`` of releases, not far more.

    At confidence 0.8 the construction gives 0.81-0.84 (measured over 400 releases in three
    settings); the old one, with corners of two Bonferroni boxes, 0.91. Over 1,000 releases the
    band [0.77, 0.88] lies more than 3 standard deviations from 0.81 and from 0.84: flake rate
    below 0.2%.
    """
    plan, totals, truth = _plan(close, 4.0, 0.8)
    releases, held = 1000, 0
    for _ in range(releases):
        table = plan.release(totals).table.join(truth, on="department")
        high = table["ci_high"].fill_null(float("inf"))
        held += bool(((table["ci_low"] <= table["true"]) & (table["true"] <= high)).all())
    assert 0.77 <= held / releases <= 0.88, held / releases


@pytest.mark.parametrize(("observed", "expected"), [(21_600_000, 480_000), (480_000, 21_600_000), (7, 7), (1, 10**9)],
                         ids=["durations-dominate", "targets-dominate", "equal", "extreme"])
def test_the_loss_split_sums_exactly_and_favours_the_noisier_total(observed: int, expected: int) -> None:
    from fractions import Fraction

    for epsilon in (0.1, 0.6, 1.0, 7.3):
        first, second = split_loss(epsilon, observed, expected)
        assert Fraction(first) + Fraction(second) == Fraction(epsilon)
        assert (first >= second) == (observed >= expected)
        assert first > 0 and second > 0


def test_notes_state_the_bound_and_what_the_intervals_cover(close: LocalDataset) -> None:
    result = close.run({"analysis": "department_scores", "epsilon": 1.0, "contributions": 1})
    text = " ".join(result.notes)
    assert "at most 1 row per person" in text and "kept, clipped rows only" in text
    assert "all 6 groups at once" in text
