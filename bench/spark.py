"""The Spark backend on this machine (issue 17): W1, the performance report, and how time grows with the data.

Usage::

    python -m bench.spark [--people 220000,2200000] [--runs 3] [--seed 1] [--master local[2]]

For each size (the demo generator's people; ~4.5 events each, so 220,000 people are ~1 M
events) the dataset is generated into bench/out/ (or reused), then in ONE Spark session:

- the one-off ranking of the events table (hash of every row on the executors, rank per
  person, persisted in the cluster): paid by the first query of a dataset;
- W1's four DP queries (bench/w1.py's "tuned" and "fixed-10" settings) through the engine
  on the Spark backend, and the same four aggregations in plain PySpark without privacy
  (group counts, a clipped mean, exact percentiles, counts by channel and hour) on the same
  table cached in the same session;
- the performance report (epsilon 1: ~24 aggregates, one Spark job) against plain PySpark
  computing the same groupings' counts, means and exact percentiles (one job per grouping).

Rounds are paired (plain, then each DP setting) and the median of the rounds' DP / plain
ratios is printed, one line per measurement. W2 (bundle discovery) does not run on Spark
(docs/spark.md): it is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from bench.demo import demo_dataset
from bench.w1 import SETTINGS, WAITING_CHANNELS
from civicdp.queries.engine import Engine
from civicdp.queries.metadata import load_metadata

REPORT = {"analysis": "performance_report", "epsilon": 1.0}
BY = ("service_id", "department", "centre", "channel")


def _timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def plain_w1(events: Any) -> Callable[[], None]:
    from pyspark.sql import functions as F

    channels = list(WAITING_CHANNELS["values"])

    def run() -> None:
        events.groupBy("service_id").count().collect()
        events.groupBy("department").agg(F.avg(F.least(F.greatest("duration_hours", F.lit(0.0)),
                                                       F.lit(720.0)))).collect()
        (events.filter(F.col("channel").isin(channels)).groupBy("channel")
         .agg(F.percentile("waiting_minutes", [0.5, 0.9])).collect())
        events.groupBy("channel", F.hour("request_time")).count().collect()

    return run


def plain_report(events: Any) -> Callable[[], None]:
    from pyspark.sql import functions as F

    def run() -> None:
        for by in BY:
            events.groupBy(by).agg(F.count(F.lit(1)), F.avg("duration_hours"),
                                   F.percentile("duration_hours", [0.5, 0.9]), F.avg("waiting_minutes"),
                                   F.percentile("waiting_minutes", [0.5, 0.9]), F.avg("satisfaction")).collect()

    return run


def dp_queries(engine: Engine, folder: Path, specs: list[dict]) -> Callable[[], None]:
    metadata = load_metadata(folder)

    def run() -> None:
        for spec in specs:
            engine.run(spec, metadata, folder)

    return run


def measure(people: int, seed: int, runs: int, spark: Any) -> list[dict[str, Any]]:
    from civicdp.queries.spark_backend import SparkBackend

    folder = demo_dataset("spark", people, seed)
    events_total = spark.read.parquet(str(folder.resolve() / "events.parquet")).count()
    backend = SparkBackend(spark)
    engine = Engine(backend=backend)
    metadata = load_metadata(folder)
    ranking = _timed(lambda: backend.ranked(folder, metadata, "events").count())
    print(f"{events_total:,} events: one-off ranking (hash, rank, persist) {ranking:.1f} s", flush=True)
    events = spark.read.parquet(str(folder.resolve() / "events.parquet")).cache()
    events.count()
    workloads = {
        "W1 tuned": (dp_queries(engine, folder, list(SETTINGS["tuned"].values())), plain_w1(events)),
        "W1 fixed-10": (dp_queries(engine, folder, list(SETTINGS["fixed-10"].values())), plain_w1(events)),
        "performance report": (dp_queries(engine, folder, [REPORT]), plain_report(events)),
    }
    rows = []
    for name, (dp, plain) in workloads.items():
        dp()  # warm: plans cached, Python workers started
        times, plains = [], []
        for _ in range(runs):
            plains.append(_timed(plain))
            times.append(_timed(dp))
        ratio = statistics.median(t / p for t, p in zip(times, plains))
        row = {"events": events_total, "workload": name, "civicdp_s": statistics.median(times),
               "plain_s": statistics.median(plains), "ratio": ratio, "ranking_s": ranking}
        rows.append(row)
        print(f"{events_total:,} events  {name:<20} civicdp {row['civicdp_s']:7.2f} s   plain PySpark "
              f"{row['plain_s']:7.2f} s   ratio {ratio:.2f}x", flush=True)
    events.unpersist()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", default="220000", help="comma-separated sizes, in people (~4.5 events each)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--memory", default="3g", help="driver memory (local mode: the executors' too)")
    args = parser.parse_args()
    os.environ["CIVICDP_SPARK_MASTER"] = args.master
    os.environ.setdefault("CIVICDP_SPARK_CONF", f"spark.driver.memory={args.memory};spark.sql.shuffle.partitions=8")
    from civicdp.queries.spark_session import session, status

    spark = session()
    print(f"Spark session ({args.master}) started in {status()['start_seconds']:.1f} s", flush=True)
    rows = [row for people in args.people.split(",") for row in measure(int(people), args.seed, args.runs, spark)]
    print("\n| events | workload | civicdp (s) | plain PySpark (s) | ratio | one-off ranking (s) |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['events']:,} | {row['workload']} | {row['civicdp_s']:.2f} | {row['plain_s']:.2f} | "
              f"{row['ratio']:.2f} | {row['ranking_s']:.1f} |")
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    Path("bench/out/spark.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
