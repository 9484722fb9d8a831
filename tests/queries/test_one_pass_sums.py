"""The report's one-pass sums (queries/polars_one_pass.py) are exact and saturate, as the backend's aggregate."""

from __future__ import annotations

import polars as pl

from civicdp.queries.backend import AggregateRequest, GroupKey, Measure
from civicdp.queries.polars_backend import PolarsBackend
from civicdp.queries.polars_one_pass import fits_one_pass
from tests.conftest import CHANNELS, MakeDataset, base_metadata, events_frame

BY_CHANNEL = (GroupKey("channel", None, CHANNELS),)


def _both(make_dataset: MakeDataset, frame: pl.DataFrame, measure: Measure) -> tuple[dict, dict]:
    dataset = make_dataset(frame, base_metadata())
    request = AggregateRequest(dataset.path, dataset.metadata, "events", 3, (), BY_CHANNEL, measure)
    assert fits_one_pass([request])
    backend = PolarsBackend()
    (fast,) = backend.aggregate_many([request])
    slow = backend.aggregate(request)
    return (dict(zip(fast["channel"], fast["total"])),
            {c: t for c, t in zip(slow["channel"], slow["total"]) if c is not None})


def test_one_pass_sums_saturate_like_the_backend(make_dataset: MakeDataset) -> None:
    # 2**62 units per row at the upper bound: four rows already pass the Int64 range.
    frame = events_frame().with_columns(pl.lit(100.0).alias("waiting_minutes"))
    measure = Measure("sum", "waiting_minutes", lower=0.0, upper=100.0, resolution=100.0 / 2**62)
    fast, slow = _both(make_dataset, frame, measure)
    assert 2**63 - 1 in slow.values()  # the case this checks: a sum beyond Int64
    assert {c: fast[c] for c in slow} == slow


def test_one_pass_sums_are_exact(make_dataset: MakeDataset) -> None:
    frame = events_frame()
    measure = Measure("sum", "waiting_minutes", lower=0.0, upper=100.0, resolution=0.01)
    fast, slow = _both(make_dataset, frame, measure)
    assert slow and {c: fast[c] for c in slow} == slow
