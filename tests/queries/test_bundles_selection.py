"""Bundle intervals after selection: the rows shown are the largest of every catalogue
pair's noisy count, so their intervals must hold simultaneously for every pair that could
have been selected, and ``bundle_changes`` may flag a change only when a simultaneous
interval of the change excludes zero.

Statistical tests. Test data is drawn from seeded numpy generators (synthetic input, not
privacy noise); the noise is OpenDP's and cannot be seeded, so each test states its chance
of failing by chance, bounded from the guarantee it checks. With per-pair intervals (the
construction before issue 12) the coverage and change tests fail: on data with no pair at
all the top pairs are pure noise picked for being large, and per-pair 95% intervals
covered only about 40% of the rows; per-pair flags flagged a change in about half of the
releases of unchanged data.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

import numpy as np
import pytest
from scipy import stats

from civicdp.queries.analyses.bundles import BundlesPlan
from civicdp.queries.engine import LocalDataset
from tests.conftest import MakeDataset
from tests.queries.test_bundles import _frame, _metadata

SERVICES = tuple(f"S{i:02d}" for i in range(40))  # 780 pairs
STRONG = ((0, 1, 150), (2, 3, 120), (4, 5, 90), (6, 7, 400), (8, 9, 60))  # (a, b, people)
BASELINE = {"start": "2025-01-01", "end": "2025-04-01"}
PERIOD = {"start": "2025-04-01", "end": "2025-07-01"}
SHIFT = timedelta(days=90)  # baseline uses copied into the period


def _no_pairs(people: int = 600) -> list[tuple[int, str, datetime]]:
    """Every person uses one service (some twice): no pair anywhere, every true count 0."""
    rng = np.random.default_rng(21)
    start, rows = datetime(2025, 1, 5), []
    for person in range(people):
        service, day = SERVICES[int(rng.integers(0, len(SERVICES)))], start + timedelta(days=int(rng.integers(0, 150)))
        rows += [(person, service, day)] * int(rng.integers(1, 3))
    return rows


def _strong_pairs() -> list[tuple[int, str, datetime]]:
    """Five pairs used together by 60–400 people each, 600 people with one service: the
    other 775 pairs have a true count of 0 and the top 30 hold 25 of them."""
    rng = np.random.default_rng(22)
    start, rows, person = datetime(2025, 1, 5), _no_pairs(), 10_000
    for a, b, people in STRONG:
        for _ in range(people):
            day = start + timedelta(days=int(rng.integers(0, 150)))
            rows += [(person, SERVICES[a], day), (person, SERVICES[b], day + timedelta(days=int(rng.integers(0, 20))))]
            person += 1
    return rows


def _baseline_rows(seed: int) -> list[tuple[int, str, datetime]]:
    """Baseline-quarter activity: a few strong pairs and 500 people using 1–4 random services."""
    rng = np.random.default_rng(seed)
    start, rows, person = datetime(2025, 1, 5), [], 0
    for a, b, people in STRONG:
        for _ in range(people):
            day = start + timedelta(days=int(rng.integers(0, 45)))
            rows += [(person, SERVICES[a], day), (person, SERVICES[b], day + timedelta(days=int(rng.integers(0, 20))))]
            person += 1
    for _ in range(500):
        for service in rng.choice(len(SERVICES), size=int(rng.integers(1, 5)), replace=False):
            rows.append((person, SERVICES[int(service)], start + timedelta(days=int(rng.integers(0, 60)))))
        person += 1
    return rows


def _unchanged(seed: int = 23) -> list[tuple[int, str, datetime]]:
    """The same people do the same things in both quarters: every true change is exactly 0."""
    rows = _baseline_rows(seed)
    return rows + [(person, service, moment + SHIFT) for person, service, moment in rows]


def _plan(dataset: LocalDataset, **spec: Any) -> BundlesPlan:
    plan = dataset.engine.plan({"analysis": "bundles", "item": "service", **spec}, dataset.metadata, dataset.path)
    assert isinstance(plan, BundlesPlan)
    return plan


@pytest.mark.parametrize("rows", [_no_pairs, _strong_pairs], ids=["no-pairs", "five-strong-pairs"])
def test_intervals_of_the_selected_pairs_cover_their_true_bounded_counts(
        make_dataset: MakeDataset, rows: Callable[[], list[tuple[int, str, datetime]]]) -> None:
    """Top 30 of 780 pairs, default settings, 100 releases (the bound chosen privately once
    per 25 releases): at least 93% of the 3,000 rows' count intervals and confidence
    intervals cover the true bounded values, and no row of a zero pair claims to be above
    zero in more than a few releases.

    Flake rate: a row's count misses only where its pair's noise exceeds the simultaneous
    half-width; those exceedances are independent with a total mean of at most 0.05 per
    release (alpha / 780 for each of 780 pairs), at most 5 over 100 releases. The test
    allows 30 missed rows, so it fails by chance with probability below 1e-12 (Poisson tail).
    A confidence interval misses only where its pair's noise exceeds the half-width at
    alpha / (2 * 780) (at most 2.5 over the releases, as above) or, for the 5 rows of strong
    pairs (a row of a zero pair covers 0 otherwise), where its item's noise exceeds the
    half-width at alpha / 2 (at most 500 chances of 2.5%); 45 misses allowed: below 1e-10.
    The pair of 400 people stands above zero unless the rule picks 48 pairs per person or more
    (at most exp(-487 / 40) = 5e-6 per choice, from the scores' gaps: 2e-5 for the 4 choices)
    or, at 24 (5e-3 per choice), its noise falls below -121 (0.8% per release; 6 misses of 100
    are needed to fail): below 1e-4 in all.
    With per-pair intervals only about 40% of the rows cover: it fails.
    """
    data = rows()
    dataset = make_dataset(_frame(data), _metadata(SERVICES))
    plan = _plan(dataset, epsilon=1, top_k=30)
    assert plan.selector is not None and plan.spec.max_pairs_rule == "top_pairs"  # the defaults
    space = plan.setting.space
    events, pairs = plan.person_pairs(dataset.engine.backend)
    missed = confidence_missed = total = zero_above = strongest_above = 0
    for _ in range(4):
        exact = plan.bounded_from(events, pairs)
        first, second = space.members()
        truth = {(space.keys[i], space.keys[j]): int(c) for i, j, c in zip(first, second, exact.pairs[0])}
        people = dict(zip(space.keys, exact.items[0].tolist()))
        for _ in range(25):
            table = plan.answer(plan.release(exact), exact.max_pairs).table
            for a, b, low, high, c_low, c_high, above in table.select(
                    "service_a", "service_b", "ci_low", "ci_high", "confidence_ab_low", "confidence_ab_high",
                    "above_zero").iter_rows():
                true = truth[(a, b)]
                missed += not low <= true <= high
                confidence = true / people[a] if people[a] else 0.0
                confidence_missed += not ((c_low or 0.0) <= confidence <= (1.0 if c_high is None else c_high))
                zero_above += true == 0 and above
                total += 1
            above = set(table.filter("above_zero").select("service_a", "service_b").iter_rows())
            strongest_above += ("S06", "S07") in above
    assert total == 3000
    assert 1 - missed / total >= 0.93 and missed <= 30, f"{missed} of {total} count intervals missed"
    assert confidence_missed <= 45, f"{confidence_missed} of {total} confidence intervals missed"
    assert zero_above <= 30, f"{zero_above} rows of zero pairs were shown as above zero"
    if rows is _strong_pairs:  # the intervals have teeth: the pair of 400 people stands out
        assert strongest_above >= 95, f"the pair of 400 people was above zero in {strongest_above} of 100"
    # The chance bound of the docstring.
    assert stats.poisson.sf(30, 5) < 1e-12


def test_the_no_pair_table_says_every_pair_is_indistinguishable_from_zero(make_dataset: MakeDataset) -> None:
    """One release on data without any pair: no row is above zero, no bundle, a note says so
    (fails by chance with probability at most 1 - confidence = 5%, here 0.1% at 0.999)."""
    dataset = make_dataset(_frame(_no_pairs()), _metadata(SERVICES))
    result = dataset.run({"analysis": "bundles", "item": "service", "epsilon": 1, "top_k": 30, "confidence": 0.999})
    assert not result.table["above_zero"].any() and (result.table["ci_low"] == 0).all()
    assert result.tables["bundles"].height == 0
    assert any("30 of the top 30 pairs have counts indistinguishable from noise" in note for note in result.notes)
    assert any("hold for all 780 catalogue pairs at once" in note for note in result.notes)


def _changes(dataset: LocalDataset, **spec: Any) -> BundlesPlan:
    return _plan(dataset, analysis="bundle_changes", baseline=BASELINE, period=PERIOD, **spec)


def test_bundle_changes_on_unchanged_data_flag_nothing_at_the_stated_rate(make_dataset: MakeDataset) -> None:
    """Both quarters hold the same people doing the same things, so every true change of
    support is exactly 0. Default settings, top 60 of each quarter (their union: 60–120
    rows), 60 releases: at most 10 releases may flag anything.

    Flake rate: a release flags a pair only if some pair count of either quarter or either
    people total leaves its simultaneous interval, which happens with probability at most
    1 - confidence = 0.05; 11 or more of 60 releases then has probability below 0.1%
    (binomial tail, checked below); measured: 0 of 200 releases. Per-pair flags flagged
    something in 93 of 200 releases of this data: it fails.
    """
    dataset = make_dataset(_frame(_unchanged()), _metadata(SERVICES))
    plan = _changes(dataset, epsilon=2, top_k=60)
    exact = plan.bounded_counts(dataset.engine.backend)
    assert all((p == exact.pairs[0]).all() for p in exact.pairs) and exact.people[0] == exact.people[1]
    flagged, rows, bundle_statuses = 0, 0, set()
    for _ in range(60):
        result = plan.answer(plan.release(exact), exact.max_pairs)
        rows += result.table.height
        flagged += int((result.table["status"] != "no clear change").any())
        bundle_statuses |= set(result.tables["bundles"]["status"])
    assert rows >= 60 * 60
    assert flagged <= 10, f"{flagged} of 60 releases flagged a change where nothing changed"
    if flagged == 0:  # a bundle appears or vanishes only with a flagged change of one of its pairs
        assert bundle_statuses <= {"kept", "within noise"}
    assert stats.binom.sf(10, 60, 0.05) < 1e-3


def test_bundle_changes_still_flag_a_large_planted_change(make_dataset: MakeDataset) -> None:
    """The unchanged background plus one pair used together by 600 people in the second
    quarter only: default settings at epsilon 4, top 150, the pair is flagged as appeared in
    each of 30 releases, and at most 6 releases flag anything that contradicts the true
    change of support (the 600 newcomers lower every other pair's support: those may be
    flagged as weakened, never as strengthened).

    Flake rate: whenever every noise stays within a half-width at level 1e-5 (all pairs of
    both quarters and both people totals, probability at least 1 - 1e-5), the planted
    change's interval excludes 0 — checked below from the mechanisms and the exact counts —
    so the 30 releases miss it with probability below 1e-3. A flag contradicts the truth only
    outside the simultaneous event (at most 5% per release): 7 or more of 30 below 0.1%.
    Per-pair flags contradict the truth in about half of the releases: it fails.
    """
    rows = _unchanged()
    start, person = datetime(2025, 4, 10), 50_000
    for offset in range(600):
        day = start + timedelta(days=offset % 60)
        rows += [(person + offset, "S30", day), (person + offset, "S31", day + timedelta(days=3))]
    dataset = make_dataset(_frame(rows), _metadata(SERVICES))
    plan = _changes(dataset, epsilon=4, top_k=150)
    # The bound the default rule picks here 95% of the time (6; otherwise 12): fixed, so that
    # the far-bound check below is about the noise only, not about the private choice.
    exact = plan.bounded_counts(dataset.engine.backend, max_pairs=6)
    space = plan.setting.space
    position = {key: i for i, key in enumerate(space.keys)}
    support = [counts / people for counts, people in zip(exact.pairs, exact.people)]
    wrong_releases = 0
    for _ in range(30):
        released = plan.release(exact)
        counts = released[0]
        pair_half, people_half = counts.all_pairs_half(plan.setting.alpha / 4), counts.item_half(plan.setting.alpha / 4)
        pair_far, people_far = counts.all_pairs_half(1e-5 / 4), counts.item_half(1e-5 / 4)
        # With every noise within its far bound, the support intervals stay apart.
        planted_low = (600 - pair_far - pair_half) / (exact.people[1] + people_far + people_half)
        baseline_high = (pair_far + pair_half) / (exact.people[0] - people_far - people_half)
        assert planted_low > baseline_high
        table = plan.answer(released, exact.max_pairs).table
        status = {(a, b): s for a, b, s in table.select("service_a", "service_b", "status").iter_rows()}
        assert status[("S30", "S31")] == "appeared"
        wrong = 0
        for (a, b), flag in status.items():
            index = int(space.index(np.array([position[a]]), np.array([position[b]]))[0])
            change = support[1][index] - support[0][index]
            wrong += (flag in ("appeared", "strengthened") and change <= 0) or \
                     (flag in ("vanished", "weakened") and change >= 0)
        wrong_releases += wrong > 0
    assert wrong_releases <= 6, f"{wrong_releases} of 30 releases flagged a change against the truth"
    assert stats.binom.sf(6, 30, 0.05) < 1e-3
