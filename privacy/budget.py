"""A privacy budget as an immutable value that refuses to be overspent."""

from __future__ import annotations

from dataclasses import dataclass, field

from civicdp.privacy.errors import BudgetExhausted, InvalidLoss
from civicdp.privacy.loss import PrivacyLoss


@dataclass(frozen=True)
class Budget:
    """A cap on total privacy loss and what has been spent against it."""

    cap: PrivacyLoss
    spent: PrivacyLoss = field(default_factory=PrivacyLoss.zero)
    scope: str = "budget"

    def __post_init__(self) -> None:
        if self.spent.epsilon > self.cap.epsilon or self.spent.delta > self.cap.delta:
            raise InvalidLoss(f"spent {self.spent} exceeds the cap {self.cap} of {self.scope}")

    @property
    def remaining(self) -> PrivacyLoss:
        return PrivacyLoss(self.cap.epsilon - self.spent.epsilon, self.cap.delta - self.spent.delta)

    def can_spend(self, loss: PrivacyLoss) -> bool:
        after = self.spent + loss
        return after.epsilon <= self.cap.epsilon and after.delta <= self.cap.delta

    def spend(self, loss: PrivacyLoss) -> Budget:
        """The budget after spending ``loss``; raises :class:`BudgetExhausted` if it does not fit."""
        if loss.epsilon <= 0 and loss.delta <= 0:
            raise InvalidLoss("a spend must be a positive privacy loss", value=loss)
        if not self.can_spend(loss):
            raise BudgetExhausted(
                requested=loss.epsilon, remaining=self.remaining.epsilon, scope=self.scope
            )
        return Budget(cap=self.cap, spent=self.spent + loss, scope=self.scope)
