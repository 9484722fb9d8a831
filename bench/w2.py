"""W2 — bundle discovery, as ../shared/BENCHMARKS.md defines it.

Usage::

    python -m bench.w2 --people 200000 [--runs 5] [--seed 1] [--groceries ../shared/data/groceries]
                       [--rule top_pairs|quantile] [--epsilon 1] [--top-k 50] [--coverage 200]

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
and 0.25, with and without noise, with the default settings, the "quantile" rule and a
fixed small number of pairs per person. ``--rule`` picks the rule of the demo runs
(default: the analysis's default); ``--epsilon`` and ``--top-k`` their loss and length
(``--people 20000 --seed 3 --epsilon 3 --top-k 100`` is the tests' planted-bundle setting).

``--coverage N`` (W6) adds, over N releases (the bound chosen privately afresh every 20),
the share of the rows' count intervals that cover the true bounded count, the share of
rows whose true count is 0 yet whose interval lies above 0, and for ``bundle_changes``
the releases that flag a change: on the demo data, on groceries, on groceries with one
purchase per member (no pair at all: every true count is 0), and for changes with the
same period as baseline and period (every true change is exactly 0) and with 2014
against 2015 (coverage of the true bounded change of support). Each figure is printed
for the answer's intervals (simultaneous over every catalogue pair) and, for comparison,
for per-pair intervals (the construction before issue 12, recomputed here only).
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
from civicdp.queries.analyses import bundle_tables as tables
from civicdp.queries.analyses.bundle_tables import NoisyCounts, top_pairs
from civicdp.queries.analyses.bundles import BundlesPlan
from civicdp.queries.analyses.pairs import MAX_ROWS, PAIR, person_events, person_pairs
from civicdp.queries.engine import Engine, LocalDataset

SPEC = {"analysis": "bundles", "window_days": 30, "top_k": 50, "epsilon": 1.0}


def unbounded_counts(plan: BundlesPlan, engine: Engine) -> np.ndarray:
    """True people per pair: every person's every pair within the window (no pair bound, no noise)."""
    s = plan.setting
    backend = engine.backend
    rows = backend.bound(backend.scan(s.dataset_dir, s.metadata, s.table), s.metadata, s.table, MAX_ROWS)
    conditions = [backend.row_condition(f) for f in s.filters]
    (start, end), = s.periods
    events = person_events(rows, s.unit, s.item, s.time, s.space, conditions, start, end)
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


def run_demo(data: Path, runs: int, rule: str | None = None, epsilon: float = 1.0, top_k: int = 50,
             coverage_releases: int = 0) -> None:
    global SPEC
    SPEC = {**SPEC, "epsilon": epsilon, "top_k": top_k, **({"max_pairs_rule": rule} if rule else {})}
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
    truth_top = set(np.argsort(-truth, kind="stable")[:top_k].tolist())  # type: ignore[arg-type]
    print(f"plain Polars, unbounded pair counts (reference): median {statistics.median(plain_times):.2f} s; "
          f"{len(planted_pairs)} planted pairs, {len(truth_top & planted_pairs)} of them in the true top {top_k}")
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
        exact.append(_figures(top_pairs(quiet, top_k), truth_top, planted_pairs))
    dp, reference = statistics.median(times), statistics.median(plain_times)
    print(f"bundles query (epsilon {epsilon:g}, top {top_k}, 30 days): median {dp:.2f} s over {runs} runs; "
          f"ratio DP / plain {dp / reference:.2f}; pairs per person chosen: {chosen}")
    for name, figures in (("with noise", noisy), ("without noise (bounding only)", exact)):
        recall, precision = np.median(np.array(figures), axis=0)
        print(f"  {name}: recall of planted pairs in top {top_k} {recall:.3f} "
              f"(min {min(f[0] for f in figures):.3f}); precision@{top_k} vs true top {top_k} {precision:.3f} "
              f"(min {min(f[1] for f in figures):.3f})")
    print(f"  planted bundles recovered exactly: median {statistics.median(bundles_found)} of {len(planted_bundles)} "
          f"(runs {bundles_found})")
    print(f"peak memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if coverage_releases:
        print(f"\ncoverage after selection, demo data ({coverage_releases} releases each):")
        pair_coverage("bundles", plan, engine, coverage_releases)
        (start, end), = plan.setting.periods
        same = {"start": start.isoformat(), "end": end.isoformat()}
        changes = engine.plan({**SPEC, "analysis": "bundle_changes", "baseline": same, "period": same},
                              dataset.metadata, data)
        change_coverage("bundle_changes, the same period twice (no change)", changes, engine, coverage_releases)


def groceries_dataset(source: Path, out: Path, accounting: dict | None = None) -> Path:
    """The grocery transactions as a civicdp dataset: member -> person, item -> service, date -> time.

    ``accounting`` (e.g. ``{"mode": "zcdp", "delta": 1e-7}``) is declared in its metadata.
    """
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
    if accounting:
        metadata["accounting"] = accounting
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1))
    return out


