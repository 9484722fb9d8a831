"""What bundle discovery is asked: its two specs, and the setting they resolve to (no data read).

``bundles`` asks about one period, ``bundle_changes`` compares a baseline period with a
later one; both name the table, the item column (whose public keys are the catalogue),
the time column, the window and the filters. :func:`resolve_setting` validates all of it
against the public metadata, everything but the privacy parameters (which
:mod:`civicdp.queries.analyses.bundles` calibrates), and reads no data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from civicdp.queries.analyses.base import AnalysisSpec
from civicdp.queries.analyses.pairs import PairSpace
from civicdp.queries.backend import RowFilter, person_column
from civicdp.queries.context import EngineLimits, resolve
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.spec import Filter, QuerySpec

DEFAULT_TOP_K = 50
MAX_TOP_K = 1000
MAX_WINDOW_DAYS = 366
MAX_CATALOGUE_PAIRS = 200_000  # noise for every pair: ~11 µs each with OpenDP's exact sampler


class Period(BaseModel):
    """A time range ``[start, end)`` (end excluded)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: datetime
    end: datetime


class _BundleFields(AnalysisSpec):
    table: str = "events"
    item: str = "service_id"
    time: str = "request_time"
    window_days: int = 30
    top_k: int | None = None  # default: 50, or every pair of a smaller catalogue
    filters: tuple[Filter, ...] = ()
    accuracy: float | None = None
    max_pairs: int | Literal["auto"] = "auto"
    max_pairs_rule: Literal["quantile", "top_pairs"] = "top_pairs"  # how "auto" chooses
    pairs_quantile: float = 0.9  # for the "quantile" rule
    max_items: int | None = None
    min_confidence: float = 0.2
    max_bundle_size: int = 4

    @field_validator("window_days", "top_k", "accuracy", "max_pairs", "pairs_quantile", "max_items",
                     "min_confidence", "max_bundle_size", mode="before")
    @classmethod
    def _no_flags(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        return value


class BundlesSpec(_BundleFields):
    """Top pairs and bundles in one period (default: the time column's whole declared period)."""

    analysis: Literal["bundles"]
    period: Period | None = None


class BundleChangesSpec(_BundleFields):
    """Pairs and bundles of ``period`` compared with those of ``baseline``."""

    analysis: Literal["bundle_changes"]
    baseline: Period
    period: Period

    @field_validator("analysis", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return "bundle_changes" if value == "bundle-changes" else value


@dataclass(frozen=True)
class Setting:
    """What both analyses resolve from a spec and the metadata (no data read)."""

    metadata: DatasetMetadata
    dataset_dir: Path
    table: str
    unit: str
    item: str
    time: str
    space: PairSpace
    filters: tuple[RowFilter, ...]
    periods: tuple[tuple[datetime, datetime], ...]
    window_seconds: int
    top_k: int
    max_items: int
    alpha: float


def resolve_setting(spec: BundlesSpec | BundleChangesSpec, metadata: DatasetMetadata, dataset_dir: Path,
                    limits: EngineLimits) -> Setting:
    """Validate everything but the privacy parameters, from the spec and the public metadata only."""
    if spec.dataset is not None and spec.dataset != metadata.name:
        raise QueryError("dataset", f"this dataset is '{metadata.name}', not '{spec.dataset}'",
                         "Name the dataset you are querying, or leave 'dataset' out")
    table = metadata.tables.get(spec.table)
    if table is None:
        raise QueryError("table", f"no table '{spec.table}'", f"Use one of {sorted(metadata.tables)}")
    item = table.columns.get(spec.item)
    if item is None or item.identifier or spec.item == metadata.privacy_unit or item.keys is None:
        problem = (f"unknown column '{spec.item}'" if item is None else
                   f"'{spec.item}' has no public key set (a catalogue)" if item.keys is None and not item.identifier
                   else f"'{spec.item}' is an identifier")
        raise QueryError("item", problem, "Name a column whose public keys are the catalogue, e.g. 'service_id'")
    time = table.columns.get(spec.time)
    if time is None or time.type != "datetime":
        raise QueryError("time", f"'{spec.time}' is not a time column of table '{spec.table}'",
                         "Name a datetime column, e.g. 'request_time'")
    space = PairSpace(tuple(item.keys))
    if space.n_items < 2:
        raise QueryError("item", f"'{spec.item}' has fewer than two keys, so it has no pairs",
                         "Name a column with a catalogue of at least two items")
    if space.n_pairs > MAX_CATALOGUE_PAIRS:
        raise QueryError("item", f"a catalogue of {space.n_items} items has {space.n_pairs:,} pairs, more than "
                         f"the {MAX_CATALOGUE_PAIRS:,} allowed", "Name a column with a smaller catalogue")
    for index, spec_filter in enumerate(spec.filters):
        if spec_filter.column == spec.time:
            raise QueryError(f"filters.{index}", f"'{spec.time}' is the time column of the analysis",
                             "Give the time range as 'period' instead")
    # Reuse the aggregate queries' validation of filters (keys, types, buckets).
    probe = QuerySpec(table=spec.table, aggregate="count", filters=spec.filters, epsilon=limits.max_epsilon)
    filters = resolve(probe, metadata, dataset_dir, limits).filters
    bounds = tuple(_naive(b) for b in time.bounds)  # type: ignore[union-attr]
    if isinstance(spec, BundleChangesSpec):
        periods = (_period("baseline", spec.baseline, bounds), _period("period", spec.period, bounds))
    else:
        periods = (_period("period", spec.period, bounds) if spec.period else bounds,)
    if not 1 <= spec.window_days <= MAX_WINDOW_DAYS:
        raise QueryError("window_days", f"must be between 1 and {MAX_WINDOW_DAYS} days, got {spec.window_days}",
                         "Use e.g. 30")
    for name, (start, end) in zip(("baseline", "period") if len(periods) > 1 else ("period",), periods):
        length = math.ceil((end - start) / timedelta(days=1))
        if spec.window_days > length:
            raise QueryError("window_days", f"the window ({spec.window_days} days) is longer than the {name} "
                             f"({length} days)", f"Use a window of at most {length} days, or a longer {name}")
    top_k = min(DEFAULT_TOP_K, space.n_pairs) if spec.top_k is None else spec.top_k
    if not 1 <= top_k <= min(MAX_TOP_K, space.n_pairs):
        raise QueryError("top_k", f"must be between 1 and {min(MAX_TOP_K, space.n_pairs)} (the catalogue has "
                         f"{space.n_pairs:,} pairs), got {top_k}",
                         f"Ask for at most {min(MAX_TOP_K, space.n_pairs)} pairs")
    max_items = min(metadata.row_limit(spec.table), space.n_items) if spec.max_items is None else spec.max_items
    if not 1 <= max_items <= space.n_items:
        raise QueryError("max_items", f"must be between 1 and {space.n_items} (the catalogue's size), "
                         f"got {max_items}", "Give the number of distinct items counted per person")
    return Setting(metadata, dataset_dir, spec.table, person_column(metadata, spec.table), spec.item, spec.time,
                   space, filters, periods, spec.window_days * 86400, top_k, max_items, 1 - spec.confidence)


def _naive(moment: object) -> datetime:
    return _utc(moment if isinstance(moment, datetime) else datetime.fromisoformat(str(moment)))


def _period(name: str, period: Period, bounds: tuple[datetime, datetime]) -> tuple[datetime, datetime]:
    """A period clamped to the declared bounds; refused if empty or outside them."""
    start, end = _utc(period.start), _utc(period.end)
    if start >= end:
        raise QueryError(name, f"starts ({start}) at or after it ends ({end})", "Give a start before the end")
    if start >= bounds[1] or end <= bounds[0]:
        raise QueryError(name, f"lies outside the dataset's period {bounds[0]} to {bounds[1]}",
                         "Choose a period inside the dataset's period")
    return max(start, bounds[0]), min(end, bounds[1])


def _utc(moment: datetime) -> datetime:
    """Stored times are naive UTC; an aware time is converted, not just stripped."""
    offset = moment.utcoffset()
    return moment if offset is None else (moment - offset).replace(tzinfo=None)
