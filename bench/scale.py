"""The single-machine engine at scale (issue 17): lagged steps, the performance report and bundles.

Usage::

    python -m bench.scale --what steps   [--people 2000000] [--runs 3] [--profile demo|continuous]
    python -m bench.scale --what report  [--people 2000000] [--runs 3]
    python -m bench.scale --what bundles [--people 2000000] [--runs 3]

On the W1 dataset of that size (seed 1, generated once into bench/out/; the tables are
ranked once first, as registration prepares them, and that time is printed apart), it
times ``--runs`` answers at epsilon 1 and prints each answer's time, the median, and the
peak resident memory of the answers (VmHWM reset after preparation). "steps" is lagged
points at the steps level alone (29 M step rows at 2 M people), "report" the
performance report (with plain Polars doing its aggregations in the same run as the
reference), "bundles" bundle discovery (top 50 pairs within 30 days). Run one at a time:
each one at this size takes minutes and gigabytes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.w1 import _peak_mb, _reset_peak, dataset
from bench.w5 import plain_report
from civicdp.queries.engine import Engine, LocalDataset

SPECS = {
    "steps": {"analysis": "lagged_points", "epsilon": 1.0, "level": "steps"},
    "report": {"analysis": "performance_report", "epsilon": 1.0},
    "bundles": {"analysis": "bundles", "window_days": 30, "top_k": 50, "epsilon": 1.0},
}


def run(data: Path, what: str, runs: int) -> None:
    engine = Engine()
    local = LocalDataset(data, engine)
    started = time.perf_counter()
    for table in local.metadata.tables:
        engine.backend.scan(data, local.metadata, table)  # ranked once, as registration prepares it
    print(f"prepare (every table ranked once): {time.perf_counter() - started:.1f} s")
    spec = SPECS[what]
    times, plain = [], []
    _reset_peak()
    for _ in range(runs):
        started = time.perf_counter()
        local.run(spec)
        times.append(time.perf_counter() - started)
        print(f"  {what}: {times[-1]:.2f} s")
    peak = _peak_mb()
    if what == "report":
        for _ in range(runs):
            plain.append(plain_report(data / local.metadata.tables["events"].path))
    line = f"{what}: median {statistics.median(times):.2f} s over {runs} runs; peak RSS {peak:.0f} MB"
    if plain:
        line += (f"; plain Polars {statistics.median(plain):.2f} s "
                 f"(ratio {statistics.median(times) / statistics.median(plain):.1f})")
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=sorted(SPECS), required=True)
    parser.add_argument("--people", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", default="demo", choices=("demo", "continuous"),
                        help="shape of the generated data (the analyses' default column names)")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    run(dataset(args.people, args.seed, args.profile, args.data), args.what, args.runs)


if __name__ == "__main__":
    main()
