"""Answers derived from stored releases: post-processing, so free (issue 18).

A question that is a deterministic function of answers already released for the same
dataset version needs no new privacy loss: it is computed from the released (noisy)
values alone, never from the data. Two shapes are recognised:

- **roll-up**: a count or sum grouped by a coarser level of the public catalogue (its
  ``path`` table, e.g. service -> department), from a release grouped by the finer level:
  each coarse cell is the sum of the released values of the fine cells the catalogue
  assigns to it;
- **ratio**: a mean as a released sum divided by a released count of the same column
  (each possibly rolled up).

Everything else must be the same after validation against the metadata: the table, the
measured column and its clipping bounds, **the filters**, and a fixed contribution bound
("auto" is chosen privately per query), so both questions read the same bounded rows.

Why no subsets: the engine filters, *then* keeps each person's first ``L`` remaining rows.
A question with a filter the release did not have (even ``eq``/``in`` on a column the
release groups by) bounds each person among the filtered rows, so a person with rows in
several cells keeps rows the release dropped: the release's cells are not its answer
whenever someone has more than ``L`` rows (and no public maximum rows per person is
declared). With the same filters, a question's cells are either the release's own cells
(the same question at another epsilon, confidence or order: paid for, or the cached path's)
or sums of them (a roll-up). A grouping of the release that the question neither keeps
nor rolls up is not summed away: rows outside a column's public keys are dropped from
grouped answers only.

What a roll-up answers: the catalogue's grouping, not the data's coarse column. The
coarse column is always a stored column too, and nothing declared makes it a function of
the fine one (a row's ``department`` may disagree with the catalogue's for its service, a
row's service may be outside the declared keys, or null). Refusing every such roll-up would
remove the shape altogether; so a roll-up is derived only where the metadata fixes it (every
fine key placed by the catalogue, every coarse key of the question with at least one fine
key, else the question is paid for), and its notes and ``how`` say exactly what it is: the
sum of the released cells of the catalogue's fine keys of each coarse key. Its interval
covers that quantity (a fresh answer's covers the data's coarse column); the two agree
when every row's coarse column is the catalogue's for its fine key.

Intervals: released noise is independent per cell, so a sum of ``k`` cells carries the
sum of ``k`` independent noises of the release's family and scale. A sum of discrete
Laplace (or discrete Gaussian) noises is neither, so no closed form is assumed: the
half-width is :func:`civicdp.privacy.accuracy.sum_tail_threshold` at ``alpha / 2`` per side
(the sum's distribution computed by FFT with every truncation added back, never above
the Chernoff bound; the Chernoff bound itself for sums of more than 200 cells), and for
one cell the mechanism's own half-width. Half-widths are memoised by (noise, scale, cells,
alpha), and the widest sum is judged first, so a refused candidate costs one bound. A mean
takes the sum's and the count's half-widths at ``alpha / 2`` each and the corners of their
ratio (:func:`civicdp.privacy.accuracy.ratio`, as the mean kind does: union bound).

A derived answer is offered only when it is at least as accurate as the one asked for:
its widest half-width within the requested ``accuracy``, or within the fresh answer's
predicted half-width at the requested ``epsilon``; otherwise the question is paid for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from civicdp.privacy import accuracy
from civicdp.queries.analyses.service_common import catalogue
from civicdp.queries.context import EngineLimits, QueryContext, resolve
from civicdp.queries.derivation_noise import half_width, interval_text, mechanism_of
from civicdp.queries.errors import QueryError
from civicdp.queries.kinds.base import output
from civicdp.queries.kinds.statistics import value_bounds
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.query_plan import Plan
from civicdp.queries.spec import QuerySpec

#: Maps (fine column, coarse column) to {fine key: coarse key}, or None if the catalogue has no such level.
Parents = Callable[[str, str], "dict[Any, Any] | None"]
#: Stored specs are judged as valid at release; a lower per-query maximum set since does not undo them.
_LIMITS = EngineLimits(max_epsilon=math.inf)
_ROLES = {"count": "counts", "sum": "sums"}
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class StoredRelease:
    """A release of the same dataset version: its id, its question and its stored answer."""

    id: int
    spec: QuerySpec
    body: dict[str, Any]


@dataclass(frozen=True)
class Derived:
    """A derived answer: the releases it is computed from, how, and its body (a release's shape)."""

    sources: tuple[int, ...]
    how: str
    body: dict[str, Any]


@dataclass(frozen=True)
class _Totals:
    """Per cell of the question: the derived total (in the release's units) and its half-width."""

    units: list[int]
    halves: list[float]
    release: StoredRelease
    how: str
    levels: tuple[str, ...] = ()
    what: str = ""  # the derivation without its interval


def eligible(plan: Any) -> bool:
    """Whether a planned question could be derived at all: a count, sum or mean with a fixed bound."""
    return (isinstance(plan, Plan) and plan.spec.aggregate in ("count", "sum", "mean")
            and plan.context.contributions is not None)


def relevant(question: QuerySpec, stored: QuerySpec) -> bool:
    """A cheap test on the two specs, before a stored answer is read: could ``stored`` serve ``question``?"""
    wanted = ("sum", "count") if question.aggregate == "mean" else (question.aggregate,)
    return (stored.aggregate in wanted and stored.table == question.table and stored.column == question.column
            and stored.contributions != "auto")


def catalogue_parents(metadata: DatasetMetadata, dataset_dir: Path) -> Parents:
    """The public catalogue's levels, read once per pair of columns (None where it has no such columns)."""
    found: dict[tuple[str, str], dict[Any, Any] | None] = {}

    def parents(fine: str, coarse: str) -> dict[Any, Any] | None:
        if (fine, coarse) not in found:
            try:
                frame = catalogue(metadata, dataset_dir, fine, (coarse,))
            except QueryError:
                found[fine, coarse] = None
            else:
                found[fine, coarse] = dict(zip(frame[fine].to_list(), frame[coarse].to_list()))
        return found[fine, coarse]

    return parents


def derive(plan: Plan, releases: Sequence[StoredRelease], parents: Parents,
           judged: dict[Any, _Totals | None] | None = None) -> Derived | None:
    """The question of ``plan`` answered from ``releases`` (same dataset version), or None.

    Releases are tried oldest first, so the answer to a question stays the same as more are stored.
    ``judged`` (one dict per question) keeps each release's verdict, so a caller adding releases one
    at a time does not judge the earlier ones again.
    """
    if not eligible(plan):
        return None
    ctx, ordered = plan.context, sorted(releases, key=lambda r: r.id)
    judged = {} if judged is None else judged
    if plan.spec.aggregate == "mean":
        return _mean(plan, ordered, parents, judged)
    resolution = _resolution(ctx, plan.spec.aggregate)
    target = plan.spec.accuracy if plan.spec.accuracy is not None else _predicted(plan)["half_width"]
    for release in ordered:
        totals = _judged(judged, ctx, plan.spec.aggregate, release, parents, ctx.alpha, target)
        if totals is not None:
            values = [u * resolution if resolution != 1 else u for u in totals.units]
            halves = [h * resolution for h in totals.halves]
            rows = {"value": values, "ci_low": [v - h for v, h in zip(values, halves)],
                    "ci_high": [v + h for v, h in zip(values, halves)]}
            return _answer(ctx, [totals], rows, totals.how)
    return None


def _mean(plan: Plan, releases: list[StoredRelease], parents: Parents,
          judged: dict[Any, _Totals | None]) -> Derived | None:
    """A mean as the ratio of a released sum and a released count (each at alpha / 2)."""
    ctx = plan.context
    predicted = _predicted(plan)
    resolution = _resolution(ctx, "sum")
    alpha = ctx.alpha / 2
    sums = [t for r in releases
            if (t := _judged(judged, ctx, "sum", r, parents, alpha, predicted["sum_half_width"])) is not None]
    counts = [t for r in releases
              if (t := _judged(judged, ctx, "count", r, parents, alpha, predicted["count_half_width"])) is not None]
    if not sums or not counts:
        return None
    total, count = sums[0], counts[0]
    lo, hi = value_bounds(ctx)
    values, lows, highs = [], [], []
    for s_units, s_half, c, c_half in zip(total.units, total.halves, count.units, count.halves):
        s = s_units * resolution
        interval = accuracy.ratio(s, s_half * resolution, c, c_half, lo, hi)
        value = min(hi, max(lo, s / c)) if c > 0 else None
        # Post-processing, as the mean kind does: the estimate never lies outside its interval.
        values.append(None if value is None else min(interval.high, max(interval.low, value)))
        lows.append(interval.low)
        highs.append(interval.high)
    how = (f"ratio of the sum ({total.what}) and the count ({count.what}); interval: the corners of the sum's "
           "and the count's intervals, each at alpha/2 (union bound)")
    return _answer(ctx, [total, count], {"value": values, "ci_low": lows, "ci_high": highs}, how)


def _judged(judged: dict[Any, _Totals | None], ctx: QueryContext, aggregate: str, release: StoredRelease,
            parents: Parents, alpha: float, target: float) -> _Totals | None:
    key = (release.id, aggregate)
    if key not in judged:
        judged[key] = _totals(ctx, aggregate, release, parents, alpha, target)
    return judged[key]


def usable(plan: Plan, stored: QuerySpec, parents: Parents) -> bool:
    """Whether the question could be computed from a release of ``stored`` (its answer not read yet)."""
    if not eligible(plan):
        return False
    wanted = ("sum", "count") if plan.spec.aggregate == "mean" else (plan.spec.aggregate,)
    return _shape_fits(plan.spec, stored, parents) and any(
        _compatible(plan.context, a, stored, parents) is not None for a in wanted)


def _shape_fits(question: QuerySpec, stored: QuerySpec, parents: Parents) -> bool:
    """A quick test on the specs alone (before validating the stored one): filters on the same columns,
    each grouping of the release kept or rolled up, and the question not the release's own cells again."""
    if {f.column for f in stored.filters} != {f.column for f in question.filters}:
        return False
    if (stored.aggregate == question.aggregate and set(stored.group_by) == set(question.group_by)
            and set(stored.filters) == set(question.filters)):
        return False
    coarse = [c for c in question.group_by if c not in stored.group_by and ":" not in c]
    return all(g in question.group_by or (":" not in g and any(parents(g, c) is not None for c in coarse))
               for g in stored.group_by)


def _compatible(ctx: QueryContext, aggregate: str, spec: QuerySpec, parents: Parents) -> _Mapping | None:
    """How a release of ``spec`` (as ``aggregate``) maps to the question's cells; None if it does not."""
    if spec.aggregate != aggregate or not relevant(ctx.spec, spec):
        return None
    try:
        stored = resolve(spec, ctx.metadata, ctx.dataset_dir, _LIMITS)
        if aggregate == "sum" and value_bounds(stored) != value_bounds(ctx):
            return None
    except QueryError:
        return None
    # The same filters, so the same rows are bounded (module docstring: why no subsets).
    if stored.contributions != ctx.contributions or not _same_filters(ctx, stored):
        return None
    mapping = _mapping(ctx, stored, parents)
    if mapping is None or (ctx.spec.aggregate == aggregate and not mapping.levels
                           and {g.name for g in ctx.group_by} == {g.name for g in stored.group_by}):
        return None  # the release's own cells at another epsilon or confidence: a new question, paid for
    return mapping


def _totals(ctx: QueryContext, aggregate: str, release: StoredRelease, parents: Parents,
            alpha: float, target: float) -> _Totals | None:
    """The question's cells as sums of ``release``'s cells, with half-widths at ``alpha``; None if not
    derivable or if a cell would be wider than ``target`` (answer units)."""
    spec = release.spec
    mapping = _compatible(ctx, aggregate, spec, parents)
    mechanism = None if mapping is None else mechanism_of(release.body, _ROLES[aggregate], ctx.metadata.accounting.delta)
    if mapping is None or mechanism is None:
        return None
    sums: dict[tuple[Any, ...], list[int]] = {}
    resolution = _resolution(ctx, aggregate)
    for row in release.body["rows"]:
        key = mapping.keys_of(row)
        if key is None:
            return None  # a key the catalogue does not place: its rows would be missed
        cell = sums.setdefault(key, [0, 0])
        cell[0] += round(row["value"] / resolution) if resolution != 1 else int(row["value"])
        cell[1] += 1
    names = [g.name for g in ctx.group_by]
    per_cell = [sums.get(tuple(cell[n] for n in names), [0, 0]) for cell in ctx.cells.iter_rows(named=True)]
    sizes = [k for _, k in per_cell]
    if 0 in sizes:
        return None  # a coarse key with no fine key in the catalogue: nothing released answers it
    widest = max(sizes, default=0)
    # The widest sum is the widest interval: judged first, so a refused release costs one bound.
    if half_width(mechanism, widest, alpha) * resolution > target * (1 + _TOLERANCE):
        return None
    halves = [half_width(mechanism, k, alpha) for k in sizes]
    shape = "the cells" if widest <= 1 else f"sums of up to {widest} cells"
    if mapping.levels:
        shape = (f"roll-up through the public catalogue ({', '.join(mapping.levels)}): {shape}, each the sum of "
                 "the released cells of the catalogue's finer keys of that key,")
    what = f"{shape} of release {release.id} ({spec.aggregate} by {', '.join(spec.group_by) or 'nothing'})"
    how = f"{what}; interval: {interval_text(mechanism, widest)}"
    return _Totals([u for u, _ in per_cell], halves, release, how, mapping.levels, what)


def _same_filters(ctx: QueryContext, stored: QueryContext) -> bool:
    """Whether the question and the release filter the same rows (the filters as validated)."""
    def key(f: Any) -> tuple[Any, ...]:
        return (f.column, f.bucket, frozenset(f.values) if f.values is not None else None, f.start, f.end)

    return {key(f) for f in ctx.filters} == {key(f) for f in stored.filters}


@dataclass(frozen=True)
class _Mapping:
    """How a release's row maps to a question cell, and the catalogue levels used."""

    keys_of: Callable[[dict[str, Any]], tuple[Any, ...] | None]
    levels: tuple[str, ...]  # "service -> department" for each catalogue level rolled up


def _mapping(ctx: QueryContext, stored: QueryContext, parents: Parents) -> _Mapping | None:
    """How the release's rows give the question's cells (None if they do not)."""
    fine = [g.name for g in stored.group_by]
    plain = [g.name for g in stored.group_by if g.bucket is None]
    sources: dict[str, tuple[str, dict[Any, Any] | None]] = {}  # question column -> (release column, parents)
    for name in [g.name for g in ctx.group_by]:
        if name in fine:
            sources[name] = (name, None)
            continue
        level = next(((col, m) for col in plain if col != name and (m := parents(col, name)) is not None), None)
        if level is None:
            return None
        sources[name] = level
    if not set(fine) <= {col for col, _ in sources.values()}:
        return None  # a grouping that would be summed away

    def value(row: dict[str, Any], name: str) -> Any:
        column, level = sources[name]
        return row[column] if level is None else level.get(row[column], _MISSING)

    def keys_of(row: dict[str, Any]) -> tuple[Any, ...] | None:
        key = tuple(value(row, g.name) for g in ctx.group_by)
        return None if _MISSING in key else key

    levels = tuple(f"{column} -> {name}" for name, (column, level) in sources.items() if level is not None)
    return _Mapping(keys_of, levels)


class _Missing:
    def __repr__(self) -> str:
        return "<not in the catalogue>"


_MISSING = _Missing()


def _predicted(plan: Plan) -> dict[str, Any]:
    """The fresh answer's predicted accuracy (what :meth:`Plan.describe` shows, without computing its loss)."""
    return plan.kind.predicted(plan.context, plan.calibration)


def _resolution(ctx: QueryContext, aggregate: str) -> float:
    return 1 if aggregate == "count" else ctx.column.value_resolution  # type: ignore[union-attr]


def _answer(ctx: QueryContext, parts: list[_Totals], columns: dict[str, list[Any]], how: str) -> Derived:
    table = output(ctx, columns)
    mechanisms = [{**row, "release_id": part.release.id} for part in parts for row in part.release.body["mechanisms"]]
    notes = [f"derived from stored releases, no new privacy loss: {how}"]
    notes += [n for n in parts[0].release.body.get("notes", []) if n.startswith("at most ")]
    if any(part.levels for part in parts):
        notes.append("a roll-up answers the public catalogue's grouping: each coarser key gets the released cells "
                     "of the finer keys the catalogue assigns to it, and its interval covers that sum. A fresh "
                     "answer groups by the data's own coarser column instead: the two differ by the rows whose "
                     "coarser column disagrees with the catalogue, or whose finer key is missing or outside its "
                     "declared keys")
    body = {"columns": table.columns, "rows": table.to_dicts(), "loss": {"epsilon": 0.0, "delta": 0.0},
            "contributions": ctx.contributions, "confidence": ctx.spec.confidence, "mechanisms": mechanisms,
            "notes": notes, "tables": {}}
    return Derived(tuple(part.release.id for part in parts), how, body)
