"""Analyses: ready-made private questions that go beyond one aggregate.

A kind (:mod:`civicdp.queries.kinds`) answers one aggregate per cell. An analysis — bundle
discovery, a performance report, lagged points — reads the data its own way, may
combine several mechanisms, and may answer with several tables. It plugs into the
same request flow: plan (loss known, no data read) → authorise on the columns it
reads → charge → execute. A spec names it with ``"analysis": "<name>"``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from pydantic import Field, field_validator

from civicdp.privacy.loss import PrivacyLoss
from civicdp.queries.backend import Backend
from civicdp.queries.context import EngineLimits
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.results import Estimate, Result
from civicdp.queries.spec import CanonicalSpec, no_booleans


class AnalysisSpec(CanonicalSpec):
    """Fields every analysis spec has; subclasses add their own (unknown fields are refused)."""

    analysis: str
    dataset: str | None = None
    epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    confidence: float = Field(default=0.95, gt=0, lt=1)

    _no_booleans = field_validator("epsilon", "confidence", mode="before")(no_booleans)


class AnalysisPlan(ABC):
    """A validated analysis with its exact cost, made without reading data."""

    spec: AnalysisSpec

    @property
    @abstractmethod
    def loss(self) -> PrivacyLoss:
        """The total privacy loss of executing this plan."""

    @abstractmethod
    def columns(self) -> set[str]:
        """Every column the analysis reads (what authorisation checks)."""

    @abstractmethod
    def describe(self) -> Estimate:
        """Cost and predicted accuracy, without reading data."""

    @abstractmethod
    def execute(self, backend: Backend) -> Result:
        """Read the data, add the noise: the private answer (main table plus named tables)."""


class Analysis(ABC):
    """One registered analysis: its spec model and how to plan it."""

    name: str
    spec_model: type[AnalysisSpec]

    @abstractmethod
    def plan(self, spec: AnalysisSpec, metadata: DatasetMetadata, dataset_dir: Path,
             limits: EngineLimits) -> AnalysisPlan:
        """Validate ``spec`` against the metadata (raise QueryError) and fix its cost."""


ANALYSES: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    ANALYSES[analysis.name] = analysis
    return analysis
