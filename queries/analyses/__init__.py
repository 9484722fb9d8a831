"""Analyses beyond single aggregates; each registers itself in :data:`ANALYSES`."""

from __future__ import annotations

from queries.analyses.base import ANALYSES, Analysis, AnalysisPlan, AnalysisSpec, register
from queries.analyses import bundles  # noqa: F401 - registers "bundles" and "bundle_changes"
from queries.analyses import lagged  # noqa: F401 - registers "lagged_points"
from queries.analyses import scores  # noqa: F401 - registers "department_scores"
from queries.analyses import performance  # noqa: F401 - registers "performance_report"

__all__ = ["ANALYSES", "Analysis", "AnalysisPlan", "AnalysisSpec", "register"]
