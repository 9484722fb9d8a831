"""Errors of the privacy package.

Tree::

    PrivacyError
    ├── InvalidLoss       a privacy loss that is not finite, not positive, or too large
    └── BudgetExhausted   a spend that does not fit what remains of a budget
"""

from __future__ import annotations

from fractions import Fraction


class PrivacyError(Exception):
    """Base of every error raised by :mod:`privacy`."""


class InvalidLoss(PrivacyError, ValueError):
    """A privacy loss value that cannot be accepted."""

    def __init__(self, message: str, *, value: object = None) -> None:
        super().__init__(message)
        self.value = value


class BudgetExhausted(PrivacyError):
    """A spend that would take a budget beyond its cap."""

    def __init__(self, *, requested: Fraction, remaining: Fraction, scope: str = "budget") -> None:
        self.requested = requested
        self.remaining = remaining
        self.scope = scope
        super().__init__(
            f"Cannot answer without exceeding the remaining {scope} of epsilon "
            f"{float(remaining):.6g}; this query needs {float(requested):.6g}. "
            "Ask with a smaller privacy loss, or wait until the budget renews."
        )
