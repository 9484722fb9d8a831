"""zCDP accounting: Gaussian noise and selections with OpenDP's exact zCDP maps, rho that adds.

Privacy maps are asserted against OpenDP's own (``meas.map(d_in)``), the conversion to
(epsilon, delta) against OpenDP's ``make_zCDP_to_approxDP``, and the noise by the spread
of repeated releases, which fails when noise is missing or mis-scaled.
"""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import opendp.combinators as combinators
import pytest

from civicdp.privacy.accounting import MAX_DELTA, PURE, Accounting, epsilon_of_rho, rho_for_epsilon
from civicdp.privacy.errors import InvalidLoss
from civicdp.privacy.loss import NANO, PrivacyLoss, compose
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector, NoisyMin, _gaussian, _noisy_min

ZCDP = Accounting("zcdp", 1e-7)


@pytest.mark.parametrize("sensitivity", [1, 3, 1000, math.sqrt(45)], ids=["1", "3", "1000", "sqrt45"])
@pytest.mark.parametrize("rho", [1e-4, 0.02, 0.5], ids=["tiny", "typical", "large"])
def test_the_gaussian_loss_is_opendps_map_and_as_tight_as_it_allows(sensitivity: float, rho: float) -> None:
    mechanism = GaussianVector.for_rho(sensitivity, rho, 1e-7)
    exact = _gaussian(mechanism.scale).map(float(sensitivity))
    assert mechanism.loss.rho == Fraction(repr(exact)) and exact <= rho
    assert _gaussian(mechanism.scale * (1 - 1e-9)).map(float(sensitivity)) > rho * (1 - 1e-6)


@pytest.mark.parametrize("sensitivity, rho", [(1, 0.01), (3000, 0.2)], ids=["small", "large"])
def test_a_zcdp_selection_is_opendps_zcdp_map_of_the_same_selection(sensitivity: int, rho: float) -> None:
    selection = NoisyMin.for_rho(sensitivity, rho, 1e-7)
    exact = _noisy_min(selection.scale, True).map(sensitivity)
    assert selection.loss.rho == Fraction(repr(exact)) and exact <= rho
    # The pure reading of a selection is unchanged.
    pure = NoisyMin.for_epsilon(sensitivity, 0.5)
    assert pure.loss.rho is None and float(pure.loss.epsilon) == _noisy_min(pure.scale).map(sensitivity)


@pytest.mark.parametrize("rho", [1e-5, 0.0202, 1.0])
def test_epsilon_of_rho_is_opendps_conversion(rho: float) -> None:
    expected = combinators.make_zCDP_to_approxDP(_gaussian(1.0)).map(math.sqrt(2 * rho)).epsilon(1e-7)
    assert epsilon_of_rho(rho, 1e-7) == pytest.approx(expected, rel=1e-12)
    loss = PrivacyLoss.zcdp(rho, 1e-7)
    assert float(loss.epsilon) == pytest.approx(expected, rel=1e-12) and float(loss.delta) == 1e-7


@pytest.mark.parametrize("epsilon", [0.01, 0.1, 1.0, 4.0])
def test_rho_for_epsilon_is_the_largest_rho_within_epsilon(epsilon: float) -> None:
    rho = rho_for_epsilon(epsilon, 1e-7)
    assert epsilon_of_rho(rho, 1e-7) <= epsilon
    assert epsilon_of_rho(rho * (1 + 1e-9), 1e-7) > epsilon * (1 - 1e-6)


def test_rho_adds_and_parts_of_one_budget_compose_back_to_its_epsilon() -> None:
    rho = ZCDP.budget(1.0)
    parts = [ZCDP.additive(3, rho / 24).loss for _ in range(24)]
    total = compose(parts)
    assert total.rho is not None and total.rho <= Fraction(repr(rho)) * (1 + Fraction(1, 10**9))
    assert float(total.epsilon) <= 1.0 + 1e-9
    # ...where pure epsilon would have stated the same 24 parts at epsilon 24 x their own.
    assert float(parts[0].epsilon) * 24 > 4


def test_pure_parts_count_as_epsilon_squared_over_two_in_a_zcdp_sum() -> None:
    total = PrivacyLoss.zcdp(0.01, 1e-7) + PrivacyLoss.of(0.1)
    assert total.rho == Fraction(1, 100) + Fraction(1, 200)


def test_the_ledger_counts_nano_rho_rounded_up_and_micro_epsilon_for_pure() -> None:
    assert PrivacyLoss.zcdp(Fraction(1, 3), 1e-7).ledger_amount == math.ceil(NANO / 3)
    assert PrivacyLoss.of(0.1).ledger_amount == 100_000


@pytest.mark.parametrize("delta", [0.0, -1e-9, 1e-6, float("nan")], ids=["zero", "negative", "too-large", "nan"])
def test_a_zcdp_dataset_needs_a_small_public_delta(delta: float) -> None:
    with pytest.raises(InvalidLoss, match=f"public delta in \\(0, {MAX_DELTA:g}\\]"):
        Accounting("zcdp", delta)


def test_each_accounting_chooses_its_noise_family() -> None:
    assert isinstance(PURE.additive(3, 0.1), LaplaceVector)
    assert isinstance(ZCDP.additive(3, 0.001), GaussianVector)
    assert ZCDP.additive(9, 0.001, l2_sensitivity=3.0).sensitivity == 3.0  # the smaller L2 sensitivity
    assert ZCDP.selection(2, 0.001).delta == 1e-7 and PURE.selection(2, 0.1).delta is None


def test_gaussian_releases_spread_at_their_scale() -> None:
    # 4,000 draws: the sample standard deviation is within 6% of the scale except with
    # probability ~1e-6; without noise it would be 0, at a doubled scale 2x.
    mechanism = GaussianVector.for_rho(1.0, 0.005, 1e-7)
    draws = mechanism.release([0] * 4000)
    assert statistics.pstdev(draws) == pytest.approx(mechanism.scale, rel=0.06)
    assert abs(statistics.fmean(draws)) < 4 * mechanism.scale / math.sqrt(4000)


def test_the_gaussian_accuracy_covers_its_noise() -> None:
    # 2,000 draws at alpha = 0.05: the share outside the half-width is 5% +- 1.5% (4 sigma, ~1e-4 flake).
    mechanism = GaussianVector.for_rho(1.0, 0.01, 1e-7)
    half = mechanism.accuracy(0.05)
    outside = sum(abs(x) > half for x in mechanism.release([0] * 2000)) / 2000
    assert outside <= 0.065


@pytest.mark.parametrize("scale", [64.5, 200.0, 5000.0])
def test_the_closed_form_gaussian_half_width_at_large_scales_is_a_true_bound(scale: float) -> None:
    # P(|X| > t) for the discrete Gaussian, summed directly over +-12 scales (the rest is < 1e-30).
    import numpy as np
    half = GaussianVector(1.0, scale, 1e-7).accuracy(0.05)
    k = np.arange(-int(12 * scale), int(12 * scale) + 1)
    weights = np.exp(-(k / scale) ** 2 / 2)
    outside = weights[np.abs(k) > half].sum() / weights.sum()
    assert outside <= 0.05 and half <= 1.01 * 1.96 * scale + 1
