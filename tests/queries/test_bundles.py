"""Bundle discovery: exact pair counting, the bounding's sensitivity, calibrated noise,
planted-bundle recovery, period comparisons and clear errors.

Test data is drawn from seeded numpy generators (synthetic input, not privacy noise).
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from civicdp.queries.analyses.bundles import BundlesPlan
from civicdp.queries.analyses.pairs import PairSpace
from civicdp.queries.engine import Engine, LocalDataset
from civicdp.queries.errors import QueryError
from tests.conftest import PERIOD, MakeDataset, base_metadata

SERVICES = tuple("ABCDEF")  # 15 pairs
WINDOW = timedelta(days=30)


def _metadata(services: tuple[str, ...] = SERVICES) -> dict[str, Any]:
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["service"]["keys"] = list(services)
    return metadata


def _frame(rows: list[tuple[int, str, datetime]], channel: str = "web") -> pl.DataFrame:
    """Events ``(person, service, time)`` with the other columns of the test schema filled in."""
    n = len(rows)
    # events: [event_id, person_id, service, channel, request_time, waiting_minutes, satisfaction, remark, score]
    return pl.DataFrame({
        "event_id": np.arange(n, dtype=np.int64),
        "person_id": np.array([r[0] for r in rows], dtype=np.int64),
        "service": [r[1] for r in rows],
        "channel": [channel] * n,
        "request_time": pl.Series([r[2] for r in rows], dtype=pl.Datetime("us")),
        "waiting_minutes": [1.0] * n,
        "satisfaction": np.full(n, 3, dtype=np.int64),
        "remark": ["r"] * n,
        "score": [0.0] * n,
    })


def _random_rows(people: int, seed: int, services: tuple[str, ...] = SERVICES,
                 most: int = 8) -> list[tuple[int, str, datetime]]:
    rng = np.random.default_rng(seed)
    seconds = int((PERIOD[1] - PERIOD[0]).total_seconds())
    rows = []
    for person in range(people):
        for _ in range(int(rng.integers(1, most + 1))):
            moment = PERIOD[0] + timedelta(seconds=int(rng.integers(0, seconds)))
            rows.append((person, services[int(rng.integers(0, len(services)))], moment))
    return rows


def _reference_pairs(rows: list[tuple[int, str, datetime]], window: timedelta = WINDOW) -> dict[tuple[str, str], int]:
    """People per pair, by brute force: the definition written as plainly as possible."""
    per_person: dict[int, set[tuple[str, str]]] = {}
    by_person: dict[int, list[tuple[str, datetime]]] = {}
    for person, service, moment in rows:
        by_person.setdefault(person, []).append((service, moment))
    for person, uses in by_person.items():
        for (s1, t1), (s2, t2) in itertools.combinations(uses, 2):
            if s1 != s2 and abs(t1 - t2) <= window:
                per_person.setdefault(person, set()).add(tuple(sorted((s1, s2))))  # type: ignore[arg-type]
    counts: dict[tuple[str, str], int] = {}
    for pairs in per_person.values():
        for pair in pairs:
            counts[pair] = counts.get(pair, 0) + 1
    return counts


def _as_dict(space: PairSpace, counts: np.ndarray) -> dict[tuple[str, str], int]:
    first, second = space.members()
    return {(space.keys[i], space.keys[j]): int(c) for i, j, c in zip(first, second, counts) if c}


def _plan(dataset: LocalDataset, **spec: Any) -> BundlesPlan:
    plan = dataset.engine.plan({"analysis": "bundles", "item": "service", **spec}, dataset.metadata, dataset.path)
    assert isinstance(plan, BundlesPlan)
    return plan


# -- exact counting ---------------------------------------------------------------------------


def test_pairs_are_counted_as_defined(make_dataset: MakeDataset) -> None:
    """Distinct pairs of different services at most the window apart, once per person."""
    rows = _random_rows(300, seed=1)
    dataset = make_dataset(_frame(rows), _metadata())
    plan = _plan(dataset, epsilon=1, max_pairs=1000, max_items=6)
    exact = plan.bounded_counts(dataset.engine.backend)
    assert _as_dict(plan.setting.space, exact.pairs[0]) == _reference_pairs(rows)
    people_per_service = {s: len({person for person, service, _ in rows if service == s}) for s in SERVICES}
    assert dict(zip(SERVICES, exact.items[0].tolist())) == people_per_service
    assert exact.people[0] == 300


def test_the_window_is_inclusive_to_the_second(make_dataset: MakeDataset) -> None:
    start = datetime(2025, 2, 1)
    rows = [(0, "A", start), (0, "B", start + WINDOW),                       # exactly 30 days: a pair
            (1, "A", start), (1, "C", start + WINDOW + timedelta(seconds=1)),  # one second more: none
            (2, "D", start), (2, "D", start), (2, "E", start), (2, "E", start),  # repeated uses: one pair
            (3, "F", start), (3, "F", start + timedelta(days=1))]            # same service: no pair
    dataset = make_dataset(_frame(rows), _metadata())
    plan = _plan(dataset, epsilon=1, max_pairs=10)
    exact = plan.bounded_counts(dataset.engine.backend)
    assert _as_dict(plan.setting.space, exact.pairs[0]) == {("A", "B"): 1, ("D", "E"): 1}


# -- bounding ---------------------------------------------------------------------------------


def test_a_heavy_person_moves_the_counts_by_at_most_the_declared_bounds(make_dataset: MakeDataset) -> None:
    """Adding a person with hundreds of uses of every service changes the exact bounded pair
    vector by at most max_pairs in L1 (and items + people by max_items + 1), and nobody else's."""
    services = tuple(f"S{i:02d}" for i in range(40))  # 780 pairs
    rows = _random_rows(200, seed=2, services=services)
    start = datetime(2025, 3, 1)
    heavy = [(10_000, services[i % 40], start + timedelta(hours=i)) for i in range(400)]
    metadata = _metadata(services)
    small = make_dataset(_frame(rows), metadata, name="without")
    large = make_dataset(_frame(rows + heavy), metadata, name="with")
    for max_pairs, max_items in ((5, 3), (1, 1), (37, 12)):
        before = _plan(small, epsilon=1, max_pairs=max_pairs, max_items=max_items).bounded_counts(small.engine.backend)
        after = _plan(large, epsilon=1, max_pairs=max_pairs, max_items=max_items).bounded_counts(large.engine.backend)
        pair_change = after.pairs[0] - before.pairs[0]
        item_change = np.append(after.items[0] - before.items[0], after.people[0] - before.people[0])
        assert pair_change.min() >= 0 and item_change.min() >= 0
        assert int(pair_change.sum()) == max_pairs  # the heavy person fills the bound, no more
        assert int(item_change.sum()) == max_items + 1
    # Without the bound the same person would move 780 counts: the check above has teeth.
    before = _plan(small, epsilon=1, max_pairs=1000).bounded_counts(small.engine.backend)
    after = _plan(large, epsilon=1, max_pairs=1000).bounded_counts(large.engine.backend)
    assert int((after.pairs[0] - before.pairs[0]).sum()) == 780


