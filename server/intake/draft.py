"""A draft ``metadata.json`` for an imported table: each column's type and a proposed treatment.

Read off the table just written (:mod:`civicdp.server.intake.importer`), for each column:

- the person column (the privacy unit the steward named): an identifier, never keys or bounds;
- other id-like columns: identifiers. Text or integers with more distinct values than
  ``max_keys`` and at least half as many as rows (or under an id-like name such as
  ``event_id``), and text whose values are nine in ten distinct (integers: under an id-like name);
- low-cardinality text and integer columns (at most ``max_keys`` values): their values as keys;
- numbers: bounds (the smallest and largest value, rounded outward to two significant
  digits), and for decimals the resolution they are written in; times: bounds from the
  first to the day after the last; ``nullable`` where values are missing;
- the dataset: ``max_contributions``, the 95th percentile of rows per person.

Every one of these read off the data is listed in ``proposed_from_data.fields`` with a
notice in plain words: keys and bounds taken from the data are not public knowledge, so
registration refuses the draft until the steward has confirmed each one
(:mod:`civicdp.server.intake.confirm`). Types and identifiers of the named person column
are not from the data's values and are not marked.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from civicdp.queries.metadata import ColumnMeta, parse_metadata
from civicdp.server.intake.sources import ImportRefused
from civicdp.server.state.dataset_checks import MAX_ABS_BOUND, check_declaration

MAX_KEYS = 1000
CONTRIBUTION_QUANTILE = 0.95
ID_NAME = re.compile(r"(^|_)(id|uuid|number|nr|key)$|[a-z](Id|ID|Number|Nr|Key)$|^id", re.IGNORECASE)
#: A word of a time column's name that says it ends a case (ClosedDate, case_enddate, resolved_at, ...).
END_NAME = re.compile(r"(^|_)(clos|end|finish|resolv|complet)")

NOTICE = (
    "DRAFT written by civicdp datasets init from {source}. The values named in 'fields' were read off the data itself: "
    "they are not public knowledge. A key set lists values that people in the data actually have (a rare value can "
    "point at one person), bounds are the smallest and largest values someone has, max_contributions says how many "
    "rows the busiest people have. For each one, keep the value only if it is public (a published code list, a legal "
    "or physical range, the reporting period), otherwise replace it with the public one; then delete its name from "
    "'fields'. 'civicdp datasets confirm FOLDER' shows every marked value and removes the marks once you agree "
    "('--field NAME' for one). Registration refuses this file while any field is listed. All times are in UTC."
)


@dataclass
class ColumnDraft:
    """What the draft proposes for one column, for the steward's summary."""

    name: str
    type: str
    treatment: str
    marked: list[str] = field(default_factory=list)


@dataclass
class Draft:
    metadata: dict[str, Any]
    columns: list[ColumnDraft]
    notes: list[str]


