"""Work a plan does once for several parts: merged quantile levels, and roll-ups along the catalogue.

- **Quantile levels** of one column, grouping, filters and bounds are one query: each level
  keeps its own selection, and all share one tree of counts for their intervals (separate
  queries would each pay for a tree).
- **Roll-ups**: a count grouped by a column the public catalogue maps from another (the
  catalogue's ``department`` of each ``service_id``) is the sum of the finer count's cells
  — post-processing, free — when the summed noise meets the part's target. Its interval is
  computed from the noise alone (:func:`civicdp.privacy.accuracy.sum_tail_threshold`: the
  exact tail of a sum of ``k`` independent noises), so it covers at the stated confidence.
  Each coarse key counts the events of the services the catalogue puts under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from civicdp.privacy.accuracy import sum_tail_threshold
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.spec import QuerySpec


def merge_key(spec: QuerySpec) -> str | None:
    """Parts with equal keys are answered by one query (quantiles: every level in one), else None."""
    if spec.aggregate != "quantiles":
        return None
    shared = spec.model_copy(update={"quantiles": None, "confidence": 0.5, "epsilon": None, "accuracy": None})
    return shared.canonical()


@dataclass(frozen=True)
class RollUp:
    """How a coarse count is summed from a fine one: ``members[key]`` lists the fine keys under each coarse key."""

    fine_column: str
    coarse_column: str
    members: dict[object, tuple[object, ...]]

    @property
    def widest(self) -> int:
        return max((len(v) for v in self.members.values()), default=0)


def rollup_of(coarse: QuerySpec, fine: QuerySpec, metadata: DatasetMetadata, dataset_dir: Path) -> RollUp | None:
    """The roll-up answering ``coarse`` from ``fine`` (both counts), or None when it does not.

    Both must count the same rows (table, column, filters, contribution bound) grouped by
    one column each, the catalogue naming both columns and mapping each fine key to one
    coarse key, and every public key of ``coarse`` being a catalogue value.
    """
    if coarse.aggregate != "count" or fine.aggregate != "count" or len(coarse.group_by) != 1 \
            or len(fine.group_by) != 1 or coarse.group_by == fine.group_by:
        return None
    same = ("table", "column", "filters", "contributions")
    if any(getattr(coarse, f) != getattr(fine, f) for f in same) or ":" in coarse.group_by[0] + fine.group_by[0]:
        return None
    fine_col, coarse_col = fine.group_by[0], coarse.group_by[0]
    table = metadata.tables.get(coarse.table)
    declared = (metadata.catalogue or {}).get("path")
    if table is None or not isinstance(declared, str) or coarse_col not in table.columns or fine_col not in table.columns:
        return None
    fine_keys, coarse_keys = table.columns[fine_col].keys, table.columns[coarse_col].keys
    if not fine_keys or not coarse_keys or coarse.filters:
        return None
    try:
        frame = pl.read_parquet(Path(dataset_dir) / declared)  # public: reading it costs no privacy
    except (OSError, pl.exceptions.PolarsError):
        return None
    if fine_col not in frame.columns or coarse_col not in frame.columns:
        return None
    pairs = frame.select(fine_col, coarse_col).unique()
    if pairs[fine_col].n_unique() != pairs.height:
        return None  # a fine key under two coarse keys: not a hierarchy
    lookup = dict(zip(pairs[fine_col].to_list(), pairs[coarse_col].to_list()))
    if any(k not in lookup for k in fine_keys):
        return None  # a fine key the catalogue does not place
    members = {key: tuple(k for k in fine_keys if lookup[k] == key) for key in coarse_keys}
    return RollUp(fine_col, coarse_col, members)


def noise_family(mechanism: object) -> str:
    if isinstance(mechanism, GaussianVector):
        return "gaussian"
    if isinstance(mechanism, LaplaceVector):
        return "laplace"
    raise QueryError("plan", "a roll-up needs additive noise on its counts", "")


def rollup_half_width(mechanism: object, members: int, alpha: float) -> float:
    """Half-width of a sum of ``members`` cells' noises at confidence 1 - alpha (two-sided, exact tails)."""
    if members <= 0:
        return 0.0
    if members == 1:
        return float(mechanism.accuracy(alpha))  # type: ignore[attr-defined]
    scale = float(mechanism.scale)  # type: ignore[attr-defined]
    return float(sum_tail_threshold(noise_family(mechanism), scale, (1, 1), (members, 0), alpha / 2))


def release_rollup(fine: pl.DataFrame, rollup: RollUp, mechanism: object, alpha: float) -> pl.DataFrame:
    """The coarse counts summed from a released fine table [fine_column, value, ...], with their intervals."""
    values = dict(zip(fine[rollup.fine_column].to_list(), fine["value"].to_list()))
    keys, totals, halves = [], [], []
    for key, members in rollup.members.items():
        keys.append(key)
        totals.append(int(np.sum([values[k] for k in members], dtype=np.int64)) if members else 0)
        halves.append(rollup_half_width(mechanism, len(members), alpha))
    value = np.asarray(totals, dtype=np.int64)
    half = np.asarray(halves, dtype=np.float64)
    return pl.DataFrame({rollup.coarse_column: keys, "value": value, "ci_low": value - half,
                         "ci_high": value + half}, strict=False)