def _heavy_person(services: tuple[str, ...], starts: tuple[datetime, ...]) -> list[tuple[int, str, datetime]]:
    """One person using every service hourly from each start: every catalogue pair, in every period."""
    return [(10_000, services[i % len(services)], start + timedelta(hours=i))
            for start in starts for i in range(10 * len(services))]


@pytest.mark.parametrize("periods", [
    {},
    {"analysis": "bundle_changes", "baseline": {"start": "2025-01-01", "end": "2025-04-01"},
     "period": {"start": "2025-04-01", "end": "2025-07-01"}},
], ids=["bundles", "bundle-changes"])
def test_a_heavy_person_moves_each_top_pairs_score_by_at_most_the_declared_sensitivity(
        make_dataset: MakeDataset, periods: dict[str, Any]) -> None:
    """The "top_pairs" rule scores every candidate bound by its top_k-th bounded pair count
    minus a public noise level. Adding a person with 400 uses of all 40 services (all 780
    pairs, in each period) moves each score by at most the selector's sensitivity, 1, and
    by exactly 1 for some candidate: a score that moved more (a sum of top counts, counts
    under a data-dependent bound, a sum over periods) fails here."""
    services = tuple(f"S{i:02d}" for i in range(40))  # 780 pairs
    rows = _random_rows(300, seed=2, services=services, most=20)
    heavy = _heavy_person(services, (datetime(2025, 2, 1), datetime(2025, 5, 1)))
    metadata = _metadata(services)
    small = make_dataset(_frame(rows), metadata, name="without")
    large = make_dataset(_frame(rows + heavy), metadata, name="with")
    for top_k in (1, 5, 50, 780):
        spec = {"epsilon": 1, "top_k": top_k, "max_pairs_rule": "top_pairs", **periods}
        plan = _plan(small, **spec)
        assert plan.selector is not None and plan.selector.sensitivity == 1
        candidates, before, scores_before = plan.top_pairs_scores(plan.person_pairs(small.engine.backend)[1])
        large_plan = _plan(large, **spec)
        _, after, scores_after = large_plan.top_pairs_scores(large_plan.person_pairs(large.engine.backend)[1])
        change = scores_after - scores_before
        assert np.abs(change).max() == plan.selector.sensitivity, f"top_k {top_k}: score changes {change}"
        # The count vectors themselves: the heavy person adds min(k, 780) pairs under bound k.
        for c_before, c_after in zip(before, after):
            added = c_after - c_before
            assert added.min() >= 0 and added.max() <= 1
            assert added.sum(axis=0).tolist() == [min(k, 780) for k in candidates]
        # Each column is exactly the counts the fixed bound gives.
        for k in (candidates[0], candidates[1], candidates[3]):
            fixed = _plan(large, max_pairs=k, **spec).bounded_counts(large.engine.backend)
            assert all((a[:, candidates.index(k)] == f).all() for a, f in zip(after, fixed.pairs))
        assert len(after) == len(plan.setting.periods)


