"""What the engine returns: private answers and cost estimates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from civicdp.privacy.loss import PrivacyLoss


@dataclass
class Result:
    """A private answer: one row per cell with value and interval, and what it cost.

    Analyses that answer with more than one table (pairs and bundles, a report's
    parts) put the main one in ``table`` and the others, by name, in ``tables``.
    """

    table: pl.DataFrame
    loss: PrivacyLoss
    contributions: int
    confidence: float
    mechanisms: list[dict[str, Any]]
    spec: Any  # QuerySpec or AnalysisSpec
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)

    def to_pandas(self):  # noqa: ANN201 - pandas is optional at type level
        frame = self.table.to_pandas()
        frame.attrs.update({"epsilon": float(self.loss.epsilon), "delta": float(self.loss.delta),
                            "contributions": self.contributions, "confidence": self.confidence,
                            "tables": {name: t.to_pandas() for name, t in self.tables.items()}})
        return frame


@dataclass(frozen=True)
class Estimate:
    """Cost and predicted accuracy of a spec, computed without touching data."""

    loss: PrivacyLoss
    contributions: int | str
    confidence: float
    mechanisms: list[dict[str, Any]]
    accuracy: dict[str, Any]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.as_dict(), "contributions": self.contributions,
                "confidence": self.confidence, "mechanisms": self.mechanisms,
                "accuracy": self.accuracy, "notes": self.notes}
