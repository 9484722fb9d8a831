"""Contribution bounding in the Polars backend: filter first, then keep L rows per person.

The fast path re-ranks filtered rows by runs over a cache sorted by person and rank;
here it is compared with a plain reference (eager filter, rank over person) on data
where filtering changes which rows each person keeps.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from queries.backend import AggregateRequest, Measure, RowFilter
from queries.polars_backend import RANK
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