def test_the_selectors_loss_is_a_twentieth_or_a_tenth_of_epsilon(make_dataset: MakeDataset) -> None:
    """The top_pairs scores have sensitivity 1 and get 5% of the loss; the quantile's 9 and 10%."""
    dataset = make_dataset(_frame(_random_rows(50, seed=3)), _metadata())
    for rule, sensitivity, share in (("top_pairs", 1, 0.05), ("quantile", 9, 0.1)):
        plan = _plan(dataset, epsilon=2, max_pairs_rule=rule)
        assert plan.selector is not None and plan.selector.sensitivity == sensitivity
        assert float(plan.selector.loss.epsilon) == pytest.approx(2 * share, abs=1e-9)
        assert float(plan.loss.epsilon) == pytest.approx(2, abs=1e-9)
        assert f"({rule} rule)" in plan.describe().mechanisms[-1]["role"]


def _few_heavy_pairs() -> list[tuple[int, str, datetime]]:
    """600 light users, each with one of three pairs (200 people per pair), and 150 heavy
    users with 10–25 services within a few days (45–300 pairs each, at random)."""
    services = tuple(f"S{i:02d}" for i in range(30))  # 435 pairs
    rng = np.random.default_rng(11)
    start, rows = datetime(2025, 3, 1), []
    for person in range(600):
        a, b = services[2 * (person % 3)], services[2 * (person % 3) + 1]
        day = start + timedelta(days=int(rng.integers(0, 60)))
        rows += [(person, a, day), (person, b, day + timedelta(days=1))]
    for person in range(600, 750):
        used = rng.choice(len(services), size=int(rng.integers(10, 26)), replace=False)
        rows += [(person, services[i], start + timedelta(hours=int(h))) for h, i in enumerate(used)]
    return rows


