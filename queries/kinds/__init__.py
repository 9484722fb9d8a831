"""Query kinds. Each registers itself with :data:`KINDS` the way a third-party kind would.

A kind turns a validated :class:`~civicdp.queries.context.QueryContext` into: a calibration
(its OpenDP mechanisms and their privacy loss, computed before any data is read),
the :class:`~civicdp.queries.backend.Measure` the backend must compute, and the released
table (value and interval per cell) from the exact bounded aggregates.
"""

from __future__ import annotations

from civicdp.queries.kinds.base import KINDS, Calibration, Kind, register

# Built-in kinds register themselves on import.
from civicdp.queries.kinds import counting, statistics, quantiles  # noqa: E402,F401

__all__ = ["KINDS", "Calibration", "Kind", "register"]
