"""Tables of bundle discovery, computed from released noisy counts only (post-processing).

Nothing here reads data or draws noise: it turns the noisy people counts of every
pair, every item and the people total into the answer's tables, with intervals
derived analytically from the mechanisms' known noise.

The rows shown are *selected*: the top pairs are the largest of every catalogue pair's
noisy count, and a pair's own noise helps it into the table, so an interval that holds
for one pair chosen in advance does not hold for the pairs that come out on top (on data
with no pair at all, every top pair is pure noise picked for being large). Every interval
here therefore holds **simultaneously for every pair that could have been selected** —
all the catalogue's pairs — and so for whichever were, at ``confidence = 1 - alpha``. With
``P`` catalogue pairs, the union bound over the pairs' independent noise gives:

- a pair's count: ``[max(0, n - h), n + h]`` with ``h`` the pair noise's half-width at
  ``alpha / P`` (all ``P`` pair intervals hold at once with probability ``1 - alpha``);
  ``above_zero`` is true when ``n - h > 0``, otherwise the pair is indistinguishable
  from zero;
- support ``n_ab / N`` and confidence ``n_ab / n_a`` both ways: interval arithmetic on
  the pair count at ``alpha / (2 P)`` (simultaneous) and the item count or people total
  at ``alpha / 2``; lift ``n_ab * N / (n_a * n_b)``: the pair count at ``alpha / (2 P)``
  and its three item terms at ``alpha / 6`` each. The item counts' noise is independent
  of the pair noise that selected the rows, so an item's interval at a fixed level holds
  for whichever item a selected row names: each row's ratio intervals fail with
  probability at most ``alpha``, after selection;
- a bundle's people (its weakest pair): the minimum of its pairs' simultaneous count
  intervals (bundles are selected too);
- a change of support between two periods: every pair count of both periods at
  ``alpha / (4 P)`` and each period's people total at ``alpha / 4`` — every change
  interval of every pair holds at once, so on data without any change no pair is
  flagged with probability at least ``1 - alpha``.

An interval's end is left empty (null) when a denominator could be zero or negative.

A pair is *linked* (may join a bundle) when it is above zero and one of its confidences'
lower ends reaches ``min_confidence``. On data without any pair, no bundle is reported
with probability at least ``confidence``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import polars as pl

from civicdp.privacy.accounting import Additive
from civicdp.queries.analyses.pairs import PairSpace


@dataclass(frozen=True)
class NoisyCounts:
    """One period's released counts and the mechanisms that noised them."""

    pairs: np.ndarray  # noisy people per pair (every pair of the catalogue)
    items: np.ndarray  # noisy people per item
    people: int  # noisy number of people
    pair_mechanism: Additive
    item_mechanism: Additive

    def pair_half(self, alpha: float) -> float:
        """Half-width that one pair's noise exceeds with probability at most ``alpha``."""
        return self.pair_mechanism.accuracy(alpha)

    def item_half(self, alpha: float) -> float:
        """Half-width that one item count's (or the people total's) noise exceeds with probability ``alpha``."""
        return self.item_mechanism.accuracy(alpha)

    def all_pairs_half(self, alpha: float) -> float:
        """Half-width that no pair's noise exceeds, all catalogue pairs at once, with probability ``1 - alpha``."""
        return self.pair_mechanism.accuracy(alpha / max(len(self.pairs), 1))