def groceries_without_pairs(source: Path, out: Path) -> Path:
    """The groceries data with one purchase per member (the first): no pair at all, every true count 0."""
    full = groceries_dataset(source, Path("bench/out/groceries"))
    if (out / "metadata.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    events = pl.read_parquet(full / "events.parquet")
    events.sort("person_id", "request_time", "service_id").unique("person_id", keep="first", maintain_order=True) \
        .write_parquet(out / "events.parquet")
    metadata = json.loads((full / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**metadata, "name": "groceries-no-pairs"}, indent=1))
    return out


class _PerPair(NoisyCounts):
    """Released counts whose pair intervals are per pair: the construction before issue 12 (comparison only)."""

    def all_pairs_half(self, alpha: float) -> float:
        return self.pair_half(alpha)


def _per_pair(counts: NoisyCounts) -> NoisyCounts:
    return _PerPair(counts.pairs, counts.items, counts.people, counts.pair_mechanism, counts.item_mechanism)


def pair_coverage(label: str, plan: BundlesPlan, engine: Engine, releases: int, batch: int = 20) -> None:
    """Over ``releases``: rows whose count interval covers the true bounded count, rows of true 0 above 0."""
    s = plan.setting
    events, pairs = plan.person_pairs(engine.backend)
    figures = {"simultaneous (now)": [0, 0, 0, 0], "per pair (before)": [0, 0, 0, 0]}  # covered, rows, zero, zero above
    runs_missing = {name: 0 for name in figures}
    chosen = []
    for start in range(0, releases, batch):
        exact = plan.bounded_from(events, pairs)
        chosen.append(exact.max_pairs)
        truth = exact.pairs[0]
        for _ in range(min(batch, releases - start)):
            counts = plan.release(exact)[0]
            top = top_pairs(counts, s.top_k)
            for name, view in (("simultaneous (now)", counts), ("per pair (before)", _per_pair(counts))):
                table = tables.pair_table(view, s.space, s.item, top, s.alpha, plan.spec.min_confidence)
                low, high = table["ci_low"].to_numpy(), table["ci_high"].to_numpy()
                true = truth[top]
                inside = (low <= true) & (true <= high)
                f = figures[name]
                f[0] += int(inside.sum())
                f[1] += len(top)
                f[2] += int((true == 0).sum())
                f[3] += int(((true == 0) & (low > 0)).sum())
                runs_missing[name] += int(not inside.all())
    print(f"  {label} (top {s.top_k}, pairs per person chosen {sorted(set(chosen))}):")
    for name, (covered, rows, zero, zero_above) in figures.items():
        print(f"    {name}: {covered / rows:.1%} of {rows} rows cover the true bounded count; "
              f"releases with a row missing {runs_missing[name]} of {releases}; rows with true count 0: "
              f"{zero / rows:.0%}, of them shown above 0: {zero_above / max(zero, 1):.1%}")


def change_coverage(label: str, plan: BundlesPlan, engine: Engine, releases: int, batch: int = 20) -> None:
    """Over ``releases`` of ``bundle_changes``: change intervals covering the true bounded change, and flags."""
    s = plan.setting
    events, pairs = plan.person_pairs(engine.backend)
    index = {str(k): i for i, k in enumerate(s.space.keys)}
    figures = {"simultaneous (now)": [0, 0, 0, 0, 0], "per pair (before)": [0, 0, 0, 0, 0]}
    # covered, rows, releases flagging anything, flagged rows, wrongly flagged rows (true change 0 or of the other sign)
    for start in range(0, releases, batch):
        exact = plan.bounded_from(events, pairs)
        true_support = [p / max(n, 1) for p, n in zip(exact.pairs, exact.people)]
        for _ in range(min(batch, releases - start)):
            released = plan.release(exact)
            union = np.array(sorted(set(top_pairs(released[0], s.top_k).tolist())
                                    | set(top_pairs(released[1], s.top_k).tolist())), dtype=np.int64)
            per_pair = [_per_pair(c) for c in released]
            for name, views in (("simultaneous (now)", released), ("per pair (before)", per_pair)):
                table = tables.change_table(views[0], views[1], s.space, s.item, union, s.alpha)
                rows = s.space.index(np.array([index[str(a)] for a in table[f"{s.item}_a"]]),
                                     np.array([index[str(b)] for b in table[f"{s.item}_b"]]))
                true = true_support[1][rows] - true_support[0][rows]
                low = table["change_low"].fill_null(-np.inf).to_numpy()
                high = table["change_high"].fill_null(np.inf).to_numpy()
                status = table["status"].to_numpy()
                up, down = np.isin(status, ["appeared", "strengthened"]), np.isin(status, ["vanished", "weakened"])
                f = figures[name]
                f[0] += int(((low <= true + 1e-12) & (true <= high + 1e-12)).sum())
                f[1] += len(rows)
                f[2] += int((up | down).any())
                f[3] += int((up | down).sum())
                f[4] += int((up & (true <= 0)).sum() + (down & (true >= 0)).sum())
    print(f"  {label} (top {s.top_k} of each period):")
    for name, (covered, rows, releases_flagging, flagged, wrong) in figures.items():
        print(f"    {name}: {covered / rows:.1%} of {rows} change intervals cover the true bounded change; "
              f"releases flagging a change {releases_flagging} of {releases}; flagged rows {flagged}, "
              f"of them wrong (true change 0 or of the other sign) {wrong}")


