"""The engine: plan any request (cost and accuracy, no data), then run it privately.

Request flow inside the engine: parse the request document → an aggregate query is
planned by :mod:`civicdp.queries.query_plan` (validate against the metadata, calibrate
the kind's OpenDP mechanisms, plan the private choice of an "auto" contribution bound),
a named analysis by its own planner (:mod:`civicdp.queries.analyses`) → either plan runs
against the backend: exact bounded aggregates, then noise and intervals. ``plan`` and
``estimate`` never read the data. Charging a budget is the caller's job (the server
charges in the same transaction as the audit entry, before the answer leaves); the
``before_release`` hook lets it run after the cost is fixed and before any noise is
drawn or data read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from civicdp.queries.analyses import ANALYSES, AnalysisPlan, AnalysisSpec
from civicdp.queries.backend import Backend
from civicdp.queries.context import EngineLimits
from civicdp.queries.errors import QueryError, dataset_unavailable
from civicdp.queries.metadata import DatasetMetadata, load_metadata
from civicdp.queries.polars_backend import PolarsBackend
from civicdp.queries.query_plan import Plan, check_maximum, plan_query
from civicdp.queries.request import parse_request
from civicdp.queries.results import Estimate, Result
from civicdp.queries.spark_routing import DatasetBackends, check_supported

__all__ = ["AnalysisPlan", "Engine", "Estimate", "LocalDataset", "Plan", "Result"]


class Engine:
    """Plans and runs private queries over one backend."""

    def __init__(self, backend: Backend | None = None, limits: EngineLimits | None = None) -> None:
        self.backend = backend or PolarsBackend()
        self.limits = limits or EngineLimits()
        # Plans run on their dataset's declared engine: this backend, or Spark for "engine": "spark".
        self.routed = DatasetBackends(self.backend)

    def plan(self, spec: Any, metadata: DatasetMetadata, dataset_dir: Path,
             budget: float | None = None) -> Plan | AnalysisPlan:
        """Validate and calibrate ``spec``; ``budget`` (in the dataset's unit) overrides what an
        aggregate query's epsilon buys, for callers that split one budget over several queries."""
        request = parse_request(spec)
        if isinstance(request, AnalysisSpec):
            check_supported(self.routed, metadata, request.analysis)
            analysis_plan = ANALYSES[request.analysis].plan(request, metadata, Path(dataset_dir), self.limits)
            check_maximum(analysis_plan.loss, self.limits)
            return analysis_plan
        return plan_query(request, metadata, dataset_dir, self.limits, budget)

    def estimate(self, spec: Any, metadata: DatasetMetadata, dataset_dir: Path) -> Estimate:
        return self.describe(self.plan(spec, metadata, dataset_dir))

    def describe(self, plan: Plan | AnalysisPlan) -> Estimate:
        """Cost and predicted accuracy of a plan, without reading data."""
        return plan.describe()

    def run(self, spec: Any, metadata: DatasetMetadata, dataset_dir: Path,
            before_release: Callable[[Plan | AnalysisPlan], None] | None = None) -> Result:
        return self.execute(self.plan(spec, metadata, dataset_dir), before_release)

    def execute(self, plan: Plan | AnalysisPlan,
                before_release: Callable[[Plan | AnalysisPlan], None] | None = None) -> Result:
        """Read the data, add the noise, attach intervals: the private answer to a plan."""
        started = time.perf_counter()
        if before_release is not None:
            before_release(plan)  # e.g. charge the budget; raising stops here, before any noise
        if isinstance(plan, AnalysisPlan):
            try:
                result = plan.execute(self.routed)
            except QueryError:
                raise
            except Exception:
                # The library's message is not shown: it could quote values from the data.
                raise dataset_unavailable(None) from None
        else:
            result = plan.execute(self.routed)  # its backend errors are already the fixed text
        result.seconds = time.perf_counter() - started
        return result


class LocalDataset:
    """A dataset folder (Parquet files plus metadata.json) queried in-process."""

    def __init__(self, path: Path, engine: Engine | None = None) -> None:
        self.path = Path(path)
        self.metadata = load_metadata(self.path)
        self.engine = engine or Engine()

    def estimate(self, spec: Any) -> Estimate:
        return self.engine.estimate(spec, self.metadata, self.path)

    def run(self, spec: Any) -> Result:
        return self.engine.run(spec, self.metadata, self.path)