def draft_metadata(parquet: Path, *, name: str, person: str, types: dict[str, str], table: str = "events",
                   time_columns: tuple[str, ...] = (), source_label: str = "a source", max_keys: int = MAX_KEYS
                   ) -> Draft:
    """The draft declaration of ``parquet`` (one table) with ``person`` as the privacy unit."""
    if person not in types:
        raise ImportRefused(f"--person-column {person} is not a column of the data (it has "
                            f"{', '.join(list(types)[:30])}). For data without a person id, name the column of a "
                            "case or request id: each case is then the unit that is protected")
    for column in time_columns:
        if types.get(column) != "datetime":
            raise ImportRefused(f"--time-column {column} was not read as times")
    frame = pl.scan_parquet(parquet)
    stats = frame.select(_stat_exprs(types, person)).collect(engine="streaming").row(0, named=True)
    rows = stats["__rows"]
    columns: dict[str, dict[str, Any]] = {}
    summary, notes, marked = [], [], []
    keyed = [c for c, t in types.items() if t in ("str", "int") and c != person
             and stats.get(f"{c}.distinct", max_keys + 1) <= max_keys and not _id_like(c, t, stats, rows, max_keys)]
    # One column at a time: a streaming group-by holds only the distinct values (all columns' unique()
    # in one select held whole columns: 1 GB at 10 M rows).
    values = {c: frame.group_by(c).agg().drop_nulls().collect(engine="streaming").to_series().sort().to_list()
              for c in keyed}
    for column, kind in types.items():
        declared, treatment, column_marks = _propose(column, kind, stats, rows, person, values.get(column), max_keys)
        if declared is None:
            notes.append(treatment)
            continue
        columns[column] = declared
        marked += [f"tables.{table}.columns.{column}.{m}" for m in column_marks]
        summary.append(ColumnDraft(column, kind, treatment, column_marks))
    per_person = frame.group_by(person).agg(pl.len().alias("n")).select(
        pl.col("n").quantile(CONTRIBUTION_QUANTILE, "higher")).collect(engine="streaming").item()
    contributions = min(max(int(math.ceil(per_person or 1)), 1), 100_000)
    metadata = {
        "name": name,
        "version": date.today().isoformat(),
        "description": f"Imported from {source_label} with civicdp datasets init. Times are in UTC.",
        "privacy_unit": person,
        "max_contributions": contributions,
        "max_contributions_limit": max(1000, contributions),
        "tables": {table: {"path": parquet.name, "columns": columns}},
        "proposed_from_data": {"notice": NOTICE.format(source=source_label), "fields": ["max_contributions", *marked]},
    }
    parsed = parse_metadata(metadata)  # the draft is a valid declaration, bar its marks
    check_declaration(parsed, drafts=True)
    return Draft(metadata, summary, notes)


def write_draft(folder: Path, draft: Draft) -> Path:
    path = folder / "metadata.json"
    path.write_text(dumps(draft.metadata) + "\n")
    return path


