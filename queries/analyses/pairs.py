"""Pairs of catalogue items used by the same person within a time window, bounded per person.

This module is the data-touching half of bundle discovery, in plain Polars (OpenDP's
Polars API cannot express the per-person pair construction). It computes **exact**
counts over **bounded** data; the noise is added by the caller with OpenDP
mechanisms whose sensitivity is the bound (:mod:`civicdp.queries.analyses.bundles`).

The bounding rules, all public and each depending on one person's own rows only
(so adding or removing a person changes nobody else's contribution):

1. at most :data:`MAX_ROWS` rows per person are read (the first in the table's stable
   random order: the backend's ``bound`` without conditions); filters and the period
   apply to those rows;
2. a person's *pairs* are the distinct unordered pairs {a, b} of different catalogue
   items with a use of ``a`` and a use of ``b`` at most ``window`` apart (inclusive);
3. each person keeps at most ``max_pairs`` of their pairs, chosen by a hash of
   (person, pair): a person adds 1 to at most ``max_pairs`` pair counts, so the vector
   of all pair counts has L1 sensitivity ``max_pairs``. The bounds are nested (the pairs
   kept under k are those of hash rank at most k), so the counts under every candidate
   bound come from one pass (:func:`bounded_pair_counts_by_bound`);
4. for the per-item people counts, each person keeps at most ``max_items`` of their
   distinct items (same kind of hash choice) and counts once in the people total: L1
   sensitivity ``max_items + 1`` for the vector [items..., people].

Pairs are indexed over the public catalogue (``keys``): pair (i, j), i < j, of the
catalogue positions has index ``i * n - i * (i + 1) / 2 + (j - i - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import numpy as np
import polars as pl


#: Rows read per person (a public computational bound; the demo data has at most 1000).
MAX_ROWS = 1000
#: Time keys are ``seconds * _SLOTS + position``: unique per person, order-preserving.
_SLOTS = 2048  # must be at least 2 * MAX_ROWS - 1 (see person_pairs)
_PAIR_SEED = 0x9A1E5
_ITEM_SEED = 0x17E35

PERSON, ITEM, KEY, PAIR = "__person", "__item", "__time_key", "__pair"


@dataclass(frozen=True)
class PairSpace:
    """The public catalogue and its pairs."""

    keys: tuple[int | str | bool, ...]

    @property
    def n_items(self) -> int:
        return len(self.keys)

    @property
    def n_pairs(self) -> int:
        return self.n_items * (self.n_items - 1) // 2

    def index(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Compact index of pairs (i, j) with i < j (catalogue positions)."""
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        return i * self.n_items - i * (i + 1) // 2 + (j - i - 1)

    def members(self) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue positions (i, j) of every pair, in index order."""
        i, j = np.triu_indices(self.n_items, k=1)
        return i.astype(np.int64), j.astype(np.int64)


def person_events(rows: pl.LazyFrame, unit: str, item: str, time: str, space: PairSpace,
                  conditions: Sequence[pl.Expr], start: datetime, end: datetime) -> pl.LazyFrame:
    """A person's bounded, filtered uses: ``[__person, __item, __time_key]``, sorted by person and time.

    ``rows`` are the table's rows bounded to :data:`MAX_ROWS` per person before any filter
    (``backend.bound(backend.scan(...), ..., MAX_ROWS)``), ``conditions`` the analysis's
    filters as the backend's row conditions (``backend.row_condition``). Items outside the
    catalogue are dropped (the output never depends on which other values occur).
    """
    codes = pl.col(item).replace_strict(list(space.keys), list(range(space.n_items)), default=None,
                                        return_dtype=pl.Int32)
    conditions = [pl.col(time) >= start, pl.col(time) < end, *conditions]
    seconds = (pl.col(time) - pl.lit(start)).dt.total_seconds().cast(pl.Int64)
    events = (rows.filter(pl.all_horizontal(conditions))
              .select(pl.col(unit).alias(PERSON), codes.alias(ITEM), seconds.alias(KEY))
              .drop_nulls()
              .sort(PERSON, KEY))
    # events: [__person, __item, seconds since start]; at most MAX_ROWS per person, so the
    # position within the person fits below _SLOTS and makes every time key unique.
    position = pl.int_range(pl.len(), dtype=pl.Int64).over(PERSON)
    return events.with_columns(pl.col(KEY) * _SLOTS + position)


def person_pairs(events: pl.LazyFrame, window_seconds: int, space: PairSpace) -> pl.LazyFrame:
    """Each person's distinct pairs within the window: ``[__person, __pair]`` (compact index).

    A rolling window over the time keys ending at each use collects the items used at
    most ``window_seconds`` before it. Keys are ``s * SLOTS + p`` with positions
    ``p < MAX_ROWS``: for two uses with ``d`` whole seconds between them the key gap lies
    within ``d * SLOTS ± (MAX_ROWS - 1)``, so a window of ``window * SLOTS + MAX_ROWS``
    units holds exactly the uses with ``d <= window`` (as ``SLOTS >= 2 * MAX_ROWS - 1``).
    """
    span = window_seconds * _SLOTS + MAX_ROWS
    windows = events.rolling(index_column=KEY, period=f"{span}i", group_by=PERSON).agg(
        pl.col(ITEM).alias("__window"))
    # windows: [__person, __time_key, __window]; the use itself is the last in its window
    other = pl.col("__window")
    pairs = (windows.with_columns(pl.col("__window").list.last().alias(ITEM))
             .explode("__window")
             .filter(other != pl.col(ITEM)))
    low = pl.min_horizontal(ITEM, "__window").cast(pl.Int64)
    high = pl.max_horizontal(ITEM, "__window").cast(pl.Int64)
    index = low * space.n_items - low * (low + 1) // 2 + (high - low - 1)
    # pairs: [__person, __pair], each distinct pair of a person once
    return pairs.select(PERSON, index.alias(PAIR)).unique()


def _rank_per_person(column: str, seed: int) -> pl.Expr:
    """1, 2, ... within each person, in the order of a hash of (person, value): stable per person."""
    return pl.struct(PERSON, column).hash(seed=seed).rank("ordinal").over(PERSON)


def _keep_per_person(frame: pl.DataFrame, column: str, limit: int, seed: int) -> pl.DataFrame:
    """At most ``limit`` rows per person, chosen by a hash of (person, value): stable per person."""
    return frame.filter(_rank_per_person(column, seed) <= limit)


def pairs_per_person(pairs: list[pl.DataFrame], limit: int) -> np.ndarray:
    """``people[n]``: people with n pairs, n = 0..limit (the last entry: limit or more).

    With several periods a person's number is their largest over the periods, so each
    person is still counted once.
    """
    per_period = [p.group_by(PERSON).len() for p in pairs]
    per_person = pl.concat(per_period).group_by(PERSON).agg(pl.col("len").max())["len"]
    return np.bincount(np.minimum(per_person.to_numpy().astype(np.int64), limit), minlength=limit + 1)


def bounded_pair_counts(pairs: pl.DataFrame, space: PairSpace, max_pairs: int) -> np.ndarray:
    """People per pair, each person counted in at most ``max_pairs`` pairs (exact)."""
    kept = _keep_per_person(pairs, PAIR, max_pairs, _PAIR_SEED)
    return np.bincount(kept[PAIR].to_numpy(), minlength=space.n_pairs).astype(np.int64)


def bounded_pair_counts_by_bound(pairs: pl.DataFrame, space: PairSpace, bounds: list[int]) -> np.ndarray:
    """People per pair under every bound at once: column j is ``bounded_pair_counts(pairs, space, bounds[j])``.

    A person keeps the pairs of hash rank at most the bound, so one pass suffices: each
    person-pair falls in the bucket of the smallest bound at or above its rank (ranks
    above the largest bound are dropped), pairs are counted by (pair, bucket), and the
    counts are cumulated over the buckets. ``bounds`` must be increasing.
    """
    edges = np.asarray(bounds, dtype=np.int64)
    if edges.size == 0 or edges[0] < 1 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bounds must be positive and increasing, got {bounds}")
    # ranked: [__pair, __rank], rank 1.. within each person (the order bounded_pair_counts keeps)
    ranked = (pairs.select(PAIR, _rank_per_person(PAIR, _PAIR_SEED).alias("__rank"))
              .filter(pl.col("__rank") <= int(edges[-1])))
    bucket_of_rank = np.searchsorted(edges, np.arange(1, edges[-1] + 1))  # rank r -> index of bound >= r
    buckets = bucket_of_rank[ranked["__rank"].to_numpy().astype(np.int64) - 1]
    cells = ranked[PAIR].to_numpy().astype(np.int64) * edges.size + buckets
    counts = np.bincount(cells, minlength=space.n_pairs * edges.size).reshape(space.n_pairs, edges.size)
    return np.cumsum(counts, axis=1)


def bounded_item_counts(events: pl.DataFrame, space: PairSpace, max_items: int) -> tuple[np.ndarray, int]:
    """People per item (at most ``max_items`` items per person) and the number of people (exact)."""
    distinct = events.select(PERSON, ITEM).unique()
    kept = _keep_per_person(distinct, ITEM, max_items, _ITEM_SEED)
    counts = np.bincount(kept[ITEM].to_numpy(), minlength=space.n_items).astype(np.int64)
    return counts, int(distinct[PERSON].n_unique())
