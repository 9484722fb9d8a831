"""OpenDP mechanisms: exact privacy maps, calibrated noise, and an empirical privacy check.

OpenDP's samplers cannot be seeded, so the statistical tests here use many draws and
bounds that hold with overwhelming probability when the noise is right, yet fail
when the noise is missing, halved or doubled. Each states its flake rate.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import polars as pl
import pytest

from civicdp.privacy.errors import InvalidLoss
from civicdp.privacy.loss import PrivacyLoss
from civicdp.privacy.mechanisms import LaplaceVector, NoisyMin
from civicdp.queries.backend import AggregateRequest
from civicdp.queries.engine import Engine
from civicdp.queries.polars_backend import PolarsBackend
from tests.conftest import MAX_CONTRIBUTIONS, MakeDataset, events_frame

CALIBRATIONS = [(1, 0.1), (10, 0.5), (3, 0.3), (7, 1 / 3), (1000, 0.01), (1, 10.0)]
CALIBRATION_IDS = ["1@0.1", "10@0.5", "3@0.3", "7@third", "1000@0.01", "1@10"]


def discrete_laplace_variance(scale: float) -> float:
    """Variance of the discrete Laplace with P(k) proportional to exp(-|k| / scale)."""
    q = math.exp(-1 / scale)
    return 2 * q / (1 - q) ** 2


def discrete_laplace_tail(scale: float, k: int) -> float:
    """P(|Y| >= k) for integer k >= 1."""
    q = math.exp(-1 / scale)
    return 2 * q ** k / (1 + q)


# -- privacy maps -------------------------------------------------------------------


@pytest.mark.parametrize("scale, sensitivity, epsilon", [
    (2.0, 1, Fraction(1, 2)),
    (6.0, 3, Fraction(1, 2)),
    (1.0, 4, Fraction(4)),
], ids=["1/2", "3/6", "4/1"])
def test_laplace_privacy_map_is_exact(scale: float, sensitivity: int, epsilon: Fraction) -> None:
    """The discrete Laplace map is sensitivity / scale, read from OpenDP without slack."""
    assert LaplaceVector(sensitivity, scale).loss == PrivacyLoss(epsilon)


@pytest.mark.parametrize("scale, sensitivity, epsilon", [
    (2.0, 1, 1.0),
    (20.0, 1, 0.1),
    (4.0, 3, 1.5),
], ids=["1/2", "1/20", "3/4"])
def test_noisy_min_privacy_map_is_exact(scale: float, sensitivity: int, epsilon: float) -> None:
    """Noisy min over scores that may move either way costs 2 * sensitivity / scale."""
    assert NoisyMin(sensitivity, scale).loss == PrivacyLoss(epsilon)  # type: ignore[arg-type]


@pytest.mark.parametrize("sensitivity, epsilon", CALIBRATIONS, ids=CALIBRATION_IDS)
def test_laplace_for_epsilon_stays_within_and_close_to_epsilon(sensitivity: int, epsilon: float) -> None:
    """Calibration never exceeds the asked epsilon and wastes almost none of it."""
    mechanism = LaplaceVector.for_epsilon(sensitivity, epsilon)
    assert mechanism.sensitivity == sensitivity
    assert mechanism.loss.epsilon <= Fraction(epsilon)
    assert float(mechanism.loss.epsilon) == pytest.approx(epsilon, rel=1e-9)
    assert mechanism.scale == pytest.approx(sensitivity / epsilon, rel=1e-9)


@pytest.mark.parametrize("sensitivity, epsilon", CALIBRATIONS, ids=CALIBRATION_IDS)
def test_noisy_min_for_epsilon_stays_within_and_close_to_epsilon(sensitivity: int, epsilon: float) -> None:
    """Selection is calibrated like the Laplace vector, with the factor 2 of non-monotonic scores."""
    mechanism = NoisyMin.for_epsilon(sensitivity, epsilon)
    assert mechanism.loss.epsilon <= Fraction(epsilon)
    assert float(mechanism.loss.epsilon) == pytest.approx(epsilon, rel=1e-9)
    assert mechanism.scale == pytest.approx(2 * sensitivity / epsilon, rel=1e-9)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.nan, math.inf], ids=["zero", "negative", "nan", "inf"])
def test_for_epsilon_refuses_unusable_epsilons(epsilon: float) -> None:
    """No mechanism is built for a loss that is not finite and positive."""
    with pytest.raises(InvalidLoss, match="finite and positive"):
        LaplaceVector.for_epsilon(1, epsilon)
    with pytest.raises(InvalidLoss, match="finite and positive"):
        NoisyMin.for_epsilon(1, epsilon)


@pytest.mark.parametrize("scale", [0.0, -2.0, math.nan, math.inf], ids=["zero", "negative", "nan", "inf"])
def test_unusable_scales_are_refused(scale: float) -> None:
    """A zero (noise-free) or non-finite scale never reaches OpenDP."""
    with pytest.raises(InvalidLoss, match="noise scale must be finite and positive"):
        LaplaceVector(1, scale).release([0])
    with pytest.raises(InvalidLoss, match="noise scale must be finite and positive"):
        _ = NoisyMin(1, scale).loss


@pytest.mark.parametrize("accuracy, alpha", [
    (1.0, 0.05), (10.0, 0.05), (50.0, 0.05), (3.5, 0.01), (100.0, 0.1),
], ids=["1@95", "10@95", "50@95", "3.5@99", "100@90"])
def test_for_accuracy_meets_the_target(accuracy: float, alpha: float) -> None:
    """The mechanism's stated (1 - alpha) half-width is at most the target, and not much below."""
    mechanism = LaplaceVector.for_accuracy(1, accuracy, alpha)
    assert mechanism.accuracy(alpha) <= accuracy
    assert mechanism.accuracy(alpha) == pytest.approx(accuracy, rel=1e-9)


