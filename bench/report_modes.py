"""The performance report in pure epsilon and in zCDP, side by side, against standalone counts.

Usage::

    python -m bench.report_modes [--people 200000] [--runs 5] [--epsilon 1]

On the demo data (scale S by default) the one-call performance report, at a total loss
of ``--epsilon``, splits that loss over its ~24 parts. Pure epsilon splits epsilon
(basic composition); zCDP (delta 1e-7) splits the rho whose (epsilon, delta) statement is
the same epsilon, so the parts compose by rho. For each accounting the script prints the
median relative error of the report's volumes per grouping against the true **bounded**
volumes (the noise alone: the same run with the noise removed), and the same for a
standalone count per service at the same total loss and contribution bound.
Issue 12's aims: volumes inside the report at most 2x the standalone count's error, and
at least 2x smaller than the pure-epsilon report's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from bench.demo import demo_dataset
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector
from civicdp.queries.engine import LocalDataset


@contextmanager
def noise_removed() -> Iterator[None]:
    """Every additive mechanism returns its exact input (the bounded truth), for this block only."""
    saved = LaplaceVector.release, GaussianVector.release
    LaplaceVector.release = GaussianVector.release = lambda self, values: [int(v) for v in values]  # type: ignore[method-assign]
    try:
        yield
    finally:
        LaplaceVector.release, GaussianVector.release = saved  # type: ignore[method-assign]


def with_accounting(source: Path, target: Path, accounting: dict[str, Any] | None) -> LocalDataset:
    """The demo dataset under ``target`` (files linked, not copied), declaring ``accounting``."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix == ".parquet":
            (target / path.name).symlink_to(path.resolve())
    metadata = json.loads((source / "metadata.json").read_text())
    if accounting:
        metadata["accounting"] = accounting
    (target / "metadata.json").write_text(json.dumps(metadata))
    return LocalDataset(target)


def relative_error(noisy: pl.Series, truth: pl.Series) -> float:
    keep = truth > 0
    return float(((noisy.filter(keep) - truth.filter(keep)).abs() / truth.filter(keep)).median())  # type: ignore[arg-type]


def report_errors(local: LocalDataset, epsilon: float, runs: int) -> dict[str, float]:
    spec = {"analysis": "performance_report", "epsilon": epsilon}
    with noise_removed():
        exact = local.run(spec).tables
    errors: dict[str, list[float]] = {}
    for _ in range(runs):
        tables = local.run(spec).tables
        for name, table in tables.items():
            if not name.startswith("by_") or "volume" not in table.columns:
                continue
            key = table.columns[0]
            joined = table.select(key, "volume").join(exact[name].select(key, pl.col("volume").alias("truth")), on=key)
            errors.setdefault(name[3:], []).append(relative_error(joined["volume"], joined["truth"]))
    return {name: statistics.median(values) for name, values in errors.items()}


def count_error(local: LocalDataset, epsilon: float, runs: int, contributions: int) -> float:
    spec = {"aggregate": "count", "group_by": ["service_id"], "epsilon": epsilon, "contributions": contributions}
    with noise_removed():
        truth = local.run(spec).table["value"]
    return statistics.median(relative_error(local.run({**spec, "confidence": 0.95 - i / 1000}).table["value"],
                                            truth) for i in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilon", type=float, default=1.0)
    args = parser.parse_args()
    source = demo_dataset("w5", args.people, args.seed)
    modes = {"pure": None, "zcdp": {"mode": "zcdp", "delta": 1e-7}}
    rows = {}
    for mode, accounting in modes.items():
        local = with_accounting(source, Path("bench/out") / f"report-modes-{mode}", accounting)
        local.engine.backend.scan(local.path, local.metadata, "events")  # type: ignore[attr-defined]  # ranking, once
        contributions = local.metadata.max_contributions
        rows[mode] = (report_errors(local, args.epsilon, args.runs),
                      count_error(local, args.epsilon, args.runs, contributions))
    print(f"performance report at total epsilon {args.epsilon:g}, {args.people:,} people, median of {args.runs} runs; "
          "median relative error of volumes against the bounded truth (noise only)")
    groupings = list(rows["pure"][0])
    print(f"{'accounting':<12}" + "".join(f"{g:>14}" for g in groupings) + f"{'count/service':>16}"
          + f"{'report/count':>14}")
    for mode, (errors, standalone) in rows.items():
        ratio = errors.get("service_id", float("nan")) / standalone
        print(f"{mode:<12}" + "".join(f"{errors[g]:>14.2%}" for g in groupings) + f"{standalone:>16.2%}"
              + f"{ratio:>14.2f}")
    pure, zcdp = rows["pure"][0], rows["zcdp"][0]
    gains = {g: pure[g] / zcdp[g] for g in groupings if zcdp[g] > 0}
    print("pure / zCDP error of the report's volumes: " + ", ".join(f"{g} {v:.2f}x" for g, v in gains.items()))


if __name__ == "__main__":
    main()
