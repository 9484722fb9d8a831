"""W6 — coverage of stated intervals, for every kind and analysis (../shared/BENCHMARKS.md).

Usage::

    python -m bench.coverage [--releases 200] [--accounting pure|zcdp|both] [--skip-analyses]

Each line releases one configuration ``--releases`` times from one exact bounded
computation (the data is read once; the noise and everything after it is drawn again)
and compares the stated 95% intervals with the true **bounded** values (at most L rows
per person, values clipped, as the intervals promise). It prints, per line, the share of
intervals that cover, the share of releases whose intervals all cover (where an answer
states them jointly), inverted intervals, and false flags where the analysis flags.

- counts, sums and means per channel, on continuous waiting times with 40% exact zeros
  (every person has at most L rows, so the bounded truth is the data);
- quantiles (median and p90) on continuous values, on discrete values with an atom at
  zero, and on values under six minutes (``tests/queries/test_quantile_coverage.py``);
- bundle pairs after selection, and bundle changes on unchanged data (``bench/w2.py``);
- lagged points with nothing lagged, and department rank ranges
  (``bench/coverage_service.py``).

Target (BENCHMARKS.md): every line 93–99.5%, inverted 0. Lines above 99.5% are
conservative constructions (simultaneous intervals, a quantile at the column's bound).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from civicdp.queries.backend import AggregateRequest
from civicdp.queries.engine import LocalDataset
from civicdp.queries.kinds.base import aligned

CHANNELS = ["counter", "web", "mobile", "kiosk"]
L = 3


def events(folder: Path, people: int, accounting: str, seed: int = 11) -> LocalDataset:
    """``people`` people with 1 to L rows each; waiting minutes continuous with 40% exact zeros."""
    rng = np.random.default_rng(seed)  # synthetic input data, not privacy noise
    person = np.repeat(np.arange(people), rng.integers(1, L + 1, people))
    n = len(person)
    waiting = np.where(rng.random(n) < 0.4, 0.0, rng.gamma(1.5, 9.0, n))
    frame = pl.DataFrame({"event_id": np.arange(n), "person_id": person,
                          "channel": rng.choice(CHANNELS, n, p=[0.5, 0.3, 0.15, 0.05]),
                          "waiting_minutes": waiting})
    folder.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(folder / "events.parquet")
    metadata: dict[str, Any] = {
        "name": "coverage", "version": "1", "privacy_unit": "person_id", "max_contributions": L,
        "tables": {"events": {"path": "events.parquet", "columns": {
            "event_id": {"type": "int", "identifier": True}, "person_id": {"type": "int", "identifier": True},
            "channel": {"type": "str", "keys": CHANNELS},
            "waiting_minutes": {"type": "float", "bounds": [0, 120], "resolution": 0.01}}}}}
    if accounting == "zcdp":
        metadata["accounting"] = {"mode": "zcdp", "delta": 1e-7}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return LocalDataset(folder)


def _exact(local: LocalDataset, plan: Any) -> pl.DataFrame:
    ctx = plan.context
    request = AggregateRequest(ctx.dataset_dir, ctx.metadata, ctx.spec.table, plan.calibration.contributions,
                               ctx.filters, ctx.group_by, plan.kind.measure(ctx))
    return local.engine.backend.aggregate(request)


def kind_line(local: LocalDataset, spec: dict[str, Any], releases: int) -> str:
    """Coverage of a count, sum or mean per channel over ``releases`` releases."""
    plan = local.engine.plan(spec, local.metadata, local.path)
    ctx, exact = plan.context, _exact(local, plan)
    cells = aligned(ctx, exact, ["rows", "total"] if spec["aggregate"] != "count" else ["rows"])
    measure = plan.kind.measure(ctx)
    if spec["aggregate"] == "count":
        truth = cells["rows"].to_numpy().astype(float)
    elif spec["aggregate"] == "sum":
        truth = cells["total"].to_numpy() * measure.resolution
    else:
        rows = cells["rows"].to_numpy()
        truth = measure.offset + cells["total"].to_numpy() * measure.resolution / np.maximum(rows, 1)
    covered = joint = inverted = total = 0
    for _ in range(releases):
        table = plan.kind.release(ctx, plan.calibration, exact)
        low, high = table["ci_low"].to_numpy(), table["ci_high"].to_numpy()
        inside = (low <= truth + 1e-9) & (truth - 1e-9 <= high)
        covered += int(inside.sum())
        joint += bool(inside.all())
        inverted += int((low > high).sum())
        total += len(truth)
    return (f"| {spec['aggregate']} per channel | {covered / total:.1%} | {joint / releases:.1%} "
            f"| {inverted} | - |")


def quantile_lines(tmp: Path, releases: int) -> list[str]:
    from tests.queries.test_quantile_coverage import LEVELS, PEOPLE, REPLICATES, SHAPES, quantile_spec, replicated, summary

    lines = []
    for i, (name, shape) in enumerate(SHAPES.items()):
        values = shape(PEOPLE)
        dataset = replicated(tmp / f"quantiles{i}", values)
        result = summary(dataset, quantile_spec(None, LEVELS), values, math.ceil(releases / REPLICATES))
        for level, row in result.items():
            lines.append(f"| quantile {level:g}, {name} | {row['covered'] / row['releases']:.1%} | - "
                         f"| {row['inverted']} | - |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", type=int, default=200)
    parser.add_argument("--people", type=int, default=5000)
    parser.add_argument("--accounting", choices=("pure", "zcdp", "both"), default="both")
    parser.add_argument("--skip-analyses", action="store_true", help="only the engine's kinds")
    args = parser.parse_args()
    modes = ("pure", "zcdp") if args.accounting == "both" else (args.accounting,)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            local = events(Path(tmp) / mode, args.people, mode)
            print(f"\n{mode} accounting, {args.releases} releases per line, stated 95%")
            print("| line | intervals covering | releases all covering | inverted | false flags |")
            print("|---|---:|---:|---:|---:|")
            for aggregate in ("count", "sum", "mean"):
                spec: dict[str, Any] = {"aggregate": aggregate, "group_by": ["channel"], "epsilon": 0.5}
                if aggregate != "count":
                    spec["column"] = "waiting_minutes"
                print(kind_line(local, spec, args.releases), flush=True)
        if args.skip_analyses:
            return
        print("\nquantiles (pure accounting; default grid)")
        print("| line | intervals covering | releases all covering | inverted | false flags |")
        print("|---|---:|---:|---:|---:|")
        for line in quantile_lines(Path(tmp), args.releases):
            print(line, flush=True)
        print("\nlagged points and department ranks (bench.coverage_service)")
        from bench import coverage_service

        from tests.queries import perf_data
        from tests.queries.lagged_data import at_threshold

        folder = Path(tmp) / "service"
        coverage_service.lagged_null(at_threshold(folder / "threshold", 3000), args.releases, 0.95)
        coverage_service.scores(perf_data.write(folder / "ranks", people=20_000,
                                                department_speed=coverage_service.SPEEDS), args.releases, 0.95)
        print("\nbundle pairs after selection and bundle changes: python -m bench.w2 --coverage N "
              "(see its docstring; on the demo data and, with --groceries, on real data)")


if __name__ == "__main__":
    main()
