"""W5 — service performance: the report, lagged points, department scores, continual release.

Usage::

    python -m bench.w5 [--people 200000] [--runs 3] [--data DIR]
                       [--la311 ../shared/data/la311] [--wabo ../shared/data/wabo_receipt]

On the demo data (planted lagged services and steps, public targets), at total epsilon 1
per analysis, it prints:

- the performance report's time (median of runs; the first run also builds the ranking
  cache and is reported apart) and, as the same-run reference, the same aggregations in
  plain Polars; median relative errors of volumes and mean durations per department;
- lagged points: planted lagged services flagged and services flagged that were not
  planted (every run), planted lagged steps found;
- department scores: the share of departments whose rank range contains the true rank
  (computed on all the data, unbounded), and the ranges' mean width;
- continual release: the error of the running count over horizons of 4 to 16,384 steps
  (binary tree) against splitting the same loss over the steps, beside log2(T)^2.

With ``--la311`` (real Los Angeles 311 requests) it runs the report by department and
channel and compares with the non-private answers; with ``--wabo`` (a real municipal
permit process log) it runs lagged steps and compares with the non-private shares.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from bench.demo import demo_dataset
from civicdp.privacy.continual import TreeCounter
from civicdp.privacy.mechanisms import LaplaceVector
from civicdp.queries.engine import LocalDataset

REPORT = {"analysis": "performance_report", "epsilon": 1.0}
LAGGED = {"analysis": "lagged_points", "epsilon": 1.0}
SCORES = {"analysis": "department_scores", "epsilon": 1.0, "contributions": 3}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def plain_report(events: Path) -> float:
    """The report's aggregations without privacy in plain Polars (the same-run reference)."""
    started = time.perf_counter()
    frame = pl.scan_parquet(events)
    for by in ("service_id", "department", "centre", "channel"):
        d, w = pl.col("duration_hours"), pl.col("waiting_minutes")
        frame.group_by(by).agg(
            pl.len(), d.mean().alias("d_mean"), d.median().alias("d_median"), d.quantile(0.9).alias("d_p90"),
            w.mean().alias("w_mean"), w.median().alias("w_median"), w.quantile(0.9).alias("w_p90"),
            pl.col("satisfaction").mean()).collect()
    return time.perf_counter() - started


def report(data: Path, runs: int) -> None:
    local = LocalDataset(data)
    estimate = local.estimate(REPORT)
    print(f"report: {estimate.loss}, {len(estimate.accuracy)} parts; estimate reads no data")
    times, plain = [], []
    for run in range(runs + 1):
        started = time.perf_counter()
        result = local.run(REPORT)
        elapsed = time.perf_counter() - started
        if run == 0:
            print(f"  first run (builds the ranking cache): {elapsed:.1f} s")
            continue
        times.append(elapsed)
        plain.append(plain_report(data / "events.parquet"))
    events = pl.read_parquet(data / "events.parquet", columns=["department", "duration_hours"])
    truth = events.group_by("department").agg(pl.len().alias("n"), pl.col("duration_hours").mean().alias("mean"))
    table = result.tables["by_department"].join(truth, on="department")
    volume = ((table["volume"] - table["n"]).abs() / table["n"]).median()
    mean = ((table["duration_mean"] - table["mean"]).abs() / table["mean"]).median()
    print(f"  report time (median of {runs}): {_median(times):.2f} s; plain Polars: {_median(plain):.2f} s; "
          f"ratio {_median(times) / _median(plain):.1f}")
    print(f"  per department: median relative error of volume {volume:.1%} (includes bounding to "
          f"{result.contributions} rows per person), of mean duration {mean:.1%}")