@pytest.mark.parametrize("scale, alpha", [(0.5, 0.05), (3.0, 0.05), (20.0, 0.05), (7.0, 0.01)],
                         ids=["0.5@95", "3@95", "20@95", "7@99"])
def test_stated_accuracy_holds_for_the_discrete_laplace(scale: float, alpha: float) -> None:
    """Exact tail: noise exceeds the stated half-width with probability at most alpha."""
    half = LaplaceVector(1, scale).accuracy(alpha)
    assert discrete_laplace_tail(scale, math.floor(half) + 1) <= alpha
    # ...and the half-width is not needlessly wide: one unit less would miss the target.
    assert discrete_laplace_tail(scale, math.floor(half) - 1) > alpha


@pytest.mark.parametrize("scale", [0.3, 0.01, 1e-3, 1e-7], ids=["0.3", "0.01", "0.001", "1e-7"])
def test_stated_accuracy_is_a_finite_positive_half_width(scale: float) -> None:
    """Even for tiny scales (a sub-unit target accuracy) the half-width is usable, not -inf."""
    half = LaplaceVector(1, scale).accuracy(0.05)
    assert 0 < half < math.inf
    assert discrete_laplace_tail(scale, max(1, math.ceil(half))) <= 0.05


# -- noise is present and correctly scaled ----------------------------------------------


def test_laplace_noise_variance_matches_the_declared_scale() -> None:
    """20,000 releases of 0 have mean ~0 and variance ~2 scale^2.

    The sample variance has relative standard deviation sqrt((kurtosis - 1) / n) =
    sqrt(5 / 20000) = 1.6 %, so the +-15 % band is over 9 standard deviations wide
    (flake rate far below 1e-9), while halving (x0.25), doubling (x4) or removing the
    noise (0) lands far outside it.
    """
    mechanism = LaplaceVector.for_epsilon(10, 0.5)
    draws = np.asarray(mechanism.release([0] * 20_000))
    expected = discrete_laplace_variance(mechanism.scale)
    assert expected == pytest.approx(2 * mechanism.scale ** 2, rel=0.01)
    assert draws.dtype.kind == "i"
    assert 0.85 * expected < draws.var() < 1.15 * expected
    assert abs(draws.mean()) < 5 * math.sqrt(expected / draws.size)  # 5 sd: flake ~6e-7


def test_laplace_noise_is_added_to_every_cell_independently() -> None:
    """Neighbouring cells do not get the same noise (correlated noise would cancel in differences)."""
    draws = np.asarray(LaplaceVector.for_epsilon(1, 0.1).release([0] * 10_000))
    correlation = np.corrcoef(draws[:-1], draws[1:])[0, 1]
    assert abs(correlation) < 0.06  # sd of the estimate ~0.01: 6 sd, flake ~2e-9


def test_noisy_min_picks_the_best_of_clearly_separated_scores_at_high_epsilon() -> None:
    """At epsilon 10 (scale 0.2) a score gap of 50 is never overcome.

    The chance of a wrong pick per draw is below 4 * exp(-50 / 0.2); requiring 95 %
    leaves room only for a broken mechanism.
    """
    mechanism = NoisyMin.for_epsilon(1, 10.0)
    picks = [mechanism.release([50, 50, 0, 50, 50]) for _ in range(500)]
    assert picks.count(2) / len(picks) >= 0.95


def test_noisy_min_is_near_uniform_at_tiny_epsilon() -> None:
    """At epsilon 1e-6 the scores 0..3 are indistinguishable: each wins ~1/4 of 4,000 draws.

    Each frequency has standard deviation 0.0068; +-0.04 is 5.8 sd (flake ~3e-8). Without
    noise the best candidate would win every time.
    """
    mechanism = NoisyMin.for_epsilon(1, 1e-6)
    picks = Counter(mechanism.release([0, 1, 2, 3]) for _ in range(4000))
    assert set(picks) == {0, 1, 2, 3}
    for candidate in range(4):
        assert abs(picks[candidate] / 4000 - 0.25) < 0.04