def _ratio(num: np.ndarray, num_half: float, den: np.ndarray, den_half: float,
           upper: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point value and interval of num / den from the components' intervals (NaN: undefined)."""
    num, den = num.astype(float), den.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(den > 0, np.maximum(num, 0) / den, np.nan)
        low = np.where(den + den_half > 0, np.maximum(num - num_half, 0) / (den + den_half), np.nan)
        high = np.where(den - den_half > 0, (num + num_half) / (den - den_half), np.nan)
    if upper is not None:
        value, low, high = (np.minimum(a, upper) for a in (value, low, high))
        high = np.where(np.isnan(high), upper, high)
    return value, low, high


def _column(values: np.ndarray) -> pl.Series:
    return pl.Series(values.astype(float), nan_to_null=True)


def pair_table(counts: NoisyCounts, space: PairSpace, item: str, top: np.ndarray, alpha: float,
               min_confidence: float) -> pl.DataFrame:
    """The top pairs (indices ``top``) with counts, support, confidence both ways and lift."""
    first, second = space.members()
    a, b = first[top], second[top]
    n_ab = counts.pairs[top]
    n_a, n_b = counts.items[a], counts.items[b]
    people = np.full(len(top), counts.people)
    # Simultaneous over every catalogue pair (and item): the rows are the largest of all
    # noisy counts, so an interval for one pair fixed in advance would not hold for them.
    # The item counts' noise is independent of the pair noise that selected the rows, so
    # one item count's interval at a level still holds for whichever item a row names.
    half = counts.all_pairs_half(alpha)
    pair2, item2, item6 = counts.all_pairs_half(alpha / 2), counts.item_half(alpha / 2), counts.item_half(alpha / 6)
    support = _ratio(n_ab, pair2, people, item2, upper=1.0)
    conf_ab = _ratio(n_ab, pair2, n_a, item2, upper=1.0)
    conf_ba = _ratio(n_ab, pair2, n_b, item2, upper=1.0)
    # lift = n_ab * N / (n_a * n_b): numerator and denominator products of interval ends
    num = n_ab.astype(float) * people
    with np.errstate(divide="ignore", invalid="ignore"):
        den = n_a.astype(float) * n_b
        lift = np.where((n_a > 0) & (n_b > 0), np.maximum(num, 0) / den, np.nan)
        lift_low = (np.maximum(n_ab - pair2, 0) * np.maximum(people - item6, 0)
                    / ((n_a + item6) * (n_b + item6)))
        lift_low = np.where((n_a + item6 > 0) & (n_b + item6 > 0), lift_low, np.nan)
        lift_high = np.where((n_a - item6 > 0) & (n_b - item6 > 0),
                             (n_ab + pair2) * (people + item6) / ((n_a - item6) * (n_b - item6)), np.nan)
    above_zero = n_ab - half > 0
    linked = above_zero & (np.fmax(np.nan_to_num(conf_ab[1]), np.nan_to_num(conf_ba[1])) >= min_confidence)
    keys = list(space.keys)
    return pl.DataFrame({
        "rank": np.arange(1, len(top) + 1, dtype=np.int64),
        f"{item}_a": [keys[i] for i in a], f"{item}_b": [keys[j] for j in b],
        "value": n_ab.astype(np.int64), "ci_low": np.maximum(n_ab - half, 0.0), "ci_high": n_ab + half,
        "above_zero": above_zero,
        "support": _column(support[0]), "support_low": _column(support[1]), "support_high": _column(support[2]),
        "confidence_ab": _column(conf_ab[0]), "confidence_ab_low": _column(conf_ab[1]),
        "confidence_ab_high": _column(conf_ab[2]),
        "confidence_ba": _column(conf_ba[0]), "confidence_ba_low": _column(conf_ba[1]),
        "confidence_ba_high": _column(conf_ba[2]),
        "lift": _column(lift), "lift_low": _column(lift_low), "lift_high": _column(lift_high),
        "linked": linked,
    }, strict=False)


def top_pairs(counts: NoisyCounts, top_k: int) -> np.ndarray:
    """Indices of the ``top_k`` largest noisy pair counts (ties: catalogue order)."""
    return np.argsort(-counts.pairs, kind="stable")[:top_k]


def bundle_table(pairs: pl.DataFrame, counts: NoisyCounts, item: str, alpha: float,
                 max_size: int) -> pl.DataFrame:
    """Bundles of 2..``max_size`` items: maximal sets whose every pair is a linked top pair.

    Candidate sets are the cliques of the graph of linked pairs (all their pairs linked);
    the largest and strongest are kept first and a set inside a kept one is dropped. A
    bundle's people is its weakest pair's count, an upper bound on the people who used
    all its items within the window.
    """
    linked = pairs.filter(pl.col("linked"))
    strength = {frozenset((a, b)): v for a, b, v in linked.select(f"{item}_a", f"{item}_b", "value").iter_rows()}
    neighbours: dict[object, set[object]] = {}
    for edge in strength:
        a, b = tuple(edge)
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    cliques: set[frozenset[object]] = {edge for edge in strength}
    frontier = set(cliques)
    for _ in range(max_size - 2):
        grown = set()
        for clique in frontier:
            common = set.intersection(*(neighbours[m] for m in clique)) - clique
            grown.update(clique | {m} for m in common)
        cliques |= grown
        frontier = grown

    def weakest(clique: frozenset[object]) -> int:
        return min(strength[frozenset(p)] for p in itertools.combinations(clique, 2))

    chosen: list[frozenset[object]] = []
    for clique in sorted(cliques, key=lambda c: (-len(c), -weakest(c), sorted(map(str, c)))):
        if not any(clique <= kept for kept in chosen):
            chosen.append(clique)
    chosen.sort(key=lambda c: (-weakest(c), -len(c), sorted(map(str, c))))
    rows = []
    half = counts.all_pairs_half(alpha)  # bundles are selected too: simultaneous over every pair
    for number, clique in enumerate(chosen, start=1):
        n_pairs = len(clique) * (len(clique) - 1) // 2
        values = [strength[frozenset(p)] for p in itertools.combinations(clique, 2)]
        members = sorted(clique, key=str)
        rows.append({"bundle": number, "size": len(clique), "members": " + ".join(map(str, members)),
                     "value": min(values), "ci_low": max(min(v - half for v in values), 0.0),
                     "ci_high": min(v + half for v in values), "pairs": n_pairs})
    schema = {"bundle": pl.Int64, "size": pl.Int64, "members": pl.String, "value": pl.Int64,
              "ci_low": pl.Float64, "ci_high": pl.Float64, "pairs": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def item_table(counts: NoisyCounts, space: PairSpace, item: str, alpha: float) -> pl.DataFrame:
    """People per item and the people total, with intervals."""
    half = counts.item_half(alpha)
    values = np.append(counts.items, counts.people)
    labels = [str(k) for k in space.keys] + ["(all people)"]
    return pl.DataFrame({item: labels, "value": values.astype(np.int64),
                         "ci_low": values - half, "ci_high": values + half})


def change_table(before: NoisyCounts, after: NoisyCounts, space: PairSpace, item: str,
                 top: np.ndarray, alpha: float) -> pl.DataFrame:
    """Pairs ``top``: counts and support in both periods, the change of support and its status.

    A change is flagged only when its interval excludes zero: ``appeared`` (up, and the
    earlier count is indistinguishable from zero), ``strengthened`` (up), ``vanished``
    (down, and the later count is indistinguishable from zero), ``weakened`` (down);
    otherwise ``no clear change``. The intervals hold simultaneously for every catalogue
    pair (each period's pair counts at ``alpha / 4`` over all pairs, each people total at
    ``alpha / 4``): the pairs shown are selected by their noisy counts, and a flag per pair
    at ``alpha`` would flag some of many unchanged pairs almost surely.
    """
    first, second = space.members()
    a, b = first[top], second[top]
    halves = [(c.all_pairs_half(alpha / 4), c.item_half(alpha / 4)) for c in (before, after)]
    supports = [_ratio(c.pairs[top], h[0], np.full(len(top), c.people), h[1], upper=1.0)
                for c, h in zip((before, after), halves)]
    change = supports[1][0] - supports[0][0]
    change_low = supports[1][1] - supports[0][2]
    change_high = supports[1][2] - supports[0][1]
    before_low = before.pairs[top] - halves[0][0]
    after_low = after.pairs[top] - halves[1][0]
    status = np.where(change_low > 0, np.where(before_low <= 0, "appeared", "strengthened"),
                      np.where(change_high < 0, np.where(after_low <= 0, "vanished", "weakened"),
                               "no clear change"))
    status = np.where(np.isnan(change_low) | np.isnan(change_high), "no clear change", status)
    keys = list(space.keys)
    frame = pl.DataFrame({
        f"{item}_a": [keys[i] for i in a], f"{item}_b": [keys[j] for j in b],
        "baseline": before.pairs[top].astype(np.int64), "period": after.pairs[top].astype(np.int64),
        "support_baseline": _column(supports[0][0]), "support_period": _column(supports[1][0]),
        "change": _column(change), "change_low": _column(change_low), "change_high": _column(change_high),
        "status": status.tolist(),
    }, strict=False)
    order = {"appeared": 0, "vanished": 1, "strengthened": 2, "weakened": 3, "no clear change": 4}
    return (frame.with_columns(pl.col("status").replace_strict(order, return_dtype=pl.Int64).alias("__order"),
                               pl.max_horizontal("baseline", "period").alias("__size"))
            .sort(["__order", "__size"], descending=[False, True]).drop("__order", "__size"))


def bundle_change_table(before: pl.DataFrame, after: pl.DataFrame, changes: pl.DataFrame,
                        item: str) -> pl.DataFrame:
    """Bundles of either period: ``kept``, ``appeared``/``vanished`` (backed by a flagged pair
    change), or ``within noise`` when membership differs but no pair change exceeds its noise."""
    status = {frozenset((str(a), str(b))): s
              for a, b, s in changes.select(f"{item}_a", f"{item}_b", "status").iter_rows()}
    sets = {"baseline": {frozenset(m.split(" + ")): v for m, v in before.select("members", "value").iter_rows()},
            "period": {frozenset(m.split(" + ")): v for m, v in after.select("members", "value").iter_rows()}}
    rows = []
    for members in sorted(set(sets["baseline"]) | set(sets["period"]), key=lambda m: sorted(m)):
        in_before, in_after = members in sets["baseline"], members in sets["period"]
        flags = {status.get(frozenset(p), "no clear change") for p in itertools.combinations(sorted(members), 2)}
        if in_before and in_after:
            verdict = "kept"
        elif in_after:
            verdict = "appeared" if flags & {"appeared", "strengthened"} else "within noise"
        else:
            verdict = "vanished" if flags & {"vanished", "weakened"} else "within noise"
        rows.append({"members": " + ".join(sorted(members)), "size": len(members),
                     "baseline": sets["baseline"].get(members), "period": sets["period"].get(members),
                     "status": verdict})
    schema = {"members": pl.String, "size": pl.Int64, "baseline": pl.Int64, "period": pl.Int64,
              "status": pl.String}
    return pl.DataFrame(rows, schema=schema)
