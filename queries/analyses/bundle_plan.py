"""The plan of a bundles or bundle-changes question: its cost, exact bounded counts, noise and answer.

:mod:`civicdp.queries.analyses.bundles` validates a question and calibrates its mechanisms;
the plan made there holds them and runs the question: per period, each person's bounded
uses and pairs (:mod:`civicdp.queries.analyses.pairs`), the private choice of pairs per person
when ``max_pairs`` is "auto" (permute-and-flip over :func:`top_pairs_candidates` or a
quantile of pairs per person), the exact counts, their noise, and the answer's tables
(:mod:`civicdp.queries.analyses.bundle_tables`, post-processing only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from civicdp.privacy.accounting import PURE, Accounting, Additive
from civicdp.privacy.bounding import bound_candidates, quantile_scores, top_count_scores
from civicdp.privacy.loss import PrivacyLoss, compose
from civicdp.privacy.mechanisms import NoisyMin
from civicdp.queries.analyses import bundle_tables as tables
from civicdp.queries.analyses.base import AnalysisPlan
from civicdp.queries.analyses.bundle_spec import BundleChangesSpec, BundlesSpec, Setting
from civicdp.queries.analyses.pairs import (MAX_ROWS, bounded_item_counts, bounded_pair_counts,
                                            bounded_pair_counts_by_bound, pairs_per_person, person_events,
                                            person_pairs)
from civicdp.queries.backend import Backend
from civicdp.queries.results import Estimate, Result

MAX_PAIRS_PER_PERSON = 1000
REFERENCE_PAIRS = 10  # max_pairs assumed by estimates when it is chosen at run time


@dataclass(frozen=True)
class Exact:
    """Exact bounded counts of each period: what the noise is added to."""

    max_pairs: int
    pairs: list[np.ndarray]
    items: list[np.ndarray]
    people: list[int]


@dataclass
class BundlesPlan(AnalysisPlan):
    """A validated bundles or bundle-changes question with its mechanisms and exact cost."""

    spec: BundlesSpec | BundleChangesSpec
    setting: Setting
    item_mechanism: Additive
    pair_mechanism: Additive | None  # None: calibrated at run time for the chosen max_pairs
    pair_epsilon: float | None  # the pairs' budget in the dataset's unit (epsilon, or rho on zCDP)
    selector: NoisyMin | None
    notes: list[str] = field(default_factory=list)
    accounting: Accounting = PURE

    @property
    def loss(self) -> PrivacyLoss:
        periods = len(self.setting.periods)
        pair = self.pair_mechanism.loss if self.pair_mechanism else self.accounting.loss_of(self.pair_epsilon)
        per_period = pair + self.item_mechanism.loss
        selection = [self.selector.loss] if self.selector else []
        return compose([*selection, *([per_period] * periods)])

    def columns(self) -> set[str]:
        s = self.setting
        return {s.item, s.time, *(f.column for f in s.filters)}

    # -- cost and accuracy, no data --------------------------------------------------------

    def _mechanism_rows(self, pair_mechanism: Additive, chosen: int | None = None) -> list[dict[str, Any]]:
        per = "each period" if len(self.setting.periods) > 1 else "the period"
        rows = [{"role": f"pair counts ({per})", "mechanism": pair_mechanism.name, "scale": pair_mechanism.scale,
                 "sensitivity": pair_mechanism.sensitivity, "epsilon": float(pair_mechanism.loss.epsilon)},
                {"role": f"item counts and people ({per})", "mechanism": self.item_mechanism.name,
                 "scale": self.item_mechanism.scale, "sensitivity": self.item_mechanism.sensitivity,
                 "epsilon": float(self.item_mechanism.loss.epsilon)}]
        if self.selector is not None:
            row = {"role": f"pairs per person ({self.spec.max_pairs_rule} rule)", "mechanism": self.selector.name, "scale": self.selector.scale,
                   "sensitivity": self.selector.sensitivity, "epsilon": float(self.selector.loss.epsilon)}
            rows.append(row if chosen is None else {**row, "chosen": chosen})
        return rows

    def _fixed_pairs(self) -> int | None:
        """The spec's fixed bound on pairs per person (the mechanism's sensitivity is L2 on zCDP datasets)."""
        return self.spec.max_pairs if isinstance(self.spec.max_pairs, int) else None

    def _pairs_mechanism(self, max_pairs: int) -> Additive:
        """The pair counts' noise for a bound of ``max_pairs``: L1 sensitivity k, L2 sqrt(k) (distinct pairs)."""
        return self.accounting.additive(max_pairs, self.pair_epsilon, l2_sensitivity=math.sqrt(max_pairs))  # type: ignore[arg-type]

    def _reference_pairs(self) -> Additive:
        if self.pair_mechanism is not None:
            return self.pair_mechanism
        return self._pairs_mechanism(REFERENCE_PAIRS)

    def describe(self) -> Estimate:
        pair = self._reference_pairs()
        alpha = self.setting.alpha
        notes = list(self.notes)
        if self.selector is not None:
            notes.append(f"pairs per person are chosen privately at run time ({_RULES[self.spec.max_pairs_rule]}); "
                         f"the accuracy shown is for {REFERENCE_PAIRS} pairs per person (it grows in proportion "
                         f"to the number chosen)")
        n_pairs = self.setting.space.n_pairs
        notes.append(f"pair intervals hold for all {n_pairs:,} catalogue pairs at once (the pairs shown are "
                     "selected by their noisy counts); item intervals hold for each item")
        accuracy = {"pair_half_width": pair.accuracy(alpha / n_pairs),
                    "item_half_width": self.item_mechanism.accuracy(alpha),
                    "unit": "people", "pairs": n_pairs, "top_k": self.setting.top_k}
        return Estimate(self.loss, self._fixed_pairs() or "auto",
                        self.spec.confidence, self._mechanism_rows(pair), accuracy, notes)

    # -- the data-touching step ------------------------------------------------------------

    def bounded_counts(self, backend: Backend, max_pairs: int | None = None) -> Exact:
        """Exact counts over bounded data, choosing ``max_pairs`` privately if the spec says "auto".

        Pass ``max_pairs`` to skip the choice (benchmarks comparing with and without noise).
        """
        return self.bounded_from(*self.person_pairs(backend), max_pairs)

    def bounded_from(self, events: list[pl.DataFrame], pairs: list[pl.DataFrame],
                     max_pairs: int | None = None) -> Exact:
        """:meth:`bounded_counts` from each period's uses and person-pairs (:meth:`person_pairs`)."""
        s = self.setting
        items = list(map(list, zip(*(bounded_item_counts(e, s.space, s.max_items) for e in events))))
        if max_pairs is None and self.selector is not None and self.spec.max_pairs_rule == "top_pairs":
            max_pairs, pair_counts = self._choose_for_top_pairs(pairs)
            return Exact(max_pairs, pair_counts, *items)
        if max_pairs is None:
            max_pairs = self._fixed_pairs() or self._choose(pairs)
        return Exact(max_pairs, [bounded_pair_counts(p, s.space, max_pairs) for p in pairs], *items)

    def person_pairs(self, backend: Backend) -> tuple[list[pl.DataFrame], list[pl.DataFrame]]:
        """Each period's bounded uses ``[__person, __item, __time_key]`` and distinct pairs ``[__person, __pair]``."""
        s = self.setting
        # At most MAX_ROWS rows per person, bounded before the filters and the period apply.
        rows = backend.bound(backend.scan(s.dataset_dir, s.metadata, s.table), s.metadata, s.table, MAX_ROWS)
        conditions = [backend.row_condition(f) for f in s.filters]
        events = [person_events(rows, s.unit, s.item, s.time, s.space, conditions, start, end).collect()
                  for start, end in s.periods]
        return events, [person_pairs(e.lazy(), s.window_seconds, s.space).collect() for e in events]

    def noise_levels(self, candidates: list[int]) -> list[int]:
        """Public noise level of each candidate bound: the half-width of the pair counts' simultaneous interval.

        The pair noise's half-width at ``alpha / pairs`` (what the answer's intervals use:
        no pair's noise exceeds it, all at once, with probability ``1 - alpha``), in whole
        people, rounded up. Depends on the bound, the pair loss, the confidence and the
        catalogue only, so it adds nothing to the scores' sensitivity.
        """
        alpha = self.setting.alpha / self.setting.space.n_pairs
        return [math.ceil(self._pairs_mechanism(k).accuracy(alpha)) for k in candidates]

    def _choose_for_top_pairs(self, pairs: list[pl.DataFrame]) -> tuple[int, list[np.ndarray]]:
        """The bound whose top_k-th pair count stands furthest above its noise, by permute-and-flip.

        Scores have sensitivity 1 (:func:`civicdp.privacy.bounding.top_count_scores`); every
        candidate's counts come from one pass over the person-pairs, and the chosen
        column is the exact bounded count vector that the noise is then added to.
        """
        candidates, by_bound, scores = self.top_pairs_scores(pairs)
        chosen = self.selector.release(scores.tolist())  # type: ignore[union-attr]
        return candidates[chosen], [np.ascontiguousarray(c[:, chosen]) for c in by_bound]

    def top_pairs_scores(self, pairs: list[pl.DataFrame]) -> tuple[list[int], list[np.ndarray], np.ndarray]:
        """Candidate bounds, each period's bounded pair counts under every candidate, and their scores."""
        candidates = top_pairs_candidates(self.spec.max_bundle_size)
        by_bound = [bounded_pair_counts_by_bound(p, self.setting.space, candidates) for p in pairs]
        return candidates, by_bound, top_count_scores(by_bound, self.setting.top_k, self.noise_levels(candidates))

    def _choose(self, pairs: list[pl.DataFrame]) -> int:
        """The pairs-per-person quantile, by permute-and-flip over public candidates."""
        candidates, scores = self.quantile_rule_scores(pairs)
        return candidates[self.selector.release(scores.tolist())]  # type: ignore[union-attr]

    def quantile_rule_scores(self, pairs: list[pl.DataFrame]) -> tuple[list[int], np.ndarray]:
        """Candidate bounds and their scores as the ``pairs_quantile`` of pairs per person."""
        candidates = bound_candidates(MAX_PAIRS_PER_PERSON)
        people = pairs_per_person(pairs, MAX_PAIRS_PER_PERSON + 1)[1:]  # people with n = 1, 2, ... pairs
        cumulative = np.concatenate(([0], np.cumsum(people)))
        index = np.asarray(candidates) - 1  # people[n - 1] has n pairs
        below = cumulative[index]  # fewer than c pairs
        above = cumulative[-1] - cumulative[index + 1]  # more than c pairs
        return candidates, quantile_scores(below, above, self.spec.pairs_quantile)

    def release(self, exact: Exact) -> list[tables.NoisyCounts]:
        """Add the noise: every pair count, every item count and the people total, per period."""
        pair_mechanism = self.pair_mechanism or self._pairs_mechanism(exact.max_pairs)
        released = []
        for pairs, items, people in zip(exact.pairs, exact.items, exact.people):
            noisy_items = self.item_mechanism.release([*items.tolist(), people])
            released.append(tables.NoisyCounts(np.asarray(pair_mechanism.release(pairs.tolist()), dtype=np.int64),
                                               np.asarray(noisy_items[:-1], dtype=np.int64), int(noisy_items[-1]),
                                               pair_mechanism, self.item_mechanism))
        return released

    def execute(self, backend: Backend) -> Result:
        exact = self.bounded_counts(backend)
        return self.answer(self.release(exact), exact.max_pairs)

    def answer(self, released: list[tables.NoisyCounts], max_pairs: int) -> Result:
        """The answer's tables from released counts (post-processing only)."""
        s, spec = self.setting, self.spec
        notes = list(self.notes)
        notes.append(f"each person counts in at most {max_pairs} pairs and {s.max_items} items; counts describe "
                     "that bounded data (people with more pairs are partly counted)")
        mechanisms = self._mechanism_rows(released[0].pair_mechanism, max_pairs if self.selector else None)
        notes.append(f"intervals of pairs hold for all {s.space.n_pairs:,} catalogue pairs at once, so they remain "
                     f"valid for the pairs selected as the top {s.top_k}"
                     + ("; a change is flagged only when its interval, also simultaneous, excludes 0"
                        if len(released) > 1 else ""))
        per_period = []
        for counts in released:
            top = tables.top_pairs(counts, s.top_k)
            pairs = tables.pair_table(counts, s.space, s.item, top, s.alpha, spec.min_confidence)
            per_period.append((top, pairs, tables.bundle_table(pairs, counts, s.item, s.alpha,
                                                               spec.max_bundle_size)))
        if len(released) == 1:
            top, pairs, bundles = per_period[0]
            noise = pairs.height - int(pairs["above_zero"].sum())
            if noise:
                notes.append(f"{noise} of the top {pairs.height} pairs have counts indistinguishable from noise "
                             f"(above_zero false: their interval includes 0) and are not used for bundles")
            if bundles.height == 0:
                notes.append("no bundle: no pair is both above its noise and confident enough "
                             f"(confidence lower bound at least {spec.min_confidence} one way)")
            return Result(pairs, self.loss, max_pairs, spec.confidence, mechanisms, spec, notes,
                          tables={"bundles": bundles, "items": tables.item_table(released[0], s.space, s.item,
                                                                                 s.alpha)})
        (top_a, pairs_a, bundles_a), (top_b, pairs_b, bundles_b) = per_period
        union = np.array(sorted(set(top_a.tolist()) | set(top_b.tolist())), dtype=np.int64)
        changes = tables.change_table(released[0], released[1], s.space, s.item, union, s.alpha)
        epsilon = float((self.loss.epsilon - (self.selector.loss.epsilon if self.selector else 0)) / 2)
        notes.append(f"both periods draw on the budget of the same people: the loss is the sum of the two "
                     f"periods' (epsilon {epsilon:.4g} each"
                     + (" plus the choice of pairs per person)" if self.selector else ")"))
        return Result(changes, self.loss, max_pairs, spec.confidence, mechanisms, spec, notes,
                      tables={"bundles": tables.bundle_change_table(bundles_a, bundles_b, changes, s.item),
                              "baseline_pairs": pairs_a, "period_pairs": pairs_b,
                              "baseline_bundles": bundles_a, "period_bundles": bundles_b})


_RULES = {"top_pairs": "the bound whose top_k-th largest pair count stands furthest above its interval's "
                        "half-width",
          "quantile": "a high quantile (pairs_quantile) of pairs per person"}


def top_pairs_candidates(max_bundle_size: int) -> list[int]:
    """Public candidate bounds of the "top_pairs" rule: doubling from one bundle's pairs, up to the limit.

    The smallest candidate is the number of pairs among ``max_bundle_size`` items, so a
    person who used one whole bundle can count all of its pairs; doubling keeps the list
    short (9 candidates for bundles of 4), which keeps the private choice sharp.
    """
    value, candidates = max_bundle_size * (max_bundle_size - 1) // 2, []
    while value < MAX_PAIRS_PER_PERSON:
        candidates.append(value)
        value *= 2
    return [*candidates, MAX_PAIRS_PER_PERSON]
