"""Analyses beyond single aggregates; each registers itself in :data:`ANALYSES`."""

from __future__ import annotations

from queries.analyses.base import ANALYSES, Analysis, AnalysisPlan, AnalysisSpec, register
from queries.analyses import bundles  # noqa: F401 - registers "bundles" and "bundle_changes"

__all__ = ["ANALYSES", "Analysis", "AnalysisPlan", "AnalysisSpec", "register"]
