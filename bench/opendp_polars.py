"""W1 through OpenDP 0.16's own Polars API, for comparison with the engine (bench/w1.py).

Usage::

    python -m bench.opendp_polars --data DIR [--runs 3]

DIR is a folder written by ``synthetic/demo_data.py`` (events.parquet, metadata.json). Each run
opens a fresh ``dp.Context.compositor`` over the events (privacy unit: one ``person_id``,
total epsilon = 1 split evenly over the four W1 queries, pure DP / Laplace) and answers:

- Q1 count per service_id (300 public keys),
- Q2 mean duration_hours per department, clipped to [0, 720],
- Q3 median and 90th percentile of waiting_minutes per channel (counter and kiosk), chosen
  among the engine's candidates 0, 0.05, ..., 240 minutes,
- Q4 count per channel x hour of request_time,

each as ``context.query().truncate_per_group(10)...group_by(...).agg(...).with_keys(public
keys)`` then ``.release().collect()``: every person is bounded to at most 10 events (a random
sample of them, OpenDP's default), as in the anchors' fixed-10 setting. It prints the median
wall time per query (query building, plan resolution with its noise-scale search, and the
collect) and for all four, the same four aggregations in plain Polars as the reference, and
the errors against the true unbounded answers as bench/w1.py measures them: median relative
error for Q1, Q2 and Q4, mean absolute error in minutes for Q3. A query OpenDP rejects is
reported with its error message and skipped.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import opendp.prelude as dp
import polars as pl

from bench.w1 import WAIT_GRID, _truth, errors, plain_polars

dp.enable_features("contrib")

CONTRIBUTIONS = 10  # events kept per person
# the engine's candidate grid (0, 0.05, ..., 240 minutes); OpenDP takes 4,801 candidates in its stride
WAIT_CANDIDATES = [round(WAIT_GRID["start"] + i * WAIT_GRID["step"], 6)
                   for i in range(round((WAIT_GRID["stop"] - WAIT_GRID["start"]) / WAIT_GRID["step"]) + 1)]
WAITING_CHANNELS = ["counter", "kiosk"]


def make_context(events: Path, rows: int) -> dp.Context:
    """A fresh compositor: one person may change, epsilon = 1 in four equal parts.

    ``max_length`` is the table's row count (treated as public): the tightest per-group bound
    one can declare without looking at group sizes; a loose one inflates the float-sum noise.
    """
    return dp.Context.compositor(
        data=pl.scan_parquet(events),
        privacy_unit=dp.unit_of(contributions=1, identifier=pl.col("person_id")),
        privacy_loss=dp.loss_of(epsilon=1.0),
        split_evenly_over=4,
        margins=[
            dp.polars.Margin(by=["department"], max_length=rows, max_groups=40),
            dp.polars.Margin(by=["channel"], max_length=rows, max_groups=5),
        ],
    )


def build_queries(keys: dict[str, list]) -> dict:
    """name -> function(context) -> OpenDP LazyFrameQuery, keyed by the public key sets."""
    channel_hour = pl.DataFrame({"channel": keys["channel"]}).join(
        pl.DataFrame({"hour": range(24)}, schema={"hour": pl.Int8}), how="cross")
    waiting = (pl.col("channel") == WAITING_CHANNELS[0]) | (pl.col("channel") == WAITING_CHANNELS[1])
    minutes = pl.col("waiting_minutes").fill_null(0.0)  # no nulls remain after the filter

    def bounded(ctx):
        return ctx.query().truncate_per_group(CONTRIBUTIONS)

    return {
        "Q1": lambda ctx: bounded(ctx).group_by("service_id").agg(dp.len(signed=False))
        .with_keys(pl.DataFrame({"service_id": keys["service_id"]})),
        "Q2": lambda ctx: bounded(ctx).group_by("department")
        .agg(pl.col("duration_hours").fill_null(0.0).dp.mean((0.0, 720.0)))  # has no nulls
        .with_keys(pl.DataFrame({"department": keys["department"]})),
        "Q3": lambda ctx: bounded(ctx).filter(waiting & pl.col("waiting_minutes").is_not_null())
        .group_by("channel")
        .agg(minutes.dp.quantile(0.5, WAIT_CANDIDATES).alias("q0.5"),
             minutes.dp.quantile(0.9, WAIT_CANDIDATES).alias("q0.9"))
        .with_keys(pl.DataFrame({"channel": WAITING_CHANNELS})),
        "Q4": lambda ctx: bounded(ctx).with_columns(pl.col("request_time").dt.hour().alias("hour"))
        .group_by("channel", "hour").agg(dp.len(signed=False)).with_keys(channel_hour),
    }


def released(name: str, table: pl.DataFrame) -> dict:
    """The released table as the key -> value dict that ``bench.w1.errors`` compares."""
    if name == "Q3":
        return {(c, q): v for c, a, b in table.select("channel", "q0.5", "q0.9").iter_rows()
                for q, v in ((0.5, a), (0.9, b))}
    if name == "Q4":
        return {(c, int(h)): n for c, h, n in table.select("channel", "hour", "len").iter_rows()}
    return dict(zip(table[table.columns[0]], table[table.columns[1]]))


def run(data: Path, runs: int) -> None:
    metadata = json.loads((data / "metadata.json").read_text())
    table = metadata["tables"]["events"]
    events = data / table["path"]
    keys = {name: col["keys"] for name, col in table["columns"].items() if "keys" in col}
    rows = pl.scan_parquet(events).select(pl.len()).collect().item()
    print(f"OpenDP {dp.__version__}, Polars {pl.__version__}; {rows:,} events in {data}")

    plain_times = []
    for _ in range(runs):
        t = time.perf_counter()
        plain = plain_polars(events)
        plain_times.append(time.perf_counter() - t)
    plain_median = statistics.median(plain_times)
    print(f"plain Polars, four aggregations: median {plain_median:.3f} s over {runs} runs")
    truth = {name: _truth(name, frame) for name, frame in plain.items()}

    queries = build_queries(keys)
    times: dict[str, list[float]] = {name: [] for name in ["context", *queries]}
    collect: dict[str, list[float]] = {name: [] for name in queries}
    errs: dict[str, list[float]] = {name: [] for name in queries}
    failed: dict[str, str] = {}
    for _ in range(runs):
        t = time.perf_counter()
        ctx = make_context(events, rows)
        times["context"].append(time.perf_counter() - t)
        for name, query in queries.items():
            if name in failed:  # a rejected query is not retried
                continue
            t = time.perf_counter()
            try:
                once = query(ctx).release()  # plan resolution and noise-scale search
                t_release = time.perf_counter()
                table_out = once.collect()  # reads the data, aggregates, adds the noise
            except Exception as exc:  # report what OpenDP rejected and go on
                failed[name] = " ".join(str(exc).split())
                continue
            times[name].append(time.perf_counter() - t)
            collect[name].append(time.perf_counter() - t_release)
            # bounded answers are not computed here: pass the truth so only total error counts
            errs[name].append(errors(name, truth[name], truth[name], released(name, table_out))[0])

    print(f"\n[OpenDP Polars, fixed-{CONTRIBUTIONS}] total epsilon = 1 (0.25 per query)")
    print(f"  context: median {statistics.median(times['context']):.3f} s")
    for name in queries:
        if name in failed:
            print(f"  {name}: FAILED: {failed[name]}")
            continue
        unit = "min (MAE)" if name == "Q3" else "(median relative)"
        print(f"  {name}: median {statistics.median(times[name]):.3f} s "
              f"(of which collect {statistics.median(collect[name]):.3f} s); "
              f"error {float(np.median(errs[name])):.4f} {unit}")
    done = [name for name in times if name not in failed]
    totals = [sum(times[name][i] for name in done) for i in range(runs)]
    total = statistics.median(totals)
    note = f" (without {', '.join(failed)})" if failed else ""
    print(f"  all four{note}: median {total:.3f} s; plain {plain_median:.3f} s; "
          f"ratio DP/plain = {total / plain_median:.2f}")
    print(f"\npeak memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dataset folder from synthetic/demo_data.py")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    run(args.data, args.runs)


if __name__ == "__main__":
    main()
