"""Bundle discovery: which catalogue items the same people use together, and how that changes.

Two analyses plug into the engine here:

- ``bundles`` — the top K pairs of items (services) used by the same person within a
  time window in a period, each with a private count of people, support, confidence
  both ways and lift with intervals, and bundles of 2–4 items assembled from strongly
  linked pairs (post-processing: free);
- ``bundle_changes`` (also ``bundle-changes``) — the same for a baseline period and a
  later period, with the pairs and bundles that appeared, vanished, strengthened or
  weakened beyond their noise.

Privacy: the item catalogue is public (the column's declared keys), so every pair is a
public key and every pair of the catalogue gets a noisy count (no key selection, no
delta). Each person adds 1 to at most ``max_pairs`` pair counts and to at most
``max_items`` item counts plus the people total (:mod:`civicdp.queries.analyses.pairs`), so
discrete Laplace noise (OpenDP) on the pair vector with sensitivity ``max_pairs`` and on
the item vector with sensitivity ``max_items + 1`` gives pure epsilon-DP per person.

With ``"max_pairs": "auto"`` (the default) a share of the loss chooses ``max_pairs``
privately (permute-and-flip, OpenDP) over a public list of candidates, by one of two rules
(``max_pairs_rule``). ``"top_pairs"`` (the default, with 5% of the loss) scores candidate k by the half-width
of the pair counts' simultaneous interval at k (public: it depends on k, the pair loss,
the confidence and the catalogue only) minus the ``top_k``-th largest pair count bounded
at k — the bound that lifts the most top pairs clear of zero. One person moves each
bounded count, hence each order statistic, by at most 1, so the scores have sensitivity 1
(:func:`civicdp.privacy.bounding.top_count_scores`); with two periods the smaller of their
``top_k``-th counts is used, still sensitivity 1. Its candidates double from the number
of pairs in one bundle of ``max_bundle_size`` items (6 for 4 items: 6, 12, 24, ...): below
that a person who used one whole bundle could not count all its pairs, and the
confidences bundles are built from would be biased low. ``"quantile"`` scores each
candidate as the ``pairs_quantile`` of pairs per person (sensitivity 9 at 0.9, so it gets
10% of the loss); it chooses large bounds whose noise swamps the counts of small datasets (groceries: overlap
0.10 with the true top 20 at epsilon 1, against 0.65 for "top_pairs"; docs/benchmarks.md,
W2). Of the rest, 7/8 goes to the pair counts and 1/8 to the item counts (these are
large, and their intervals are not widened by the selection of pairs);
``bundle_changes`` splits it equally between its two periods, which draw on the budget
of the same people (the losses add).

Accuracy after selection: the rows shown are the largest of every catalogue pair's noisy
count, so every interval they carry holds simultaneously for all catalogue pairs
(:mod:`civicdp.queries.analyses.bundle_tables`), and ``bundle_changes`` flags a change only when
such a simultaneous interval of the change excludes zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, field_validator

from civicdp.privacy.bounding import (TOP_COUNT_SENSITIVITY, bound_candidates, quantile_scores, quantile_sensitivity,
                               top_count_scores)
from civicdp.privacy.loss import PrivacyLoss, compose
from civicdp.privacy.accounting import PURE, Accounting, Additive
from civicdp.privacy.mechanisms import NoisyMin
from civicdp.queries.analyses import bundle_tables as tables
from civicdp.queries.analyses.base import Analysis, AnalysisPlan, AnalysisSpec, register
from civicdp.queries.analyses.pairs import (MAX_ROWS, PairSpace, bounded_item_counts, bounded_pair_counts,
                                            bounded_pair_counts_by_bound, pairs_per_person, person_events,
                                            person_pairs)
from civicdp.queries.backend import Backend, RowFilter, person_column
from civicdp.queries.context import EngineLimits, resolve
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.results import Estimate, Result
from civicdp.queries.spec import Filter, QuerySpec

DEFAULT_TOP_K = 50
MAX_TOP_K = 1000
MAX_WINDOW_DAYS = 366
MAX_CATALOGUE_PAIRS = 200_000  # noise for every pair: ~11 µs each with OpenDP's exact sampler
MAX_PAIRS_PER_PERSON = 1000
#: Share of epsilon that chooses max_pairs when "auto", by rule: the "top_pairs" scores move by 1
#: per person (the quantile's by 9 at 0.9), so a smaller share chooses as sharply.
SELECTION_SHARE = {"top_pairs": Fraction(1, 20), "quantile": Fraction(1, 10)}
PAIR_SHARE = Fraction(7, 8)  # of each period's remaining loss; the rest is for item counts
REFERENCE_PAIRS = 10  # max_pairs assumed by estimates when it is chosen at run time


class Period(BaseModel):
    """A time range ``[start, end)`` (end excluded)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: datetime
    end: datetime


