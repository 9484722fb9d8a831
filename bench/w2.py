"""W2 — bundle discovery, as ../shared/BENCHMARKS.md defines it.

Usage::

    python -m bench.w2 --people 200000 [--runs 5] [--seed 1] [--groceries ../shared/data/groceries]
                       [--rule top_pairs|quantile]

Generates (or reuses) the demo dataset in bench/out/, then for several runs asks the
``bundles`` analysis (top 50 pairs used by the same person within 30 days, epsilon 1)
and prints: the median time and peak memory; the recall of the planted bundle pairs in
the private top 50; the precision of the private top 50 against the true top 50
(non-private, unbounded: every person's every pair); the planted bundles recovered
exactly; and the same figures **without noise** — the same bounded pipeline with the
noise step skipped here, in the benchmark only — so that the bias of bounding and the
effect of noise are seen apart. The reference is the unbounded pair counting in plain
Polars, timed in the same run.

With ``--groceries`` it also runs on real grocery data (members, items, dates; see its
README): overlap of the private top 20 pairs with the non-private top 20 at epsilon 1
and 0.25, with and without noise, with both rules that choose the pairs per person
("auto") and with a fixed small number of pairs per person. ``--rule`` picks the rule of
the demo runs (default: the analysis's default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import polars as pl

from bench.demo import demo_dataset
from queries.analyses.bundle_tables import NoisyCounts, top_pairs
from queries.analyses.bundles import BundlesPlan
from queries.analyses.pairs import PAIR, person_events, person_pairs
from queries.engine import Engine, LocalDataset

SPEC = {"analysis": "bundles", "window_days": 30, "top_k": 50, "epsilon": 1.0}


def unbounded_counts(plan: BundlesPlan, engine: Engine) -> np.ndarray:
    """True people per pair: every person's every pair within the window (no pair bound, no noise)."""
    s = plan.setting
    frame = engine.backend.scan(s.dataset_dir, s.metadata, s.table)  # type: ignore[attr-defined]
    (start, end), = s.periods
    events = person_events(frame, s.unit, s.item, s.time, s.space, s.filters, start, end)
    pairs = person_pairs(events, s.window_seconds, s.space).collect()
    return np.bincount(pairs[PAIR].to_numpy(), minlength=s.space.n_pairs)


def without_noise(plan: BundlesPlan, engine: Engine, max_pairs: int) -> NoisyCounts:
    """The bounded exact counts dressed as a release (benchmark only: the product always adds noise)."""
    exact = plan.bounded_counts(engine.backend, max_pairs)
    released = plan.release(exact)[0]  # for the mechanisms (interval widths) only
    return NoisyCounts(exact.pairs[0], exact.items[0], exact.people[0], released.pair_mechanism,
                       released.item_mechanism)


