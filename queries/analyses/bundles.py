"""Bundle discovery: which catalogue items the same people use together, and how that changes.

Two analyses plug into the engine here:

- ``bundles`` — the top K pairs of items (services) used by the same person within a
  time window in a period, each with a private count of people, support, confidence
  both ways and lift with intervals, and bundles of 2–4 items assembled from strongly
  linked pairs (post-processing: free);
- ``bundle_changes`` (also ``bundle-changes``) — the same for a baseline period and a
  later period, with the pairs and bundles that appeared, vanished, strengthened or
  weakened beyond their noise.

This module plans both: it checks the privacy parameters and calibrates the mechanisms
(the shares of the loss below). The specs and what they resolve to are in
:mod:`~civicdp.queries.analyses.bundle_spec`; the plan that runs a question (bounded
counts, the choice of ``max_pairs``, noise, answer) in
:mod:`~civicdp.queries.analyses.bundle_plan`.

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
from fractions import Fraction
from pathlib import Path

from civicdp.privacy.bounding import TOP_COUNT_SENSITIVITY, quantile_sensitivity
from civicdp.queries.analyses.base import Analysis, AnalysisSpec, register
from civicdp.queries.analyses.bundle_plan import MAX_PAIRS_PER_PERSON, BundlesPlan
from civicdp.queries.analyses.bundle_spec import BundleChangesSpec, BundlesSpec, Setting, resolve_setting
from civicdp.queries.context import EngineLimits
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata

#: Share of epsilon that chooses max_pairs when "auto", by rule: the "top_pairs" scores move by 1
#: per person (the quantile's by 9 at 0.9), so a smaller share chooses as sharply.
SELECTION_SHARE = {"top_pairs": Fraction(1, 20), "quantile": Fraction(1, 10)}
PAIR_SHARE = Fraction(7, 8)  # of each period's remaining loss; the rest is for item counts


class _Bundles(Analysis):
    """Plans both analyses; they differ only in their periods."""

    def __init__(self, name: str, spec_model: type[AnalysisSpec]) -> None:
        self.name = name
        self.spec_model = spec_model

    def plan(self, spec: AnalysisSpec, metadata: DatasetMetadata, dataset_dir: Path,
             limits: EngineLimits) -> BundlesPlan:
        assert isinstance(spec, (BundlesSpec, BundleChangesSpec))
        setting = resolve_setting(spec, metadata, Path(dataset_dir), limits)
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


def _notes(setting: Setting) -> list[str]:
    days = setting.window_seconds // 86400
    notes = [f"pairs: two different {setting.item} values used by the same person at most {days} days apart "
             f"(times to the second), counted once per person"]
    linked = setting.metadata.linked_rows_note(setting.table, None)  # a linked table: where its limit comes from
    return notes + ([linked] if linked else [])


register(_Bundles("bundles", BundlesSpec))
register(_Bundles("bundle_changes", BundleChangesSpec))
register(_Bundles("bundle-changes", BundleChangesSpec))
