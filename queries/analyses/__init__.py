"""Analyses beyond single aggregates; each registers itself in :data:`ANALYSES`."""

from __future__ import annotations

from civicdp.queries.analyses.base import ANALYSES, Analysis, AnalysisPlan, AnalysisSpec, register
from civicdp.queries.analyses import bundles  # noqa: F401 - registers "bundles" and "bundle_changes"
from civicdp.queries.analyses import lagged  # noqa: F401 - registers "lagged_points"
from civicdp.queries.analyses import scores  # noqa: F401 - registers "department_scores"
from civicdp.queries.analyses import performance  # noqa: F401 - registers "performance_report"

__all__ = ["ANALYSES", "Analysis", "AnalysisPlan", "AnalysisSpec", "register"]
