"""W6 for the service analyses: coverage of lagged points' and department scores' intervals.

Usage::

    python -m bench.coverage_service [--releases 200] [--confidence 0.95] [--people 3000]

On the small performance dataset of the tests (``tests/queries/perf_data.py``: 12 services
in 6 departments, two steps each, a public catalogue), each configuration is released
``--releases`` times from one exact bounded computation (``plan.release``: the noise and
everything after it is drawn again, the data is read once) and compared with the true
**bounded** values:

- lagged points, ``level: "both"`` (12 services and 24 steps in one family), where nothing
  is lagged and every cell sits exactly at the threshold (``tests/queries/lagged_data.py``):
  the share of releases whose share intervals all hold, of single intervals that hold, of
  releases with any flag (all false), and inverted intervals;
- lagged points with planted lags (S3 x 4, S7 x 3, S5 x 1.6 against factor 1.5): how often
  each planted service and both its steps are flagged, and releases with a false flag;
- department scores with departments close together (true scores 1.04-1.41), bounded to
  one and to three rows per person: the share of releases whose score intervals all hold
  and whose rank ranges all hold, per department, and the ranges' mean width.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from civicdp.queries.analyses.service_common import bounded
from civicdp.queries.engine import LocalDataset
from tests.queries import perf_data
from tests.queries.lagged_data import STEP_CONTRIBUTIONS, at_threshold

SPEEDS = {"D1": 0.97, "D2": 1.0, "D3": 1.02, "D4": 1.05, "D5": 1.1, "D6": 1.3}
PLANTED = {"S3": 4.0, "S7": 3.0, "S5": 1.6}


def lagged_releases(local: LocalDataset, spec: dict[str, Any], releases: int) -> list[dict[str, pl.DataFrame]]:
    """``releases`` answers of one lagged spec, each level's table with ``true_cases`` and ``true_share``."""
    plan = local.engine.plan(spec, local.metadata, local.path)
    exact = plan.exact_counts(local.engine.backend)
    truth = {}
    for lv in plan.levels:
        n = lv.n_cells
        above, below = exact[lv.name][:n], exact[lv.name][n:]
        keys = lv.cells.select([c for c in lv.cells.columns if c in ("service_id", "step")])
        truth[lv.name] = keys.with_columns(pl.Series("true_cases", above + below),
                                           pl.Series("true_share", above / np.maximum(above + below, 1)))
    answers = []
    for _ in range(releases):
        tables = plan.release(exact).tables
        answers.append({name: t.join(truth[name], on=truth[name].columns[:-2]) for name, t in tables.items()})
    return answers


def lagged_null(folder: Path, releases: int, confidence: float) -> None:
    local = LocalDataset(folder)
    print(f"lagged points, level both (36 cells), nothing lagged, every cell at the threshold (median rule, "
          f"factor 1), confidence {confidence:g}, {releases} releases:")
    print(f"  {'epsilon':>8} {'all hold':>9} {'each holds':>11} {'any flag':>9} {'inverted':>9} {'ms/release':>11}")
    for epsilon in (0.01, 0.1, 1.0, 8.0):
        spec = {"analysis": "lagged_points", "epsilon": epsilon, "target_factor": 1.0, "confidence": confidence,
                "step_contributions": STEP_CONTRIBUTIONS}
        started = time.perf_counter()
        answers = lagged_releases(local, spec, releases)
        elapsed = (time.perf_counter() - started) / releases
        all_hold = held = cells = flagged = inverted = 0
        for answer in answers:
            frame = pl.concat([t.select("true_cases", "true_share", "ci_low", "ci_high", "flagged")
                               for t in answer.values()]).filter(pl.col("true_cases") > 0)
            inside = (frame["ci_low"] <= frame["true_share"]) & (frame["true_share"] <= frame["ci_high"])
            all_hold += bool(inside.all())
            held += int(inside.sum())
            cells += frame.height
            flagged += bool(frame["flagged"].any())
            inverted += int((frame["ci_low"] > frame["ci_high"]).sum())
        print(f"  {epsilon:>8g} {all_hold / releases:>9.1%} {held / cells:>11.2%} {flagged / releases:>9.1%} "
              f"{inverted:>9} {1000 * elapsed:>11.1f}")