def test_the_top_pairs_rule_chooses_a_small_bound_where_the_quantile_rule_chooses_a_large_one(
        make_dataset: MakeDataset) -> None:
    """Three pairs of 200 light users each are the top 3; a fifth of the people are heavy
    users with 45–300 pairs. The 90% quantile of pairs per person is among the heavy users
    (about 170), but every pair beyond the first only adds noise to the top 3: their
    counts barely grow with the bound while the noise grows in proportion.

    The scores are checked exactly; the private choices within margins that fail by chance
    with probability below 1e-5 (bounded from the scores' gaps in the test itself).
    """
    services = tuple(f"S{i:02d}" for i in range(30))
    dataset = make_dataset(_frame(_few_heavy_pairs()), _metadata(services))
    # Bundles of 2 items: the rule's candidates start at 1 pair per person (1, 2, 4, ...).
    top = _plan(dataset, epsilon=6, top_k=3, max_bundle_size=2)  # the default rule
    quantile = _plan(dataset, epsilon=6, top_k=3, max_pairs_rule="quantile")
    pairs = top.person_pairs(dataset.engine.backend)[1]
    top_candidates, _, top_scores = top.top_pairs_scores(pairs)
    assert top_candidates[int(np.argmin(top_scores))] == 1
    quantile_candidates, quantile_scores = quantile.quantile_rule_scores(pairs)
    assert quantile_candidates[int(np.argmin(quantile_scores))] >= 100
    runs = 3
    for plan, candidates, scores, good in ((top, top_candidates, top_scores, lambda k: k <= 44),
                                           (quantile, quantile_candidates, quantile_scores, lambda k: k >= 50)):
        assert plan.selector is not None
        # Permute-and-flip picks a candidate whose score is d above the best with
        # probability at most exp(-d / scale): the chance of any bad pick in the runs below.
        bad = np.array([s - scores.min() for k, s in zip(candidates, scores) if not good(k)], dtype=float)
        assert runs * np.exp(-bad / plan.selector.scale).sum() < 1e-5
        chosen = [plan.bounded_counts(dataset.engine.backend).max_pairs for _ in range(runs)]
        assert all(good(k) for k in chosen), f"{plan.spec.max_pairs_rule}: {chosen}"


def test_the_mechanisms_sensitivities_are_the_bounds(make_dataset: MakeDataset) -> None:
    dataset = make_dataset(_frame(_random_rows(50, seed=3)), _metadata())
    plan = _plan(dataset, epsilon=0.9, max_pairs=7, max_items=4)
    assert plan.pair_mechanism is not None and plan.pair_mechanism.sensitivity == 7
    assert plan.item_mechanism.sensitivity == 5
    # The loss is read from OpenDP's privacy maps and stays within the asked epsilon.
    assert float(plan.loss.epsilon) == pytest.approx(0.9, abs=1e-9)
    assert plan.loss.epsilon == plan.pair_mechanism.loss.epsilon + plan.item_mechanism.loss.epsilon


# -- noise ------------------------------------------------------------------------------------


def test_noise_is_present_and_has_the_declared_scale(make_dataset: MakeDataset) -> None:
    """The variance of (release - exact) matches discrete Laplace of the declared scale.

    600 pair samples and 280 item samples: the variance ratio has a relative standard
    deviation of about 0.09 and 0.14, so the bounds below fail by chance about once in
    10,000 runs; they fail for certain with the noise removed (ratio 0) or its scale
    doubled (ratio about 4) or halved (about 0.25).
    """
    dataset = make_dataset(_frame(_random_rows(200, seed=4)), _metadata())
    plan = _plan(dataset, epsilon=1, max_pairs=4, max_items=3, top_k=15)
    exact = plan.bounded_counts(dataset.engine.backend)
    pair_errors, item_errors = [], []
    for _ in range(40):
        released = plan.release(exact)[0]
        pair_errors.append(released.pairs - exact.pairs[0])
        item_errors.append(np.append(released.items - exact.items[0], released.people - exact.people[0]))
    for errors, mechanism in ((pair_errors, released.pair_mechanism), (item_errors, released.item_mechanism)):
        q = np.exp(-1 / mechanism.scale)
        expected = 2 * q / (1 - q) ** 2  # variance of discrete Laplace
        ratio = float(np.mean(np.concatenate(errors).astype(float) ** 2) / expected)
        assert 0.6 <= ratio <= 1.6, f"noise variance is {ratio:.2f} times the declared one"
    # Through the engine too: the answer differs from the exact counts.
    result = dataset.run({"analysis": "bundles", "item": "service", "epsilon": 1, "max_pairs": 4, "top_k": 15})
    released = dict(zip(zip(result.table["service_a"], result.table["service_b"]), result.table["value"]))
    exact_pairs = _as_dict(plan.setting.space, exact.pairs[0])
    assert any(released[pair] != exact_pairs.get(pair, 0) for pair in released)


