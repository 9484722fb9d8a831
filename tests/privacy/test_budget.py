"""Privacy losses as exact values, and budgets that are never overspent."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from civicdp.privacy.budget import Budget
from civicdp.privacy.errors import BudgetExhausted, InvalidLoss
from civicdp.privacy.loss import MICRO, PrivacyLoss, compose


# -- exact arithmetic ------------------------------------------------------------------


@pytest.mark.parametrize("tenth, three_tenths", [
    ("0.1", "0.3"),
    (Fraction(1, 10), Fraction(3, 10)),
    (0.1, 0.3),  # what a JSON spec or an OpenDP privacy map hands over
], ids=["decimal-text", "fraction", "float"])
def test_three_tenths_add_up_exactly(tenth: object, three_tenths: object) -> None:
    """0.1 + 0.1 + 0.1 == 0.3 exactly, as the loss module promises."""
    one = PrivacyLoss.of(tenth)
    assert one + one + one == PrivacyLoss.of(three_tenths)
    assert compose([one, one, one]).epsilon == PrivacyLoss.of(three_tenths).epsilon


@pytest.mark.parametrize("value", ["0.1", 0.25, 3, Fraction(2, 7)], ids=["text", "float", "int", "fraction"])
def test_losses_are_stored_as_fractions(value: object) -> None:
    """Every accepted epsilon is kept as an exact Fraction, never as a float."""
    loss = PrivacyLoss.of(value)
    assert type(loss.epsilon) is Fraction
    assert type(loss.delta) is Fraction
    assert loss.delta == 0


@pytest.mark.parametrize("epsilon, micro", [
    ("0.1", 100_000),
    ("0.0000001", 1),  # a tenth of a micro-epsilon is charged as a whole one
    (Fraction(1, 3), 333_334),
    ("2", 2_000_000),
    (Fraction(1, MICRO) + Fraction(1, 10 ** 12), 2),
], ids=["tenth", "sub-micro", "third", "whole", "just-above-one-micro"])
def test_micro_epsilon_rounds_up(epsilon: object, micro: int) -> None:
    """The ledger unit never under-counts: micro-epsilons are rounded up, exact ones kept."""
    assert PrivacyLoss.of(epsilon).micro_epsilon == micro


def test_micro_epsilon_of_a_float_tenth_is_not_overcharged() -> None:
    """A spec's epsilon 0.1 costs 100000 micro-epsilons, so ten of them fit a cap of 1."""
    assert PrivacyLoss.of(0.1).micro_epsilon == 100_000


# -- invalid losses ---------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    (0, "greater than 0"),
    (0.0, "greater than 0"),
    (-1, "greater than 0"),
    ("-0.5", "greater than 0"),
    (float("nan"), "finite"),
    (float("inf"), "finite"),
    (float("-inf"), "finite"),
    ("abc", "must be a number"),
    ("nan", "must be a number"),
    ("", "must be a number"),
    (True, "must be a number"),
    (False, "must be a number"),
    (None, "must be a number"),
    ([0.1], "must be a number"),
], ids=["zero", "zero-float", "negative", "negative-text", "nan", "inf", "minus-inf", "text",
        "nan-text", "empty-text", "true", "false", "none", "list"])
def test_invalid_epsilons_are_refused(value: object, message: str) -> None:
    """Zero, negative, non-finite and non-numeric losses raise InvalidLoss with a reason."""
    with pytest.raises(InvalidLoss, match=message):
        PrivacyLoss.of(value)


def test_epsilon_above_the_configured_maximum_is_refused() -> None:
    """``of(..., maximum=)`` enforces an operator's per-query cap."""
    assert PrivacyLoss.of(1, maximum=1.0).epsilon == 1
    with pytest.raises(InvalidLoss, match="above the configured maximum"):
        PrivacyLoss.of("1.000001", maximum=1.0)


@pytest.mark.parametrize("epsilon, delta, message", [
    (-1, 0, "must not be negative"),
    (1, -0.1, r"delta must be in \[0, 1\)"),
    (1, 1, r"delta must be in \[0, 1\)"),
    (float("nan"), 0, "must be finite"),
    (1, float("inf"), "must be finite"),
], ids=["negative-epsilon", "negative-delta", "delta-one", "nan-epsilon", "inf-delta"])
def test_invalid_raw_losses_are_refused(epsilon: object, delta: object, message: str) -> None:
    """The constructor itself refuses negative, non-finite or out-of-range values."""
    with pytest.raises(InvalidLoss, match=message):
        PrivacyLoss(epsilon, delta)  # type: ignore[arg-type]