def lagged(data: Path, runs: int) -> None:
    local = LocalDataset(data)
    truth = json.loads((data / "ground_truth.json").read_text())
    planted = {s["service_id"] for s in truth["lagged_services"]}
    steps = {(s["service_id"], s["step"]) for s in truth["lagged_steps"]}
    rows = []
    for _ in range(runs):
        started = time.perf_counter()
        result = local.run(LAGGED)
        elapsed = time.perf_counter() - started
        flagged = set(result.tables["services"].filter(pl.col("flagged"))["service_id"])
        found = {tuple(r) for r in result.tables["steps"].filter(pl.col("flagged"))
                 .select("service_id", "step").iter_rows()}
        rows.append((len(flagged & planted), len(flagged - planted), len(found & steps),
                     sum(1 for s in found - steps if s[0] not in planted), elapsed))
    print(f"lagged points ({LAGGED['epsilon']:g}, median rule, factor 1.5), {runs} runs:")
    for hit, false, step_hit, step_false, elapsed in rows:
        print(f"  services: {hit}/{len(planted)} planted flagged, {false} flagged not planted; "
              f"steps: {step_hit}/{len(steps)} planted found, {step_false} flagged outside lagged services; "
              f"{elapsed:.1f} s")


def scores(data: Path, runs: int) -> None:
    local = LocalDataset(data)
    events = pl.read_parquet(data / "events.parquet", columns=["department", "service_id", "duration_hours"])
    services = pl.read_parquet(data / "services.parquet").select("service_id", "target_hours")
    truth = (events.join(services, on="service_id").group_by("department")
             .agg((pl.col("duration_hours").clip(0, 720).sum() / pl.col("target_hours").clip(0, 720).sum())
                  .alias("true"))
             .with_columns(pl.col("true").rank("min").cast(pl.Int64).alias("true_rank")))
    coverage, widths = [], []
    for _ in range(runs):
        table = local.run(SCORES).table.join(truth, on="department")
        inside = (table["rank_low"] <= table["true_rank"]) & (table["true_rank"] <= table["rank_high"])
        coverage.append(float(inside.mean()))
        widths.append(float((table["rank_high"] - table["rank_low"] + 1).mean()))
    print(f"department scores (epsilon {SCORES['epsilon']:g}, L = {SCORES['contributions']}): rank ranges contain "
          f"the true rank in {min(coverage):.0%}-{max(coverage):.0%} of departments over {runs} runs; "
          f"mean range {statistics.mean(widths):.1f} of {table.height} ranks")


def continual(reps: int = 3) -> None:
    print("continual release, running count of one group over the horizon, epsilon 1 in total, L = 1:")
    print(f"  {'steps T':>8} {'tree RMS error':>15} {'outside 95% bound':>18} {'split-epsilon RMS':>18} "
          f"{'log2(T)^2':>10} {'T':>8}")
    for power in (2, 4, 6, 8, 10, 12, 14):
        horizon = 1 << power
        tree = TreeCounter.for_epsilon(horizon, 1, 1.0)
        errors, outside = [], 0
        bounds = [tree.prefix_half_width(step, 0.05) for step in range(horizon)]
        for _ in range(reps):
            nodes = {}
            for step in range(horizon):
                for node in tree.completed_by(step):
                    nodes[node] = tree.release([0])[0]
                error = sum(nodes[n] for n in tree.prefix(step))  # running total's error at this step
                errors.append(error)
                outside += abs(error) > bounds[step]
        # Splitting epsilon over T steps instead: each step's count has noise of scale T / epsilon
        # and the running total at step t sums t of them.
        split = LaplaceVector.for_epsilon(1, 1.0 / horizon)
        split_errors = np.concatenate([np.cumsum(split.release([0] * horizon)) for _ in range(reps)])
        rms = float(np.sqrt(np.mean(np.square(errors))))
        split_rms = float(np.sqrt(np.mean(np.square(split_errors.astype(float)))))
        print(f"  {horizon:>8} {rms:>15.1f} {outside / len(errors):>18.1%} {split_rms:>18.0f} "
              f"{math.log2(horizon) ** 2:>10.0f} {horizon:>8}")


