"""Contribution bounding in the Polars backend: filter first, then keep L rows per person.

The fast path re-ranks filtered rows by runs over a cache sorted by person and rank;
here it is compared with a plain reference (eager filter, rank over person) on data
where filtering changes which rows each person keeps.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from civicdp.queries.backend import AggregateRequest, Measure, RowFilter
from civicdp.queries.polars_backend import RANK
from tests.conftest import MakeDataset, base_metadata, events_frame


def _heavy_frame() -> pl.DataFrame:
    """300 people with 1 to 30 events each, channels mixed within each person."""
    rng = np.random.default_rng(11)
    counts = rng.integers(1, 31, 300)
    frame = events_frame(people=int(counts.sum()), seed=5).head(int(counts.sum()))
    return frame.with_columns(
        pl.Series("person_id", np.repeat(np.arange(300), counts).astype(np.int64)),
        pl.Series("event_id", rng.permutation(len(frame)).astype(np.int64)),
    )


@pytest.mark.parametrize("contributions", [1, 3, 7], ids=["L1", "L3", "L7"])
def test_filtered_bounding_matches_a_plain_reference(make_dataset: MakeDataset, contributions: int) -> None:
    dataset = make_dataset(_heavy_frame(), base_metadata())
    backend = dataset.engine.backend
    ranked = backend.scan(dataset.path, dataset.metadata, "events").collect()
    request = AggregateRequest(dataset.path, dataset.metadata, "events", contributions,
                               (RowFilter("channel", values=("web", "mobile")),), (), Measure("rows"))
    reference = (ranked.filter(pl.col("channel").is_in(["web", "mobile"]))
                 .with_columns(pl.col(RANK).rank("ordinal").over("person_id").alias("r"))
                 .filter(pl.col("r") <= contributions))
    assert backend.aggregate(request)["rows"].item() == reference.height
    # Each person keeps min(L, their filtered rows): more than truncating before filtering.
    per_person = reference.group_by("person_id").len()["len"]
    assert per_person.max() <= contributions
    unfiltered_first = ranked.filter((pl.col(RANK) <= contributions)
                                     & pl.col("channel").is_in(["web", "mobile"])).height
    assert reference.height > unfiltered_first


def test_bounding_without_filters_uses_the_cached_rank(make_dataset: MakeDataset) -> None:
    frame = _heavy_frame()
    dataset = make_dataset(frame, base_metadata())
    request = AggregateRequest(dataset.path, dataset.metadata, "events", 4, (), (), Measure("rows"))
    expected = int(frame.group_by("person_id").len()["len"].clip(upper_bound=4).sum())
    assert dataset.engine.backend.aggregate(request)["rows"].item() == expected


def test_rank_depends_only_on_each_persons_rows(make_dataset: MakeDataset) -> None:
    """Adding a person leaves everyone else's ranks unchanged (the selection is stable)."""
    frame = _heavy_frame()
    extra = frame.filter(pl.col("person_id") == 0).with_columns(
        pl.lit(10_000, pl.Int64).alias("person_id"), (pl.col("event_id") + 1_000_000).alias("event_id"))
    before = make_dataset(frame, base_metadata(), name="before")
    after = make_dataset(pl.concat([extra, frame]), base_metadata(), name="after")
    ranks = [d.engine.backend.scan(d.path, d.metadata, "events").collect()
             .filter(pl.col("person_id") != 10_000).select("event_id", RANK).sort("event_id")
             for d in (before, after)]
    assert ranks[0].equals(ranks[1])


# -- quantile scores and the interval tree: sensitivity on neighbouring data (issue 12) ------

SCORE_LEVELS = [0.5, 0.9, 0.37, 0.001]
#: Rows per grid position (2m + 1 = 9 positions: grid points 0..3 at the odd positions).
#: Atoms on grid points, empty gaps, values beyond the grid, an empty group.
SCORE_BASES = [
    np.array([0, 0, 0, 0, 0, 0, 0, 0, 0]),
    np.array([0, 5, 0, 0, 0, 0, 0, 5, 0]),
    np.array([2, 0, 1, 3, 0, 0, 4, 0, 1]),
    np.array([0, 0, 0, 7, 0, 0, 0, 0, 0]),
    np.array([1, 1, 1, 1, 1, 1, 1, 1, 1]),
]


def _grid_rank_quantile(positions: np.ndarray, level: float) -> int:
    """Index of the smallest grid value g with #(values <= g) >= level * n (the last if none)."""
    at_or_below = np.cumsum(positions)[1::2]
    meets = np.flatnonzero(at_or_below * 1000 >= round(level * 1000) * positions.sum())
    return int(meets[0]) if meets.size else len(at_or_below) - 1


@pytest.mark.parametrize("level", SCORE_LEVELS)
def test_value_scores_are_zero_at_the_grid_quantile_on_atoms_and_gaps(level: float) -> None:
    """Ties count: the candidate holding the level's rank scores 0, including on an atom followed by a gap.

    The old score (values equal to a candidate counted neither below nor above) gave every
    candidate of an empty gap the same score as the atom's edge and a positive score to the atom.
    """
    from civicdp.queries.kinds.quantiles import value_scores

    for base in SCORE_BASES[1:]:
        scores = value_scores(base, level)
        assert scores[_grid_rank_quantile(base, level)] == 0, (base, level, scores)
        assert scores.min() == 0


@pytest.mark.parametrize("level", SCORE_LEVELS)
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_value_scores_move_by_at_most_their_sensitivity(level: float, rows: int) -> None:
    """One more person with ``rows`` rows placed anywhere (every placement tried) moves every score by at
    most ``quantile_sensitivity``, and some placement moves one by exactly that much."""
    from itertools import combinations_with_replacement

    from civicdp.privacy.bounding import quantile_sensitivity
    from civicdp.queries.kinds.quantiles import value_scores

    declared = quantile_sensitivity(level, rows)
    largest = 0
    for base in SCORE_BASES:
        before = value_scores(base, level)
        for placement in combinations_with_replacement(range(base.size), rows):
            after = value_scores(base + np.bincount(placement, minlength=base.size), level)
            largest = max(largest, int(np.abs(after - before).max()))
    assert largest == declared


def test_interval_tree_moves_by_its_sensitivity() -> None:
    """Every kept row is in one released node per level: a person's L rows move the nodes by L * depth (L1)."""
    from itertools import combinations_with_replacement

    from civicdp.queries.kinds.quantiles import CountTree

    for positions in (9, 403, 2003):
        tree = CountTree.for_positions(positions)
        base = np.arange(positions) % 4
        before = tree.nodes(base[None, :])
        for rows in (1, 3):
            for placement in list(combinations_with_replacement(range(0, positions, max(1, positions // 7)), rows)):
                after = tree.nodes((base + np.bincount(placement, minlength=positions))[None, :])
                assert int(np.abs(after - before).sum()) == rows * tree.depth