# -- budgets ---------------------------------------------------------------------------


def test_budget_cannot_be_built_overspent() -> None:
    """A budget whose spent exceeds its cap (so remaining would be negative) cannot exist."""
    with pytest.raises(InvalidLoss, match="exceeds the cap"):
        Budget(cap=PrivacyLoss.of(1), spent=PrivacyLoss.of(2))


def test_spending_nothing_is_refused() -> None:
    """A zero spend is an error, not a silent no-op that could hide a skipped charge."""
    with pytest.raises(InvalidLoss, match="must be a positive privacy loss"):
        Budget(cap=PrivacyLoss.of(1)).spend(PrivacyLoss.zero())


@pytest.mark.parametrize("tenth, cap", [
    ("0.1", "0.3"),
    (0.1, 0.3),
], ids=["decimal-text", "float"])
def test_three_tenths_fit_a_cap_of_three_tenths_and_a_fourth_does_not(tenth: object, cap: object) -> None:
    """Exactly three spends of 0.1 fit a cap of 0.3; the fourth is refused and changes nothing."""
    budget = Budget(cap=PrivacyLoss.of(cap), scope="analyst budget")
    for _ in range(3):
        budget = budget.spend(PrivacyLoss.of(tenth))
    assert budget.remaining.epsilon == 0
    with pytest.raises(BudgetExhausted, match="exceeding the remaining analyst budget") as refused:
        budget.spend(PrivacyLoss.of(tenth))
    assert refused.value.remaining == 0
    assert budget.spent == PrivacyLoss.of(cap)


def test_refusal_names_what_was_asked_and_what_remains() -> None:
    """The refusal message is actionable: it states the request and the remaining budget."""
    budget = Budget(cap=PrivacyLoss.of("1")).spend(PrivacyLoss.of("0.75"))
    with pytest.raises(BudgetExhausted, match=r"remaining budget of epsilon 0\.25; this query needs 0\.5"):
        budget.spend(PrivacyLoss.of("0.5"))


def test_budget_is_immutable() -> None:
    """Spending returns a new budget; the original still shows what it had."""
    before = Budget(cap=PrivacyLoss.of(1))
    after = before.spend(PrivacyLoss.of("0.4"))
    assert before.spent == PrivacyLoss.zero()
    assert after.spent == PrivacyLoss.of("0.4")
    with pytest.raises(AttributeError, match="cannot assign"):
        after.spent = PrivacyLoss.zero()  # type: ignore[misc]


_spends = st.one_of(
    st.floats(min_value=1e-12, max_value=2.0, allow_nan=False, allow_infinity=False),
    st.floats(min_value=1e3, max_value=1e300, allow_nan=False, allow_infinity=False),  # huge
    st.fractions(min_value=Fraction(1, 10 ** 9), max_value=3).filter(lambda f: f > 0),
)


@settings(max_examples=300, deadline=None)
@given(cap=st.floats(min_value=1e-6, max_value=50, allow_nan=False, allow_infinity=False),
       spends=st.lists(_spends, max_size=40))
def test_any_sequence_of_spends_never_overspends(cap: float, spends: list[object]) -> None:
    """Whatever is asked, spent <= cap; refusals change nothing; accepted spends sum exactly."""
    budget = Budget(cap=PrivacyLoss.of(cap))
    accepted = Fraction(0)
    for amount in spends:
        loss = PrivacyLoss.of(amount)
        fits = accepted + loss.epsilon <= budget.cap.epsilon
        before = budget
        if fits:
            budget = budget.spend(loss)
            accepted += loss.epsilon
        else:
            with pytest.raises(BudgetExhausted, match="exceeding the remaining"):
                budget.spend(loss)
            assert budget == before
        assert budget.spent.epsilon == accepted
        assert budget.spent.epsilon <= budget.cap.epsilon
        assert budget.remaining.epsilon >= 0