def la311(folder: Path) -> None:
    frames = []
    for path in sorted(folder.glob("*.csv")):
        raw = pl.read_csv(path, infer_schema=False)
        raw = raw.rename({c: c.lower() for c in raw.columns})
        fmt = "%m/%d/%y %H:%M" if "2020" in path.name else "%m/%d/%Y %I:%M:%S %p"
        frames.append(raw.select(
            pl.col("createddate").str.strptime(pl.Datetime("us"), fmt, strict=False).alias("created"),
            pl.col("closeddate").str.strptime(pl.Datetime("us"), fmt, strict=False).alias("closed"),
            pl.col("owner").alias("department"), pl.col("requestsource").alias("channel"),
            pl.col("requesttype").alias("service_id")))
    frame = pl.concat(frames).drop_nulls()
    frame = frame.with_columns(((pl.col("closed") - pl.col("created")).dt.total_seconds() / 3600)
                               .alias("duration_hours")).filter(pl.col("duration_hours") >= 0)
    n = frame.height
    # No person id: each request is its own privacy unit (one row per unit). Keys and the time
    # bounds are read from the data here, for the benchmark only; a steward would declare them.
    events = frame.with_row_index("event_id").with_columns(
        pl.col("event_id").cast(pl.Int64), pl.col("event_id").cast(pl.Int64).alias("person_id"),
        pl.col("duration_hours").clip(0, 720)).rename({"created": "request_time"}).drop("closed")
    out = Path("bench/out/w5-la311")
    out.mkdir(parents=True, exist_ok=True)
    events.write_parquet(out / "events.parquet")
    keys = {c: sorted(events[c].unique().to_list()) for c in ("department", "channel", "service_id")}
    lo, hi = events["request_time"].min(), events["request_time"].max()
    metadata = {"name": "la311", "version": "1", "privacy_unit": "person_id", "max_contributions": 1,
                "tables": {"events": {"path": "events.parquet", "columns": {
                    "event_id": {"type": "int", "identifier": True}, "person_id": {"type": "int", "identifier": True},
                    **{c: {"type": "str", "keys": k} for c, k in keys.items()},
                    "request_time": {"type": "datetime", "bounds": [lo.isoformat(), (hi.replace(microsecond=0)
                                     .isoformat() + ".999999")]},
                    "duration_hours": {"type": "float", "bounds": [0, 720]}}}}}
    (out / "metadata.json").write_text(json.dumps(metadata, default=str))
    spec = {**REPORT, "by": ["department", "channel"], "waiting": None, "satisfaction": None}
    result = LocalDataset(out).run(spec)
    print(f"LA311 ({n:,} real requests, 3 samples; each request its own privacy unit), report at {result.loss}:")
    for by in ("department", "channel"):
        truth = events.group_by(by).agg(pl.len().alias("true_volume"),
                                        pl.col("duration_hours").median().alias("true_median"),
                                        pl.col("duration_hours").mean().alias("true_mean"))
        table = result.tables[f"by_{by}"].join(truth, on=by).sort("true_volume", descending=True)
        print(table.select(by, "volume", "true_volume", "duration_mean", "true_mean", "duration_median",
                           "duration_median_low", "duration_median_high", "true_median").head(6))