def run_groceries(source: Path, runs: int, coverage_releases: int = 0, accounting: str = "pure") -> None:
    declared = {"mode": "zcdp", "delta": 1e-7} if accounting == "zcdp" else None
    data = groceries_dataset(source, Path("bench/out/groceries" + ("-zcdp" if declared else "")), declared)
    print(f"\naccounting: {accounting}" + (" (delta 1e-7: Gaussian pair counts, L2 sensitivity sqrt(k))"
                                          if declared else ""))
    engine = Engine()
    dataset = LocalDataset(data, engine)
    base = {"analysis": "bundles", "window_days": 30, "top_k": 20}
    plan = engine.plan({**base, "epsilon": 1.0}, dataset.metadata, data)
    assert isinstance(plan, BundlesPlan)
    truth = unbounded_counts(plan, engine)
    truth_top = set(np.argsort(-truth, kind="stable")[:20].tolist())
    print(f"\ngroceries ({dataset.metadata.tables['events'].columns['service_id'].keys.__len__()} items): "
          f"true top-20 counts {int(truth[list(truth_top)].min())}..{int(truth.max())} members")
    settings = ((None, None), ("auto", "quantile"), (2, None), (5, None))
    for epsilon, (max_pairs, rule) in itertools.product((1.0, 0.25), settings):
        spec = {**base, "epsilon": epsilon, **({"max_pairs": max_pairs} if max_pairs else {}),
                **({"max_pairs_rule": rule} if rule else {})}
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
        label = f"auto ({rule})" if rule else str(max_pairs) if max_pairs else "default"
        print(f"  epsilon {epsilon:g}, max_pairs {label:>16}: overlap of private top 20 with true top 20 "
              f"median {statistics.median(overlaps):.2f} (runs {overlaps}); without noise "
              f"{statistics.median(quiet):.2f}; pairs per person {sorted(set(chosen))}")
    if coverage_releases:
        print(f"\ncoverage after selection, groceries (epsilon 1, default settings, {coverage_releases} "
              "releases each):")
        spec = {**base, "epsilon": 1.0}
        plan = engine.plan(spec, dataset.metadata, data)
        pair_coverage("bundles", plan, engine, coverage_releases)  # type: ignore[arg-type]
        empty = groceries_without_pairs(source, Path("bench/out/groceries-no-pairs"))
        empty_set = LocalDataset(empty, engine)
        pair_coverage("bundles, one purchase per member (no pair at all)",
                      engine.plan(spec, empty_set.metadata, empty), engine, coverage_releases)  # type: ignore[arg-type]
        years = {"baseline": {"start": "2014-01-01", "end": "2015-01-01"},
                 "period": {"start": "2015-01-01", "end": "2016-01-01"}}
        same = {"baseline": years["baseline"], "period": years["baseline"]}
        for name, periods in (("bundle_changes, 2014 against 2014 (no change)", same),
                              ("bundle_changes, 2014 against 2015", years)):
            plan = engine.plan({**spec, "analysis": "bundle_changes", **periods}, dataset.metadata, data)
            change_coverage(name, plan, engine, coverage_releases)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: bench/out/w2-PEOPLE-SEED)")
    parser.add_argument("--groceries", type=Path, default=None, help="folder of Groceries_dataset.csv (optional)")
    parser.add_argument("--rule", choices=("top_pairs", "quantile"), default=None,
                        help='how "auto" chooses the pairs per person in the demo runs (default: the default rule)')
    parser.add_argument("--epsilon", type=float, default=1.0, help="loss of the demo runs (default 1)")
    parser.add_argument("--top-k", type=int, default=50, help="pairs asked in the demo runs (default 50)")
    parser.add_argument("--coverage", type=int, default=0, metavar="N",
                        help="also measure the intervals' coverage after selection over N releases (W6)")
    parser.add_argument("--skip-demo", action="store_true", help="only the groceries figures")
    parser.add_argument("--accounting", choices=("pure", "zcdp", "both"), default="pure",
                        help="the groceries dataset's accounting (default pure; both: side by side)")
    args = parser.parse_args()
    if not args.skip_demo:
        run_demo(demo_dataset("w2", args.people, args.seed, args.data), args.runs, args.rule, args.epsilon,
                 args.top_k, args.coverage)
    if args.groceries is not None:
        for accounting in (("pure", "zcdp") if args.accounting == "both" else (args.accounting,)):
            run_groceries(args.groceries, args.runs, args.coverage, accounting)


if __name__ == "__main__":
    main()