def test_intervals_cover_the_exact_bounded_counts(make_dataset: MakeDataset) -> None:
    """95% intervals: of 15 pairs x 20 releases, at least 90% cover (expected 95%+; the bound
    fails by chance about once in 10,000 runs and always if pairs are miscounted)."""
    dataset = make_dataset(_frame(_random_rows(300, seed=5)), _metadata())
    plan = _plan(dataset, epsilon=0.5, max_pairs=3, top_k=15)
    exact = plan.bounded_counts(dataset.engine.backend)
    truth = _as_dict(plan.setting.space, exact.pairs[0])
    covered = total = 0
    for _ in range(20):
        table = plan.answer(plan.release(exact), exact.max_pairs).table
        for a, b, low, high in table.select("service_a", "service_b", "ci_low", "ci_high").iter_rows():
            covered += low <= truth.get((a, b), 0) <= high
            total += 1
    assert covered / total >= 0.9


# -- planted bundles --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LocalDataset:
    from civicdp.synthetic.demo_data import generate

    folder = tmp_path_factory.mktemp("demo")
    generate(20_000, folder, seed=3)
    return LocalDataset(folder, Engine())


def _planted(folder: Path) -> tuple[set[tuple[str, str]], list[frozenset[str]]]:
    bundles = json.loads((folder / "bundles.json").read_text())
    pairs = {tuple(p) for b in bundles for p in itertools.combinations(sorted(b["services"]), 2)}
    return pairs, [frozenset(b["services"]) for b in bundles]  # type: ignore[misc]


def test_planted_bundles_are_recovered(demo: LocalDataset) -> None:
    planted_pairs, planted_bundles = _planted(demo.path)
    result = demo.run({"analysis": "bundles", "epsilon": 3, "top_k": 100})
    found = set(zip(result.table["service_id_a"], result.table["service_id_b"]))
    assert len(found & planted_pairs) / len(planted_pairs) >= 0.9
    bundles = {frozenset(m.split(" + ")) for m in result.tables["bundles"]["members"]}
    assert len(bundles & set(planted_bundles)) >= 0.8 * len(planted_bundles)
    assert result.contributions >= 2  # the privately chosen pairs per person
    # Released top counts sit near the exact bounded counts (they are miscounted otherwise).
    plan = demo.engine.plan({"analysis": "bundles", "epsilon": 3, "top_k": 100}, demo.metadata, demo.path)
    exact = _as_dict(plan.setting.space, plan.bounded_counts(demo.engine.backend, result.contributions).pairs[0])
    inside = [low <= exact.get((a, b), 0) <= high for a, b, low, high in
              result.table.select("service_id_a", "service_id_b", "ci_low", "ci_high").iter_rows()]
    assert sum(inside) >= 0.85 * len(inside)


def test_bundle_changes_flag_only_changes_beyond_the_noise(make_dataset: MakeDataset) -> None:
    """A–B is used together only in the second quarter; C–D equally in both (and not within
    the window of A–B, so the bundles stay apart)."""
    rows, first, second = [], datetime(2025, 2, 1), datetime(2025, 4, 5)
    for person in range(400):
        rows += [(person, "C", first), (person, "D", first + timedelta(days=2)),
                 (person, "C", second), (person, "D", second + timedelta(days=2))]
        if person < 300:
            rows += [(person, "A", second + timedelta(days=60)), (person, "B", second + timedelta(days=61))]
    dataset = make_dataset(_frame(rows), _metadata())
    spec = {"analysis": "bundle-changes", "item": "service", "epsilon": 4, "max_pairs": 6, "top_k": 5,
            "baseline": {"start": "2025-01-01", "end": "2025-04-01"},
            "period": {"start": "2025-04-01", "end": "2025-07-01"}}
    result = dataset.run(spec)
    status = {(a, b): s for a, b, s in result.table.select("service_a", "service_b", "status").iter_rows()}
    assert status[("A", "B")] == "appeared"
    assert status[("C", "D")] == "no clear change"
    bundles = dict(zip(result.tables["bundles"]["members"], result.tables["bundles"]["status"]))
    assert bundles["A + B"] == "appeared" and bundles["C + D"] == "kept"
    assert any("same people" in note for note in result.notes)
    assert float(result.loss.epsilon) == pytest.approx(4, abs=1e-9)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, field, message", [
    ({"window_days": 0}, "window_days", "between 1 and 366"),
    ({"window_days": 5000}, "window_days", "between 1 and 366"),
    ({"window_days": 200, "period": {"start": "2025-01-01", "end": "2025-02-01"}}, "window_days", "longer than"),
    ({"top_k": 16}, "top_k", "between 1 and 15"),
    ({"top_k": 0}, "top_k", "between 1 and 15"),
    ({"filters": [{"column": "channel", "op": "eq", "value": "fax"}]}, "filters.0.value", "not a public key"),
    ({"filters": [{"column": "request_time", "op": "between", "start": "2025-01-01"}]}, "filters.0", "period"),
    ({"period": {"start": "2030-01-01", "end": "2030-02-01"}}, "period", "outside the dataset's period"),
    ({"period": {"start": "2025-03-01", "end": "2025-02-01"}}, "period", "at or after it ends"),
    ({"epsilon": None}, "epsilon", "give a privacy loss"),
    ({"accuracy": 20}, "epsilon", "not both"),
    ({"epsilon": None, "accuracy": 20}, "max_pairs", "fixed number of pairs"),
    ({"item": "remark"}, "item", "no public key set"),
    ({"item": "person_id"}, "item", "identifier"),
    ({"time": "service"}, "time", "not a time column"),
    ({"max_pairs": 0}, "max_pairs", "between 1 and 1000"),
    ({"max_items": 7}, "max_items", "between 1 and 6"),
], ids=["window-0", "window-absurd", "window-over-period", "k-too-large", "k-zero", "unknown-filter-value",
        "time-filter", "period-outside", "period-reversed", "no-loss", "loss-and-accuracy", "accuracy-auto",
        "item-without-keys", "item-identifier", "time-not-time", "max-pairs-0", "max-items-over-catalogue"])