def wabo(folder: Path) -> None:
    raw = pl.read_csv(folder / "receipt.csv", infer_schema=False)
    frame = raw.select(pl.col("case:concept:name").alias("case"), pl.col("concept:name").alias("activity"),
                       pl.col("time:timestamp").str.to_datetime(time_zone="UTC", strict=False)
                       .dt.replace_time_zone(None).alias("ended")).drop_nulls()
    cases = frame.group_by("case").agg(pl.col("ended").min().alias("request_time")).sort("case").with_row_index(
        "event_id").with_columns(pl.col("event_id").cast(pl.Int64))
    events = cases.select("event_id", pl.col("event_id").alias("person_id"), pl.lit("WABO").alias("service_id"),
                          "request_time")
    steps = frame.join(cases.select("case", "event_id"), on="case").select("event_id", pl.col("activity").alias("step"),
                                                                           "ended")
    out = Path("bench/out/w5-wabo")
    out.mkdir(parents=True, exist_ok=True)
    events.write_parquet(out / "events.parquet")
    steps.write_parquet(out / "steps.parquet")
    lo, hi = frame["ended"].min(), frame["ended"].max()
    span = [str(lo.date()) + "T00:00:00", str(hi.date().replace(year=hi.year + 1)) + "T00:00:00"]
    activities = sorted(steps["step"].unique().to_list())
    metadata = {"name": "wabo", "version": "1", "privacy_unit": "person_id", "max_contributions": 5,
                "tables": {"events": {"path": "events.parquet", "columns": {
                    "event_id": {"type": "int", "identifier": True}, "person_id": {"type": "int", "identifier": True},
                    "service_id": {"type": "str", "keys": ["WABO"]},
                    "request_time": {"type": "datetime", "bounds": span}}},
                    "steps": {"path": "steps.parquet", "privacy_unit_via": {"table": "events", "on": "event_id"},
                              "columns": {"event_id": {"type": "int", "identifier": True},
                                          "step": {"type": "str", "keys": activities},
                                          "ended": {"type": "datetime", "bounds": span}}}},
                "catalogue": {"path": "services.parquet"}}
    pl.DataFrame({"service_id": ["WABO"], "target_hours": [24.0]}).write_parquet(out / "services.parquet")
    (out / "metadata.json").write_text(json.dumps(metadata))
    target = 24.0
    spec = {**LAGGED, "level": "steps", "statistic": "share_late", "max_share": 0.5, "step_start": None,
            "step_target_hours": target, "step_contributions": 5}
    result = LocalDataset(out).run(spec)
    # Non-private: the share of each activity's waits (time since the case's previous event) above 24 h.
    lags = (steps.sort("event_id", "ended").with_columns(
        ((pl.col("ended") - pl.col("ended").shift(1).over("event_id")).dt.total_seconds() / 3600).alias("h"))
        .drop_nulls("h").group_by("step").agg(pl.len().alias("true_cases"),
                                              (pl.col("h") > target).mean().alias("true_share")))
    table = result.tables["steps"].join(lags, on="step").sort("true_cases", descending=True)
    print(f"WABO permit receipts ({cases.height:,} real cases; a case is the privacy unit, 5 steps each), "
          f"steps waiting > {target:g} h, share_late rule (lower end > 0.5), {result.loss}:")
    print(table.select("step", "cases", "true_cases", "share_above", "ci_low", "ci_high", "true_share",
                       "flagged").head(12))
    truly = set(lags.filter((pl.col("true_share") > 0.5) & (pl.col("true_cases") >= 50))["step"])
    flagged = set(result.tables["steps"].filter(pl.col("flagged"))["step"])
    print(f"  flagged {sorted(flagged)}; non-private share > 0.5 (>= 50 cases): {sorted(truly)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: bench/out/w5-PEOPLE)")
    parser.add_argument("--la311", type=Path, default=None, help="folder of the LA 311 CSV samples")
    parser.add_argument("--wabo", type=Path, default=None, help="folder holding the WABO receipt.csv")
    parser.add_argument("--skip-demo", action="store_true", help="only the real-data parts")
    args = parser.parse_args()
    if not args.skip_demo:
        data = demo_dataset("w5", args.people, args.seed, args.data)
        print(f"W5 on {data} ({datetime.now():%Y-%m-%d %H:%M})")
        report(data, args.runs)
        lagged(data, args.runs)
        scores(data, args.runs)
        continual()
    if args.la311:
        la311(args.la311)
    if args.wabo:
        wabo(args.wabo)


if __name__ == "__main__":
    main()