def planted(data: Path, keys: list[str]) -> tuple[set[int], list[frozenset[str]]]:
    bundles = json.loads((data / "bundles.json").read_text())
    index = {k: i for i, k in enumerate(keys)}
    n = len(keys)
    pairs = set()
    for bundle in bundles:
        for a, b in itertools.combinations(sorted(bundle["services"], key=index.__getitem__), 2):
            i, j = index[a], index[b]
            pairs.add(i * n - i * (i + 1) // 2 + (j - i - 1))
    return pairs, [frozenset(b["services"]) for b in bundles]


def _figures(top: np.ndarray, truth_top: set[int], planted_pairs: set[int]) -> tuple[float, float]:
    chosen = set(top.tolist())
    return len(chosen & planted_pairs) / len(planted_pairs), len(chosen & truth_top) / len(truth_top)


def run_demo(data: Path, runs: int, rule: str | None = None) -> None:
    global SPEC
    if rule is not None:
        SPEC = {**SPEC, "max_pairs_rule": rule}
    print(f"spec: {SPEC}")
    engine = Engine()
    dataset = LocalDataset(data, engine)
    started = time.perf_counter()
    engine.backend.scan(data, dataset.metadata, "events")  # type: ignore[attr-defined]  # one-off ranking
    print(f"prepare (per-person ranking, once per table): {time.perf_counter() - started:.2f} s")
    plan = engine.plan(SPEC, dataset.metadata, data)
    assert isinstance(plan, BundlesPlan)
    keys = [str(k) for k in plan.setting.space.keys]
    planted_pairs, planted_bundles = planted(data, keys)
    plain_times, truth = [], None
    for _ in range(runs):
        t = time.perf_counter()
        truth = unbounded_counts(plan, engine)
        plain_times.append(time.perf_counter() - t)
    truth_top = set(np.argsort(-truth, kind="stable")[:50].tolist())  # type: ignore[arg-type]
    print(f"plain Polars, unbounded pair counts (reference): median {statistics.median(plain_times):.2f} s; "
          f"{len(planted_pairs)} planted pairs, {len(truth_top & planted_pairs)} of them in the true top 50")
    times, noisy, exact, bundles_found, chosen = [], [], [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        result = dataset.run(SPEC)
        times.append(time.perf_counter() - t)
        chosen.append(result.contributions)
        index = {k: i for i, k in enumerate(keys)}
        answer = plan.setting.space.index(np.array([index[a] for a in result.table["service_id_a"]]),
                                          np.array([index[b] for b in result.table["service_id_b"]]))
        noisy.append(_figures(answer, truth_top, planted_pairs))
        found = {frozenset(m.split(" + ")) for m in result.tables["bundles"]["members"]}
        bundles_found.append(len(found & set(planted_bundles)))
        quiet = without_noise(plan, engine, result.contributions)
        exact.append(_figures(top_pairs(quiet, 50), truth_top, planted_pairs))
    dp, reference = statistics.median(times), statistics.median(plain_times)
    print(f"bundles query (epsilon 1, top 50, 30 days): median {dp:.2f} s over {runs} runs; "
          f"ratio DP / plain {dp / reference:.2f}; pairs per person chosen: {chosen}")
    for name, figures in (("with noise", noisy), ("without noise (bounding only)", exact)):
        recall, precision = np.median(np.array(figures), axis=0)
        print(f"  {name}: recall of planted pairs in top 50 {recall:.3f} (min {min(f[0] for f in figures):.3f}); "
              f"precision@50 vs true top 50 {precision:.3f} (min {min(f[1] for f in figures):.3f})")
    print(f"  planted bundles recovered exactly: median {statistics.median(bundles_found)} of {len(planted_bundles)}")
    print(f"peak memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def groceries_dataset(source: Path, out: Path) -> Path:
    """The grocery transactions as a civicdp dataset: member -> person, item -> service, date -> time."""
    if (out / "metadata.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    raw = pl.read_csv(source / "Groceries_dataset.csv")
    items = sorted(raw["itemDescription"].unique().to_list())
    # events: [person_id, service_id, request_time]
    events = raw.select(pl.col("Member_number").cast(pl.Int64).alias("person_id"),
                        pl.col("itemDescription").alias("service_id"),
                        pl.col("Date").str.strptime(pl.Datetime("us"), "%d-%m-%Y").alias("request_time"))
    events.write_parquet(out / "events.parquet")
    metadata = {"name": "groceries", "version": "kaggle-2020", "privacy_unit": "person_id",
                "max_contributions": 10, "tables": {"events": {"path": "events.parquet", "columns": {
                    "person_id": {"type": "int", "identifier": True},
                    "service_id": {"type": "str", "keys": items},
                    "request_time": {"type": "datetime", "bounds": ["2014-01-01T00:00:00", "2016-01-01T00:00:00"]}}}}}
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1))
    return out


def run_groceries(source: Path, runs: int) -> None:
    data = groceries_dataset(source, Path("bench/out/groceries"))
    engine = Engine()
    dataset = LocalDataset(data, engine)
    base = {"analysis": "bundles", "window_days": 30, "top_k": 20}
    plan = engine.plan({**base, "epsilon": 1.0}, dataset.metadata, data)
    assert isinstance(plan, BundlesPlan)
    truth = unbounded_counts(plan, engine)
    truth_top = set(np.argsort(-truth, kind="stable")[:20].tolist())
    print(f"\ngroceries ({dataset.metadata.tables['events'].columns['service_id'].keys.__len__()} items): "
          f"true top-20 counts {int(truth[list(truth_top)].min())}..{int(truth.max())} members")
    settings = (("auto", "top_pairs"), ("auto", "quantile"), (2, None), (5, None))
    for epsilon, (max_pairs, rule) in itertools.product((1.0, 0.25), settings):
        spec = {**base, "epsilon": epsilon, "max_pairs": max_pairs, **({"max_pairs_rule": rule} if rule else {})}
        plan = engine.plan(spec, dataset.metadata, data)
        overlaps, quiet, chosen = [], [], []
        for _ in range(runs):
            result = dataset.run(spec)
            chosen.append(result.contributions)
            found = {(a, b) for a, b in zip(result.table["service_id_a"], result.table["service_id_b"])}
            keys = list(plan.setting.space.keys)
            first, second = plan.setting.space.members()
            true_pairs = {(keys[first[i]], keys[second[i]]) for i in truth_top}
            overlaps.append(len(found & true_pairs) / 20)
            exact = top_pairs(without_noise(plan, engine, result.contributions), 20)  # type: ignore[arg-type]
            quiet.append(len(set(exact.tolist()) & truth_top) / 20)
        label = f"auto ({rule})" if rule else str(max_pairs)
        print(f"  epsilon {epsilon:g}, max_pairs {label:>16}: overlap of private top 20 with true top 20 "
              f"median {statistics.median(overlaps):.2f} (runs {overlaps}); without noise "
              f"{statistics.median(quiet):.2f}; pairs per person {sorted(set(chosen))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: bench/out/w2-PEOPLE-SEED)")
    parser.add_argument("--groceries", type=Path, default=None, help="folder of Groceries_dataset.csv (optional)")
    parser.add_argument("--rule", choices=("top_pairs", "quantile"), default=None,
                        help='how "auto" chooses the pairs per person in the demo runs (default: the default rule)')
    parser.add_argument("--skip-demo", action="store_true", help="only the groceries figures")
    args = parser.parse_args()
    if not args.skip_demo:
        run_demo(demo_dataset("w2", args.people, args.seed, args.data), args.runs, args.rule)
    if args.groceries is not None:
        run_groceries(args.groceries, args.runs)


if __name__ == "__main__":
    main()
