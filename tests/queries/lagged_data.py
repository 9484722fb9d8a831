"""The performance test dataset with every lagged-points cell exactly at the threshold.

Built on :mod:`tests.queries.perf_data`: each service's cases are made exactly half above
their public target (rounded down: ``floor(n / 2)`` above, the rest below), and the two
steps of every case keep perf_data's split (40% and 60% of the duration, against step
targets of 40% and 60% of the service's). With ``"target_factor": 1`` and the median rule
every one of the 12 services and 24 steps then has a true share at or just below 1/2: nothing
is lagged, and each cell is as close to being flagged as a cell that is not lagged can be.
Every person has at most 3 events (6 steps), so with ``"step_contributions": 6`` the
bounded data is all the data.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tests.queries import perf_data

STEP_CONTRIBUTIONS = 2 * perf_data.MAX_CONTRIBUTIONS


def at_threshold(folder: Path, people: int = 3000, seed: int = 0) -> Path:
    """Write the dataset into ``folder`` (see the module docstring)."""
    perf_data.write(folder, people=people, seed=seed)
    events = pl.read_parquet(folder / "events.parquet")
    targets = pl.DataFrame({"service_id": list(perf_data.targets()), "__t": list(perf_data.targets().values())})
    events = (events.join(targets, on="service_id", maintain_order="left")
              .with_columns(pl.int_range(pl.len()).over("service_id").alias("__i"),
                            pl.len().over("service_id").alias("__n"))
              .with_columns(pl.when(pl.col("__i") < pl.col("__n") // 2).then(pl.col("__t") * 1.25)
                            .otherwise(pl.col("__t") * 0.8).alias("duration_hours"))
              .drop("__t", "__i", "__n"))
    events.write_parquet(folder / "events.parquet")
    begin = events["request_time"]
    hours = events["duration_hours"].to_numpy()
    middle = begin + pl.Series(hours * 0.4 * 3600e6).cast(pl.Int64).cast(pl.Duration("us"))
    end = begin + pl.Series(hours * 3600e6).cast(pl.Int64).cast(pl.Duration("us"))
    steps = pl.concat([
        pl.DataFrame({"event_id": events["event_id"], "step": 1, "started": begin, "ended": middle}),
        pl.DataFrame({"event_id": events["event_id"], "step": 2, "started": middle, "ended": end}),
    ]).with_columns(pl.col("step").cast(pl.Int64))
    steps.write_parquet(folder / "steps.parquet")
    return folder