def dumps(document: Any, indent: int = 0, key: str = "") -> str:
    """JSON with two-space indents; each column's declaration and each list of plain values on one line
    (but ``proposed_from_data.fields``: one entry a line)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    values = document.values() if isinstance(document, dict) else document if isinstance(document, list) else ()
    plain = all(not isinstance(v, (dict, list)) for v in values)
    if not isinstance(document, (dict, list)) or (isinstance(document, list) and plain and key != "fields"):
        return json.dumps(document, ensure_ascii=False)
    if isinstance(document, list):
        if not document:
            return "[]"
        return "[\n" + ",\n".join(inner + dumps(v, indent + 1) for v in document) + "\n" + pad + "]"
    if key == "columns":
        body = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                for k, v in document.items()]
    else:
        body = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 1, k)}" for k, v in document.items()]
    return "{\n" + ",\n".join(body) + "\n" + pad + "}" if document else "{}"


def _stat_exprs(types: dict[str, str], person: str) -> list[pl.Expr]:
    """One streaming pass over the table: rows, and per column missing values, distinct values (estimated:
    they only choose between keys and identifier; keys are then read exactly), ranges, decimal steps."""
    exprs = [pl.len().alias("__rows")]
    for column, kind in types.items():
        value = pl.col(column)
        exprs.append(value.null_count().alias(f"{column}.missing"))
        if kind in ("str", "int") and column != person:
            exprs.append(value.drop_nulls().approx_n_unique().alias(f"{column}.distinct"))
        if kind in ("int", "float", "datetime"):
            finite = value.filter(value.is_finite()) if kind == "float" else value
            exprs += [finite.min().alias(f"{column}.min"), finite.max().alias(f"{column}.max")]
        if kind == "float":
            exprs += [(value * 10.0**k - (value * 10.0**k).round(0)).abs().max().alias(f"{column}.off{k}")
                      for k in range(7)]
    return exprs


def _id_like(column: str, kind: str, stats: dict[str, Any], rows: int, max_keys: int) -> bool:
    """Text or integers that name records rather than classes of them."""
    if kind not in ("str", "int"):
        return False
    distinct = stats.get(f"{column}.distinct", 0)
    present = rows - stats[f"{column}.missing"]
    named = bool(ID_NAME.search(column))
    mostly_distinct = present >= 20 and distinct >= 0.9 * present  # in a small table too
    many = distinct > max_keys and (2 * distinct >= present or named)
    return many or (mostly_distinct and (kind == "str" or named))


def _propose(column: str, kind: str, stats: dict[str, Any], rows: int, person: str, keys: list[Any] | None,
             max_keys: int) -> tuple[dict[str, Any] | None, str, list[str]]:
    """(declaration, summary of the treatment, marked fields); declaration None: the column is left out (why)."""
    declared: dict[str, Any] = {"type": kind}
    marks: list[str] = []
    missing, distinct = stats[f"{column}.missing"], stats.get(f"{column}.distinct")
    if missing == rows:
        return None, f"{column}: left out of the declaration: it has no values", []
    if column == person:
        declared["identifier"], treatment = True, "identifier: the privacy unit"
    elif _id_like(column, kind, stats, rows, max_keys):
        declared["identifier"] = True
        treatment, marks = f"identifier: id-like (about {distinct:,} distinct values)", ["identifier"]
    elif keys is not None:
        declared["keys"], marks = keys, ["keys"]
        treatment = f"keys: {len(keys):,} value{'s' if len(keys) != 1 else ''}"
    elif kind == "bool":
        declared["keys"], treatment = [False, True], "keys: false, true"
    elif kind == "str":
        treatment = (f"no keys: about {distinct:,} distinct values (more than --max-keys {max_keys}); it cannot "
                     "be grouped by or filtered on until public keys are declared")
    else:
        treatment = ""
    if kind in ("int", "float") and "identifier" not in declared:
        bounds = _nice_bounds(stats[f"{column}.min"], stats[f"{column}.max"], kind == "int")
        if bounds is None:
            treatment = (treatment + "; " if treatment else "") + "no bounds: no finite values within +-1e15"
        else:
            declared["bounds"] = list(bounds)
            marks.append("bounds")
            treatment = (treatment + "; " if treatment else "") + f"bounds [{bounds[0]:g}, {bounds[1]:g}]"
            resolution = _resolution(column, stats, bounds) if kind == "float" else None
            if resolution is not None:
                declared["resolution"] = resolution
                marks.append("resolution")
                treatment += f", resolution {resolution:g}"
    if kind == "datetime":
        low, high = stats[f"{column}.min"], stats[f"{column}.max"]
        start = datetime.combine(low.date(), datetime.min.time())
        end = datetime.combine(high.date(), datetime.min.time()) + timedelta(days=1)
        declared["bounds"] = [start.isoformat(), end.isoformat()]
        marks.append("bounds")
        treatment = f"time bounds [{start:%Y-%m-%d}, {end:%Y-%m-%d}) UTC"
    if missing:
        declared["nullable"] = True
        marks.append("nullable")
        treatment += f"; nullable ({missing:,} missing)"
        if kind == "datetime" and END_NAME.search(re.sub(r"(?<=[a-z])(?=[A-Z])", "_", column).lower()):
            # A missing end time is an open case: the check counts them (a statement, not a value).
            declared["ends_case"] = True
            treatment += "; ends_case (a missing value is an open case)"
    return declared, treatment.lstrip("; "), marks


def _nice_bounds(low: float | None, high: float | None, integer: bool) -> tuple[float, float] | None:
    """``[low, high]`` rounded outward to two significant digits of the larger magnitude."""
    if low is None or high is None or max(abs(low), abs(high)) > MAX_ABS_BOUND:
        return None
    magnitude = max(abs(low), abs(high))
    step = 10.0 ** (math.floor(math.log10(magnitude)) - 1) if magnitude > 0 else 1.0
    if integer:
        step = max(step, 1.0)
    lo, hi = math.floor(low / step) * step, math.ceil(high / step) * step
    if hi <= lo:
        hi = lo + step
    lo, hi = float(f"{lo:.12g}"), float(f"{hi:.12g}")
    if integer or (lo.is_integer() and hi.is_integer()):
        return int(lo), int(hi)
    return lo, hi


def _resolution(column: str, stats: dict[str, Any], bounds: tuple[float, float]) -> float | None:
    """The decimal step the values are written in (1, 0.1, ... 1e-6), if coarser than the default."""
    step = next((10.0**-k for k in range(7) if (stats[f"{column}.off{k}"] or 0.0) <= 1e-6), None)
    if step is None:
        return None
    default = ColumnMeta(type="float", bounds=(float(bounds[0]), float(bounds[1]))).value_resolution
    return step if default < step <= bounds[1] - bounds[0] else None