def test_bad_input_is_refused_clearly_without_reading_data(make_dataset: MakeDataset, changes: dict[str, Any],
                                                           field: str, message: str) -> None:
    dataset = make_dataset(_frame(_random_rows(20, seed=6)), _metadata())
    (dataset.path / "events.parquet").unlink()  # errors never depend on the data
    spec = {"analysis": "bundles", "item": "service", "epsilon": 0.5, **changes}
    with pytest.raises(QueryError, match=message) as raised:
        dataset.estimate({k: v for k, v in spec.items() if v is not None})
    assert raised.value.field == field


def test_unknown_fields_and_names_are_refused(make_dataset: MakeDataset) -> None:
    dataset = make_dataset(_frame(_random_rows(20, seed=6)), _metadata())
    with pytest.raises(QueryError, match="Extra inputs are not permitted"):
        dataset.estimate({"analysis": "bundles", "item": "service", "epsilon": 0.5, "windw_days": 3})
    with pytest.raises(QueryError, match="unknown analysis"):
        dataset.estimate({"analysis": "bundle", "epsilon": 0.5})
    with pytest.raises(QueryError, match="baseline"):
        dataset.estimate({"analysis": "bundle_changes", "item": "service", "epsilon": 0.5,
                          "period": {"start": "2025-01-01", "end": "2025-02-01"}})


def test_a_period_without_data_still_gets_a_noisy_answer(make_dataset: MakeDataset) -> None:
    """No kiosk use exists: every count is pure noise, not an exact zero, and no bundle is claimed.

    A bundle needs a link that holds simultaneously over every catalogue pair, so pure
    noise claims one with probability at most 1 - confidence: 0.1% flake rate here.
    """
    dataset = make_dataset(_frame(_random_rows(100, seed=7)), _metadata())
    result = dataset.run({"analysis": "bundles", "item": "service", "epsilon": 0.5, "max_pairs": 5, "top_k": 15,
                          "confidence": 0.999,
                          "filters": [{"column": "channel", "op": "eq", "value": "kiosk"}]})
    assert result.table.height == 15
    assert (result.table["value"] != 0).any()
    assert result.tables["bundles"].height == 0
    assert any("indistinguishable from noise" in note for note in result.notes)


def test_estimate_states_cost_and_accuracy_without_data(make_dataset: MakeDataset) -> None:
    dataset = make_dataset(_frame(_random_rows(20, seed=8)), _metadata())
    (dataset.path / "events.parquet").unlink()
    estimate = dataset.estimate({"analysis": "bundles", "item": "service", "max_pairs": 4, "accuracy": 30})
    assert estimate.accuracy["pair_half_width"] <= 30 and estimate.accuracy["item_half_width"] <= 30
    auto = dataset.estimate({"analysis": "bundles", "item": "service", "epsilon": 0.5})
    assert float(auto.loss.epsilon) == pytest.approx(0.5, abs=1e-9) and auto.contributions == "auto"