class _BundleFields(AnalysisSpec):
    table: str = "events"
    item: str = "service_id"
    time: str = "request_time"
    window_days: int = 30
    top_k: int | None = None  # default: 50, or every pair of a smaller catalogue
    filters: tuple[Filter, ...] = ()
    accuracy: float | None = None
    max_pairs: int | Literal["auto"] = "auto"
    max_pairs_rule: Literal["quantile", "top_pairs"] = "top_pairs"  # how "auto" chooses
    pairs_quantile: float = 0.9  # for the "quantile" rule
    max_items: int | None = None
    min_confidence: float = 0.2
    max_bundle_size: int = 4

    @field_validator("window_days", "top_k", "accuracy", "max_pairs", "pairs_quantile", "max_items",
                     "min_confidence", "max_bundle_size", mode="before")
    @classmethod
    def _no_flags(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        return value


class BundlesSpec(_BundleFields):
    """Top pairs and bundles in one period (default: the time column's whole declared period)."""

    analysis: Literal["bundles"]
    period: Period | None = None


class BundleChangesSpec(_BundleFields):
    """Pairs and bundles of ``period`` compared with those of ``baseline``."""

    analysis: Literal["bundle_changes"]
    baseline: Period
    period: Period

    @field_validator("analysis", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return "bundle_changes" if value == "bundle-changes" else value


@dataclass(frozen=True)
class Setting:
    """What both analyses resolve from a spec and the metadata (no data read)."""

    metadata: DatasetMetadata
    dataset_dir: Path
    table: str
    unit: str
    item: str
    time: str
    space: PairSpace
    filters: tuple[RowFilter, ...]
    periods: tuple[tuple[datetime, datetime], ...]
    window_seconds: int
    top_k: int
    max_items: int
    alpha: float


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


class _Bundles(Analysis):
    """Plans both analyses; they differ only in their periods."""

    def __init__(self, name: str, spec_model: type[AnalysisSpec]) -> None:
        self.name = name
        self.spec_model = spec_model

    def plan(self, spec: AnalysisSpec, metadata: DatasetMetadata, dataset_dir: Path,
             limits: EngineLimits) -> BundlesPlan:
        assert isinstance(spec, (BundlesSpec, BundleChangesSpec))
        setting = _setting(spec, metadata, Path(dataset_dir), limits)
        if (spec.epsilon is None) == (spec.accuracy is None):
            raise QueryError("epsilon", "give either a privacy loss 'epsilon' or a target 'accuracy', not both"
                             if spec.epsilon is not None else "give a privacy loss 'epsilon' or a target 'accuracy'",
                             'For example "epsilon": 0.5, or "accuracy": 100 for ±100 people at the confidence')
        if spec.epsilon is not None and spec.epsilon > limits.max_epsilon:
            raise QueryError("epsilon", f"{spec.epsilon} is above the maximum {limits.max_epsilon} per query",
                             "Ask with a smaller privacy loss")
        if not 0.5 <= spec.confidence <= 0.999:
            raise QueryError("confidence", f"must be between 0.5 and 0.999, got {spec.confidence}", "Use e.g. 0.95")
        if spec.max_pairs != "auto" and not 1 <= spec.max_pairs <= MAX_PAIRS_PER_PERSON:
            raise QueryError("max_pairs", f"must be between 1 and {MAX_PAIRS_PER_PERSON}, got {spec.max_pairs}",
                             'Give a whole number of pairs per person, or "auto"')
        if not 0.5 <= spec.pairs_quantile <= 0.99:
            raise QueryError("pairs_quantile", f"must be between 0.5 and 0.99, got {spec.pairs_quantile}",
                             "Use e.g. 0.9")
        if not 0 <= spec.min_confidence <= 1:
            raise QueryError("min_confidence", f"must be between 0 and 1, got {spec.min_confidence}", "Use e.g. 0.2")
        if not 2 <= spec.max_bundle_size <= 4:
            raise QueryError("max_bundle_size", f"must be 2, 3 or 4, got {spec.max_bundle_size}",
                             "Bundles are assembled from 2 to 4 items")
        periods = len(setting.periods)
        accounting = metadata.accounting.rule
        if spec.accuracy is not None:
            if spec.max_pairs == "auto":
                raise QueryError("max_pairs", "a target accuracy needs a fixed number of pairs per person, "
                                 "because the noise is calibrated before any data is read",
                                 "Give max_pairs as a whole number, or ask with 'epsilon'")
            if not (math.isfinite(spec.accuracy) and spec.accuracy >= 1):
                raise QueryError("accuracy", f"counts of people are whole numbers, so a half-width of "
                                 f"{spec.accuracy} cannot be promised", "Ask for an accuracy of at least 1")
            # The stated half-width is that of the answer's intervals: simultaneous over every pair.
            pair = accounting.additive_for_accuracy(spec.max_pairs, spec.accuracy,
                                                    setting.alpha / setting.space.n_pairs,
                                                    l2_sensitivity=math.sqrt(spec.max_pairs))
            items = accounting.additive_for_accuracy(setting.max_items + 1, spec.accuracy, setting.alpha,
                                                     l2_sensitivity=math.sqrt(setting.max_items + 1))
            return BundlesPlan(spec, setting, items, pair, None, None, _notes(setting), accounting)
        # The analyst's epsilon as the dataset's budget (epsilon, or rho on zCDP datasets).
        epsilon = Fraction(repr(accounting.budget(spec.epsilon)))
        selector = None
        if spec.max_pairs == "auto":
            sensitivity = (TOP_COUNT_SENSITIVITY if spec.max_pairs_rule == "top_pairs"
                           else quantile_sensitivity(spec.pairs_quantile, 1))
            selector = accounting.selection(sensitivity, float(epsilon * SELECTION_SHARE[spec.max_pairs_rule]))
            epsilon -= Fraction(repr(accounting.amount(selector.loss)))
        per_period = epsilon / periods
        pair_epsilon = float(per_period * PAIR_SHARE)
        # Each person's items are distinct, and so is the people total: L1 m + 1, L2 sqrt(m + 1).
        items = accounting.additive(setting.max_items + 1, float(per_period - Fraction(pair_epsilon)),
                                    l2_sensitivity=math.sqrt(setting.max_items + 1))
        if spec.max_pairs == "auto":
            return BundlesPlan(spec, setting, items, None, pair_epsilon, selector, _notes(setting), accounting)
        pair = accounting.additive(spec.max_pairs, pair_epsilon, l2_sensitivity=math.sqrt(spec.max_pairs))
        return BundlesPlan(spec, setting, items, pair, None, None, _notes(setting), accounting)


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


def _notes(setting: Setting) -> list[str]:
    days = setting.window_seconds // 86400
    return [f"pairs: two different {setting.item} values used by the same person at most {days} days apart "
            f"(times to the second), counted once per person"]


def _setting(spec: BundlesSpec | BundleChangesSpec, metadata: DatasetMetadata, dataset_dir: Path,
             limits: EngineLimits) -> Setting:
    """Validate everything but the privacy parameters, from the spec and the public metadata only."""
    if spec.dataset is not None and spec.dataset != metadata.name:
        raise QueryError("dataset", f"this dataset is '{metadata.name}', not '{spec.dataset}'",
                         "Name the dataset you are querying, or leave 'dataset' out")
    table = metadata.tables.get(spec.table)
    if table is None:
        raise QueryError("table", f"no table '{spec.table}'", f"Use one of {sorted(metadata.tables)}")
    item = table.columns.get(spec.item)
    if item is None or item.identifier or spec.item == metadata.privacy_unit or item.keys is None:
        problem = (f"unknown column '{spec.item}'" if item is None else
                   f"'{spec.item}' has no public key set (a catalogue)" if item.keys is None and not item.identifier
                   else f"'{spec.item}' is an identifier")
        raise QueryError("item", problem, "Name a column whose public keys are the catalogue, e.g. 'service_id'")
    time = table.columns.get(spec.time)
    if time is None or time.type != "datetime":
        raise QueryError("time", f"'{spec.time}' is not a time column of table '{spec.table}'",
                         "Name a datetime column, e.g. 'request_time'")
    space = PairSpace(tuple(item.keys))
    if space.n_items < 2:
        raise QueryError("item", f"'{spec.item}' has fewer than two keys, so it has no pairs",
                         "Name a column with a catalogue of at least two items")
    if space.n_pairs > MAX_CATALOGUE_PAIRS:
        raise QueryError("item", f"a catalogue of {space.n_items} items has {space.n_pairs:,} pairs, more than "
                         f"the {MAX_CATALOGUE_PAIRS:,} allowed", "Name a column with a smaller catalogue")
    for index, spec_filter in enumerate(spec.filters):
        if spec_filter.column == spec.time:
            raise QueryError(f"filters.{index}", f"'{spec.time}' is the time column of the analysis",
                             "Give the time range as 'period' instead")
    # Reuse the aggregate queries' validation of filters (keys, types, buckets).
    probe = QuerySpec(table=spec.table, aggregate="count", filters=spec.filters, epsilon=limits.max_epsilon)
    filters = resolve(probe, metadata, dataset_dir, limits).filters
    bounds = tuple(_naive(b) for b in time.bounds)  # type: ignore[union-attr]
    if isinstance(spec, BundleChangesSpec):
        periods = (_period("baseline", spec.baseline, bounds), _period("period", spec.period, bounds))
    else:
        periods = (_period("period", spec.period, bounds) if spec.period else bounds,)
    if not 1 <= spec.window_days <= MAX_WINDOW_DAYS:
        raise QueryError("window_days", f"must be between 1 and {MAX_WINDOW_DAYS} days, got {spec.window_days}",
                         "Use e.g. 30")
    for name, (start, end) in zip(("baseline", "period") if len(periods) > 1 else ("period",), periods):
        length = math.ceil((end - start) / timedelta(days=1))
        if spec.window_days > length:
            raise QueryError("window_days", f"the window ({spec.window_days} days) is longer than the {name} "
                             f"({length} days)", f"Use a window of at most {length} days, or a longer {name}")
    top_k = min(DEFAULT_TOP_K, space.n_pairs) if spec.top_k is None else spec.top_k
    if not 1 <= top_k <= min(MAX_TOP_K, space.n_pairs):
        raise QueryError("top_k", f"must be between 1 and {min(MAX_TOP_K, space.n_pairs)} (the catalogue has "
                         f"{space.n_pairs:,} pairs), got {top_k}",
                         f"Ask for at most {min(MAX_TOP_K, space.n_pairs)} pairs")
    max_items = min(metadata.max_contributions, space.n_items) if spec.max_items is None else spec.max_items
    if not 1 <= max_items <= space.n_items:
        raise QueryError("max_items", f"must be between 1 and {space.n_items} (the catalogue's size), "
                         f"got {max_items}", "Give the number of distinct items counted per person")
    return Setting(metadata, dataset_dir, spec.table, person_column(metadata, spec.table), spec.item, spec.time,
                   space, filters, periods, spec.window_days * 86400, top_k, max_items, 1 - spec.confidence)


def _naive(moment: object) -> datetime:
    return _utc(moment if isinstance(moment, datetime) else datetime.fromisoformat(str(moment)))


def _period(name: str, period: Period, bounds: tuple[datetime, datetime]) -> tuple[datetime, datetime]:
    """A period clamped to the declared bounds; refused if empty or outside them."""
    start, end = _utc(period.start), _utc(period.end)
    if start >= end:
        raise QueryError(name, f"starts ({start}) at or after it ends ({end})", "Give a start before the end")
    if start >= bounds[1] or end <= bounds[0]:
        raise QueryError(name, f"lies outside the dataset's period {bounds[0]} to {bounds[1]}",
                         "Choose a period inside the dataset's period")
    return max(start, bounds[0]), min(end, bounds[1])


def _utc(moment: datetime) -> datetime:
    """Stored times are naive UTC; an aware time is converted, not just stripped."""
    offset = moment.utcoffset()
    return moment if offset is None else (moment - offset).replace(tzinfo=None)


register(_Bundles("bundles", BundlesSpec))
register(_Bundles("bundle_changes", BundleChangesSpec))
register(_Bundles("bundle-changes", BundleChangesSpec))