def lagged_power(folder: Path, releases: int, confidence: float) -> None:
    local = LocalDataset(folder)
    print(f"lagged points, level both, planted {PLANTED} (median rule, factor 1.5), confidence {confidence:g}, "
          f"{releases} releases: share flagging each planted service / both its steps; releases with a false flag")
    for epsilon in (0.1, 0.15, 0.2, 0.3, 0.5):
        spec = {"analysis": "lagged_points", "epsilon": epsilon, "confidence": confidence}
        found = {s: [0, 0] for s in PLANTED}
        false = 0
        for answer in lagged_releases(local, spec, releases):
            services = answer["services"].filter(pl.col("flagged"))["service_id"].to_list()
            steps = answer["steps"].filter(pl.col("flagged"))
            for s in PLANTED:
                found[s][0] += s in services
                found[s][1] += steps.filter(pl.col("service_id") == s).height == 2
            false += any(t.filter(pl.col("flagged") & (pl.col("true_share") <= 0.5)).height for t in answer.values())
        shares = ", ".join(f"{s} {a / releases:.0%}/{b / releases:.0%}" for s, (a, b) in found.items())
        print(f"  epsilon {epsilon:g}: {shares}; false flag in {false / releases:.1%}")


def scores(folder: Path, releases: int, confidence: float) -> None:
    local = LocalDataset(folder)
    total = pl.scan_parquet(folder / "events.parquet").select(pl.len()).collect().item()
    target = pl.DataFrame({"service_id": list(perf_data.targets()), "e": list(perf_data.targets().values())})
    print(f"department scores, 6 departments close together, confidence {confidence:g}, {releases} releases "
          "(truth: the kept rows):")
    for contributions in (1, 3):
        for epsilon in (1.0, 4.0):
            spec = {"analysis": "department_scores", "epsilon": epsilon, "contributions": contributions,
                    "confidence": confidence}
            plan = local.engine.plan(spec, local.metadata, local.path)
            rows = bounded(local.engine.backend, plan.rows, not_null=("duration_hours",)).collect()
            truth = (rows.join(target, on="service_id").group_by("department")
                     .agg((pl.col("duration_hours").clip(0, 720).sum() / pl.col("e").sum()).alias("true"))
                     .with_columns(pl.col("true").rank("min").cast(pl.Int64).alias("true_rank")))
            totals = plan.exact_totals(local.engine.backend)
            score_all = rank_all = rank_each = cells = 0
            widths = []
            for _ in range(releases):
                table = plan.release(totals).table.join(truth, on="department")
                high = table["ci_high"].fill_null(float("inf"))
                score_all += bool(((table["ci_low"] <= table["true"]) & (table["true"] <= high)).all())
                inside = (table["rank_low"] <= table["true_rank"]) & (table["true_rank"] <= table["rank_high"])
                rank_all += bool(inside.all())
                rank_each += int(inside.sum())
                cells += table.height
                widths.append(float((table["rank_high"] - table["rank_low"] + 1).mean()))
            print(f"  L = {contributions} ({rows.height:,} of {total:,} rows kept), epsilon {epsilon:g}: score "
                  f"intervals all hold {score_all / releases:.1%}; rank ranges all hold {rank_all / releases:.1%}, "
                  f"each {rank_each / cells:.2%}; mean range {np.mean(widths):.2f} of {table.height} ranks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", type=int, default=200)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--people", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lagged_null(at_threshold(root / "null", args.people), args.releases, args.confidence)
        lagged_power(perf_data.write(root / "lagged", people=args.people, lagged=PLANTED), args.releases,
                     args.confidence)
        scores(perf_data.write(root / "ranks", people=20 * args.people // 3, department_speed=SPEEDS),
               args.releases, args.confidence)


if __name__ == "__main__":
    main()