def test_noisy_min_distinguisher_stays_within_epsilon() -> None:
    """Scores moved by the sensitivity change a pick's probability by at most e^epsilon.

    Neighbouring score vectors [0, 1, 1, 1, 1, 1] and [1, 0, 0, 0, 0, 0] (L-inf distance
    1) at epsilon 1: permute-and-flip picks candidate 0 with probabilities ~0.27 and
    ~0.10, a log-ratio of ~1.0 = epsilon (the worst case is attained). With 5,000 draws
    each the log-ratio has sd ~0.053, so +-0.3 is 5.6 sd (flake ~2e-8); a halved scale
    (log-ratio ~2), a doubled one (~0.5) or no noise (infinite) fail.
    """
    epsilon = 1.0
    mechanism = NoisyMin.for_epsilon(1, epsilon)
    n = 5000
    first = sum(mechanism.release([0, 1, 1, 1, 1, 1]) == 0 for _ in range(n)) / n
    second = sum(mechanism.release([1, 0, 0, 0, 0, 0]) == 0 for _ in range(n)) / n
    assert second > 0.02  # noise is present: the worse candidate still wins sometimes
    assert epsilon - 0.3 <= math.log(first / second) <= epsilon + 0.3


# -- an empirical neighbouring-dataset distinguisher for counts -------------------------


def _bounded_total(backend: PolarsBackend, dataset, contributions: int) -> int:
    plan = Engine().plan({"aggregate": "count", "epsilon": 1.0}, dataset.metadata, dataset.path)
    request = AggregateRequest(dataset.path, dataset.metadata, "events", contributions, (), (),
                               plan.kind.measure(plan.context))
    return int(backend.aggregate(request)["rows"].item())


def test_count_distinguisher_on_neighbouring_datasets(make_dataset: MakeDataset) -> None:
    """Removing one person with many rows moves the released count's distribution by <= e^epsilon.

    D has an extra person with 10 events; D' lacks them. Bounding keeps 3 (= L) of those
    rows, so the exact counts differ by exactly L. We release each count 60,000 times
    with the engine's calibrated mechanism and compare outcome frequencies: for every
    outcome seen at least 1,000 times in either, |log P_D / P_D'| <= epsilon + 0.25.
    The log of a count >= 1,000 has sd <= 0.032, so the slack is >= 5.5 sd per outcome
    (about 16 outcomes; flake < 1e-6). The true maximum is exactly epsilon (in the tails),
    so we also require the observed maximum to exceed epsilon - 0.25: noise of double
    the scale would fail that, half the scale (log-ratio 2) or no noise fail the first.
    """
    epsilon = 1.0
    base = events_frame()
    heavy = pl.DataFrame({
        "event_id": np.arange(10_000, 10_010, dtype=np.int64),
        "person_id": np.full(10, 999, dtype=np.int64),
        "service": ["A"] * 10, "channel": ["web"] * 10,
        "request_time": base["request_time"][:10],
        "waiting_minutes": [5.0] * 10, "satisfaction": np.full(10, 3, dtype=np.int64),
        "remark": ["x"] * 10, "score": [0.0] * 10,
    })
    with_person = make_dataset(pl.concat([base, heavy]), name="with")
    without_person = make_dataset(base, name="without")
    backend = PolarsBackend()
    count_with = _bounded_total(backend, with_person, MAX_CONTRIBUTIONS)
    count_without = _bounded_total(backend, without_person, MAX_CONTRIBUTIONS)
    assert count_with - count_without == MAX_CONTRIBUTIONS

    spec = {"aggregate": "count", "epsilon": epsilon}
    mechanisms = [Engine().plan(spec, d.metadata, d.path).calibration.mechanisms["counts"]
                  for d in (with_person, without_person)]
    assert mechanisms[0] == mechanisms[1]  # calibration depends on public parameters only
    mechanism = mechanisms[0]
    assert mechanism.sensitivity == MAX_CONTRIBUTIONS

    n = 60_000
    released_with = Counter(mechanism.release([count_with] * n))
    released_without = Counter(mechanism.release([count_without] * n))
    outcomes = [o for o in set(released_with) | set(released_without)
                if max(released_with[o], released_without[o]) >= 1000]
    assert len(outcomes) > 10  # noise spreads the outcomes
    log_ratios = [abs(math.log((released_with[o] + 0.5) / (released_without[o] + 0.5))) for o in outcomes]
    assert max(log_ratios) <= epsilon + 0.25
    assert max(log_ratios) >= epsilon - 0.25
