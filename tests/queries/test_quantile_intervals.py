"""Value intervals of private quantiles: read off a noisy tree of counts, valid on any data.

The parts of the construction (see ``queries/kinds/quantiles.py``), each checked exactly:

- the tree reads every prefix and suffix sum of the grid positions from disjoint nodes;
- an endpoint test's threshold bounds its noise's tail (checked against the exact tail,
  computed here by direct convolution or in closed form, independently of the FFT code);
- without noise the endpoints always lie on their sides of the true quantile, on atoms,
  empty gaps, values beyond the grid and empty groups;
- the loss is the spec's epsilon, and intervals cost nothing extra when not asked.

Coverage under noise, on data with atoms, is in ``test_quantile_coverage.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import pytest

from civicdp.privacy.accuracy import chernoff_threshold, sum_tail_threshold
from civicdp.privacy.mechanisms import LaplaceVector, NoisyMin
from civicdp.queries.kinds.quantiles import CountTree
from tests.conftest import MakeDataset, base_metadata, events_frame

RUNS = 60


def _frame(people: int) -> pl.DataFrame:
    frame = events_frame(people=people, seed=3)
    # One row per person, waiting times spread over [0, 100] minutes.
    return frame.group_by("person_id").first().sort("person_id")


# -- the tree ----------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [3, 9, 11, 403, 2003, 4097])
def test_tree_reads_every_prefix_and_suffix_exactly(positions: int) -> None:
    tree = CountTree.for_positions(positions)
    assert tree.branching ** tree.depth >= positions
    leaves = np.random.default_rng(positions).integers(0, 9, (2, positions))  # synthetic counts
    ends = np.arange(1, positions)
    before, after, k_before, k_after = tree.readings(tree.nodes(leaves), ends)
    cumulative = np.cumsum(leaves, axis=1)
    assert (before == cumulative[:, ends - 1]).all()
    assert (after == cumulative[:, -1:] - cumulative[:, ends - 1]).all()
    # A prefix takes `digit` nodes per level; every node counted is a released one.
    digits = sum((ends // tree.branching ** level) % tree.branching for level in range(tree.depth))
    assert (k_before == digits).all() and (k_after >= 1).all()
    assert k_after.max() <= (tree.branching - 1) * tree.depth


# -- the thresholds ----------------------------------------------------------------------


def _laplace_pmf(scale: float) -> tuple[np.ndarray, int]:
    """Discrete Laplace pmf on -w..w (the mass beyond is below 1e-19)."""
    p = math.exp(-1 / scale)
    w = math.ceil(45 * scale)
    z = np.arange(-w, w + 1)
    return (1 - p) / (1 + p) * p ** np.abs(z), w


def _exact_tail(scale: float, weights: tuple[int, int], counts: tuple[int, int], t: int) -> float:
    """P(a X + b Y >= t) by direct convolution on the integers (X, Y: sums of discrete Laplace noises)."""
    single, w = _laplace_pmf(scale)
    total, offset = np.ones(1), 0
    for weight, count in zip(weights, counts):
        for _ in range(count):
            dilated = np.zeros(weight * (single.size - 1) + 1)
            dilated[::weight] = single
            total = np.convolve(total, dilated)
            offset += weight * w
    return float(total[max(0, t + offset):].sum())


@pytest.mark.parametrize(("scale", "weights", "counts", "beta"), [
    (3.0, (1, 1), (4, 3), 0.025),
    (6.0, (1, 9), (5, 2), 0.025),
    (2.0, (7, 3), (3, 3), 0.0125),
    (0.7, (1, 1), (1, 6), 0.025),
])
def test_thresholds_bound_the_exact_tail_and_are_tight(scale: float, weights: tuple[int, int],
                                                       counts: tuple[int, int], beta: float) -> None:
    """Below a scale of 64 the computation is exact: t is the smallest integer whose tail is at most beta."""
    t = sum_tail_threshold("laplace", scale, weights, counts, beta)
    assert _exact_tail(scale, weights, counts, t) <= beta
    assert _exact_tail(scale, weights, counts, t - 1) > beta - 1e-8
    assert t <= chernoff_threshold("laplace", scale, weights, counts, beta)
    assert _exact_tail(scale, weights, counts, chernoff_threshold("laplace", scale, weights, counts, beta)) <= beta


@pytest.mark.parametrize("scale", [150.0, 2500.0])
def test_thresholds_on_a_lattice_stay_valid_and_close(scale: float) -> None:
    """Large scales are computed on a coarser lattice, rounded up: still a bound, within a few percent.

    X + Y for two single noises has the closed-form tail sum_y P(Y = y) P(X >= t - y).
    """
    p = math.exp(-1 / scale)
    t = sum_tail_threshold("laplace", scale, (1, 1), (1, 1), 0.025)
    pmf, w = _laplace_pmf(scale)
    x = t - np.arange(-w, w + 1)  # X must reach t - y
    survival = np.where(x >= 1, p ** np.maximum(x, 0) / (1 + p), 1 - p ** np.maximum(1 - x, 0) / (1 + p))
    tail = float(np.dot(pmf, survival))
    assert 0.8 * 0.025 < tail <= 0.025


# -- the endpoints, noise removed -------------------------------------------------------------


def _noise_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LaplaceVector, "release", lambda self, values: [int(v) for v in values])
    monkeypatch.setattr(NoisyMin, "release", lambda self, scores: int(np.argmin(scores)))


ADVERSARIAL = {
    "half at 0, half at 5": np.repeat([0.0, 5.0], 200),
    "52% zeros": np.concatenate((np.zeros(208), np.repeat(np.arange(1.0, 9.0), 24))),
    "one atom": np.full(400, 7.0),
    "between grid points": np.full(400, 7.25),
    "beyond the grid": np.concatenate((np.full(100, 2.0), np.full(300, 95.0))),
    "continuous": np.round(np.random.default_rng(4).exponential(6.0, 400), 2),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_endpoints_lie_on_their_sides_without_noise(make_dataset: MakeDataset, monkeypatch: pytest.MonkeyPatch,
                                                    name: str) -> None:
    """With every noise set to zero each test sees its exact margin: ci_low <= Q <= ci_high, always.

    Grid 0, 0.5, ..., 20 within bounds [0, 100] (so values may lie beyond it); the truth is
    the smallest value x with #(values <= x) >= q * n.
    """
    values = ADVERSARIAL[name]
    frame = _frame(len(values)).with_columns(pl.Series("waiting_minutes", values))
    dataset = make_dataset(frame, base_metadata())
    _noise_removed(monkeypatch)
    levels = [0.1, 0.5, 0.75, 0.9]
    spec = {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": levels, "epsilon": 3.0,
            "candidates": {"start": 0, "stop": 20, "step": 0.5}, "contributions": 1}
    ordered = np.sort(values)
    for level, value, low, high in dataset.run(spec).table.select("quantile", "value", "ci_low", "ci_high").iter_rows():
        truth = ordered[math.ceil(level * len(ordered)) - 1]
        assert low <= truth <= high, (name, level, truth, low, high)
        assert low <= value <= high


def test_empty_group_gets_the_whole_range(make_dataset: MakeDataset) -> None:
    """A group with no rows (kiosk is declared but absent) cannot have a narrow interval.

    Each endpoint moves inward only past tests passed by noise alone (each at most 2.5%, and
    consecutive ones share most of their nodes): reaching 5 or 95 takes 50 of them.
    """
    dataset = make_dataset(_frame(200), base_metadata())
    spec = {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5],
            "group_by": ["channel"], "epsilon": 1.0, "contributions": 1}
    table = dataset.run(spec).table.filter(pl.col("channel") == "kiosk")
    assert table["ci_low"][0] <= 5 and table["ci_high"][0] >= 95


# -- cost ----------------------------------------------------------------------------------


def test_quantile_intervals_are_skipped_when_not_asked(make_dataset: MakeDataset) -> None:
    dataset = make_dataset(_frame(200), base_metadata())
    spec = {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5],
            "epsilon": 1.0, "contributions": 1, "intervals": False}
    result = dataset.run(spec)
    assert result.table["ci_low"].null_count() == result.table.height
    assert abs(float(result.loss.epsilon) - 1.0) < 1e-9
    with_intervals = dataset.estimate({**spec, "intervals": True, "quantiles": [0.5, 0.9]})
    assert abs(float(with_intervals.loss.epsilon) - 1.0) < 1e-9
    roles = {m["role"]: m for m in with_intervals.mechanisms}
    assert set(roles) == {"cdf", "q0.5", "q0.9"}
    # The tree of the default grid (1001 candidates, 2003 positions): depth 3, so L1 sensitivity 3 L.
    assert roles["cdf"]["sensitivity"] == 3 and roles["cdf"]["epsilon"] == pytest.approx(0.5)
    margins = with_intervals.accuracy["interval_margin"]
    assert set(margins) == {"0.5", "0.9"} and all(0 < m < 200 for m in margins.values())


def test_quantile_intervals_cover_the_true_quantile(make_dataset: MakeDataset) -> None:
    frame = _frame(3000)
    dataset = make_dataset(frame, base_metadata())
    spec: dict[str, Any] = {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5, 0.9],
                            "candidates": {"start": 0, "stop": 100, "step": 0.5}, "epsilon": 2.0, "contributions": 1}
    values = np.sort(frame["waiting_minutes"].to_numpy())
    truth = {q: values[math.ceil(q * len(values)) - 1] for q in (0.5, 0.9)}
    covered = {0.5: 0, 0.9: 0}
    widths = []
    for _ in range(RUNS):
        table = dataset.run(spec).table
        for q, value, low, high in table.select("quantile", "value", "ci_low", "ci_high").iter_rows():
            covered[q] += low <= truth[q] <= high
            widths.append(high - low)
            assert low <= value <= high
    # At a true coverage of 95%, 51 or fewer of 60 has probability 0.28% (binomial); the
    # construction covers about 99% of continuous data like this (then below 1e-8).
    assert min(covered.values()) >= 52, covered
    # Informative: on 3,000 rows the interval is far narrower than the range of 100 minutes.
    assert np.median(widths) < 10


# -- zCDP datasets: discrete Gaussian nodes ----------------------------------------------------


def _exact_gaussian_tail(scale: float, weights: tuple[int, int], counts: tuple[int, int], t: int) -> float:
    """P(a X + b Y >= t) for sums of discrete Gaussian noises, by direct convolution."""
    w = math.ceil(12 * scale) + 2
    z = np.arange(-w, w + 1)
    single = np.exp(-(z * z) / (2 * scale * scale))
    single /= single.sum()
    total, offset = np.ones(1), 0
    for weight, count in zip(weights, counts):
        for _ in range(count):
            dilated = np.zeros(weight * (single.size - 1) + 1)
            dilated[::weight] = single
            total = np.convolve(total, dilated)
            offset += weight * w
    return float(total[max(0, t + offset):].sum())


@pytest.mark.parametrize(("scale", "weights", "counts"), [(3.0, (1, 1), (4, 3)), (5.0, (1, 9), (3, 2))])
def test_gaussian_thresholds_bound_the_exact_tail_and_are_tight(scale: float, weights: tuple[int, int],
                                                                counts: tuple[int, int]) -> None:
    t = sum_tail_threshold("gaussian", scale, weights, counts, 0.025)
    assert _exact_gaussian_tail(scale, weights, counts, t) <= 0.025
    assert _exact_gaussian_tail(scale, weights, counts, t - 1) > 0.025
    assert t <= chernoff_threshold("gaussian", scale, weights, counts, 0.025)


def test_zcdp_quantiles_use_gaussian_nodes_and_cover(make_dataset: MakeDataset) -> None:
    """On a zCDP dataset the tree's nodes are discrete Gaussian (L2 sensitivity L sqrt(depth)), the
    selections are read in rho, and the intervals still cover: 20 releases each of the median (0, an
    atom of 52%) and the 90th percentile (7); 15 or fewer of 20 has probability 0.26% at a true
    coverage of 95%, below 0.01% at 98% (the construction's rate here is higher)."""
    metadata = base_metadata()
    metadata["accounting"] = {"mode": "zcdp", "delta": 1e-8}
    values = np.concatenate((np.zeros(520), np.repeat(np.arange(1.0, 9.0), 60)))
    dataset = make_dataset(_frame(len(values)).with_columns(pl.Series("waiting_minutes", values)), metadata)
    spec = {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5, 0.9], "epsilon": 1.0,
            "candidates": {"start": 0, "stop": 20, "step": 0.1}, "contributions": 1}
    estimate = dataset.estimate(spec)
    roles = {m["role"]: m for m in estimate.mechanisms}
    assert roles["cdf"]["mechanism"] == "discrete Gaussian" and "rho" in roles["cdf"]
    tree = CountTree.for_positions(2 * 201 + 1)
    assert roles["cdf"]["sensitivity"] == pytest.approx(math.sqrt(tree.depth))
    truth = {0.5: 0.0, 0.9: 7.0}
    covered = {0.5: 0, 0.9: 0}
    for _ in range(20):
        for level, value, low, high in dataset.run(spec).table.select("quantile", "value", "ci_low",
                                                                       "ci_high").iter_rows():
            covered[level] += low <= truth[level] <= high
            assert low <= value <= high
    assert min(covered.values()) >= 16, covered
