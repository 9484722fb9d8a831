"""A monitor's batches: their checks, the per-person bound over the horizon, exact step vectors.

Every function here is total on the data: whatever values a batch holds, the outcome's
shape (accepted or refused, which steps are released) depends only on the batch's
schema, declared time range and the public calibration, never on one person's value.

- **Missing and non-finite values.** NaN, +inf and -inf in the measured float column are
  missing values: those rows leave the measurement exactly as null rows do (before the
  per-person bound), whether or not the column is declared nullable. Refusing them would
  tell whoever reads the refusal that some person had such a value.
- **Exact integer sums.** A mean monitor's values are clipped to the public bounds and
  rounded to the column's resolution; the integers (at most ``unit`` in absolute value)
  are summed exactly — in float64 only while every partial sum stays below 2**53, else
  as Python integers — and every sum is clamped to ``±SUM_LIMIT`` before it is stored or
  noised. Clamping moves a sum by no more than its inputs moved (it is 1-Lipschitz), so
  the sensitivity is unchanged, and no cast can overflow or give INT64_MIN.
  :func:`sum_unit` refuses at definition the bounds, resolution and contribution bound
  whose worst case (``MAX_PEOPLE`` people each keeping ``L`` rows at the extreme value)
  could not be summed within ``SUM_LIMIT``.
- **Group keys** are matched by the text Polars gives the column's values, so boolean
  keys (``true``/``false``) match like strings and integers do.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import polars as pl

from civicdp.privacy.bounding import quantized_bound
from civicdp.queries.errors import QueryError

if TYPE_CHECKING:
    from civicdp.queries.monitor_spec import ResolvedMonitor

#: A public bound on the people whose rows one monitor cell may ever hold (more than any country's).
MAX_PEOPLE = 2**31
#: Exact sums are clamped to this magnitude; half the int64 range is left for the noise.
SUM_LIMIT = 2**62
_FLOAT_EXACT = 2**53
_ROW_SEED = 0x0A1E47
_TYPES = {"int": pl.datatypes.IntegerType, "float": pl.datatypes.FloatType, "str": pl.String,
          "bool": pl.Boolean, "datetime": pl.Datetime}


def _naive(moment: datetime) -> datetime:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def sum_unit(column: str, lower: float, upper: float, resolution: float, contributions: int) -> int:
    """The quantised bound of one centred value, refused when the worst-case sum cannot be exact."""
    middle = (lower + upper) / 2
    ratio = max(abs(lower - middle), abs(upper - middle)) / resolution
    if math.isfinite(ratio) and ratio <= SUM_LIMIT:
        unit = quantized_bound(lower - middle, upper - middle, resolution)
        if unit * contributions * MAX_PEOPLE <= SUM_LIMIT:
            return unit
    raise QueryError("column", f"'{column}' with bounds [{lower:g}, {upper:g}] at resolution {resolution:g} and "
                     f"{contributions} contributions per person gives a worst-case sum over the horizon "
                     f"({MAX_PEOPLE} people x contributions x half the bounds' span / resolution) that does "
                     "not fit in a 64-bit integer",
                     "Declare a coarser 'resolution' (or narrower 'bounds') for the column in the dataset's "
                     "metadata, or give fewer 'contributions'")


def key_text(key: Any) -> str:
    """A public key as the text Polars gives the column's value (booleans as ``true``/``false``)."""
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def group_codes(values: pl.Series, keys: Sequence[Any]) -> np.ndarray:
    """Each value's position in the public ``keys``; -1 for values outside them and for nulls."""
    positions: dict[str, int] = {}
    for index, key in enumerate(keys):
        positions.setdefault(key_text(key), index)
    return (values.cast(pl.String).replace_strict(list(positions), list(positions.values()), default=-1,
                                                  return_dtype=pl.Int64).fill_null(-1).to_numpy())


def _clamp(value: int) -> int:
    return max(-SUM_LIMIT, min(SUM_LIMIT, int(value)))


def cell_sums(cell: np.ndarray, units: np.ndarray, size: int, bound: int) -> np.ndarray:
    """Exact sums per cell of integers ``units`` (each at most ``bound`` in magnitude), clamped."""
    counts = np.bincount(cell, minlength=size)
    if int(counts.max(initial=0)) * bound < _FLOAT_EXACT:  # every partial sum is an exact float
        return np.rint(np.bincount(cell, weights=units.astype(np.float64), minlength=size)).astype(np.int64)
    totals = np.zeros(size, dtype=object)
    np.add.at(totals, cell, units.astype(object))
    return np.array([_clamp(v) for v in totals], dtype=np.int64)


def exact_total(block: np.ndarray) -> list[int]:
    """Exact column sums of stored leaves (each within ``±SUM_LIMIT``), clamped to ``±SUM_LIMIT``."""
    if block.shape[0] == 0:
        return [0] * block.shape[1]
    peak = int(np.abs(block).max(initial=0))
    if peak * block.shape[0] < 2**63:
        return [_clamp(v) for v in block.sum(axis=0).tolist()]
    return [_clamp(sum(int(v) for v in column)) for column in block.T]


def add_vectors(vectors: Sequence[Sequence[int]]) -> list[int]:
    """Entry-wise sum of released node vectors as exact Python integers (no int64 wrap-around)."""
    return [sum(int(v) for v in entries) for entries in zip(*vectors)]


def check_batch(monitor: ResolvedMonitor, frame: pl.DataFrame, start: datetime, end: datetime,
                covered_until: datetime | None) -> None:
    """Refuse a batch whose schema, time range or order does not fit (raises QueryError)."""
    start, end = _naive(start), _naive(end)
    declared = list(monitor.table.columns)
    if sorted(frame.columns) != sorted(declared):
        missing = sorted(set(declared) - set(frame.columns))
        extra = sorted(set(frame.columns) - set(declared))
        raise QueryError("batch", "the batch's columns do not match the dataset's table"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""),
                         f"Send exactly the columns {declared}")
    for name, meta in monitor.table.columns.items():
        dtype = frame.schema[name]
        wanted = _TYPES[meta.type]
        ok = isinstance(dtype, wanted) if isinstance(wanted, type) and wanted in (pl.Datetime,) else (
            dtype == wanted if wanted in (pl.String, pl.Boolean) else isinstance(dtype, wanted))  # type: ignore[arg-type]
        if dtype == pl.Null and meta.nullable:
            ok = True
        if not ok:
            raise QueryError("batch", f"column '{name}' has type {dtype}, the dataset declares {meta.type}",
                             "Convert the column to the declared type")
        if not meta.nullable and frame[name].null_count():
            raise QueryError("batch", f"column '{name}' has missing values but is declared without them",
                             "Fill or drop those rows")
    if not start < end:
        raise QueryError("end", "a batch's end must come after its start", "Give start < end")
    if start < monitor.start:
        raise QueryError("start", f"the batch starts before the monitor ({monitor.start.isoformat()})",
                         "Send only events from the monitor's start on")
    if covered_until is not None and start < covered_until:
        raise QueryError("start", f"the batch overlaps or precedes data already received (up to "
                         f"{covered_until.isoformat()})", "Send batches in time order, without overlaps")
    if end > monitor.end:
        raise QueryError("end", f"the batch ends at {end.isoformat()}, beyond the monitor's horizon "
                         f"(its last step ends at {monitor.end.isoformat()})",
                         "Trim the batch to the horizon, or define a new monitor for later events")
    times = frame[monitor.spec.time].cast(pl.Datetime("us"))
    if frame.height and (times.min() < start or times.max() >= end):  # type: ignore[operator]
        raise QueryError("batch", "some events lie outside the batch's declared time range",
                         "Declare the range the events cover, or split the batch")


def _finite(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    """NaN, +inf and -inf of a float column become missing values (nulls)."""
    if not isinstance(frame.schema[column], pl.datatypes.FloatType):
        return frame
    value = pl.col(column)
    return frame.with_columns(pl.when(value.is_finite()).then(value).otherwise(None).alias(column))


def step_vectors(monitor: ResolvedMonitor, rows: pl.DataFrame, first: int, last: int,
                 used: dict[Any, int]) -> tuple[dict[str, np.ndarray], dict[Any, int]]:
    """Exact per-step vectors for steps ``first .. last`` (inclusive) and the updated per-person use.

    ``rows`` holds every received event of those steps. Each person keeps rows while their
    use over the horizon stays within the bound: earlier steps first, then a hash order of
    the row's own content, so the kept rows depend on that person's rows alone. Rows whose
    measured value is missing (null, NaN, ±inf) are left out before the bound.
    """
    spec = monitor.spec
    n_steps = last - first + 1
    group = spec.group_by
    if spec.column is not None:
        rows = _finite(rows, spec.column)
    t = pl.col(spec.time).cast(pl.Datetime("us"))
    step = ((t - pl.lit(monitor.start)).dt.total_seconds() // monitor.step_seconds).cast(pl.Int64)
    frame = rows.with_columns(step.alias("__step"),
                              pl.struct(rows.columns).hash(seed=_ROW_SEED).alias("__order"))
    frame = frame.filter(pl.col("__step").is_between(first, last))
    if spec.column is not None:
        frame = frame.filter(pl.col(spec.column).is_not_null())
    unit = monitor.unit_column
    prior = pl.DataFrame({unit: list(used), "__used": list(used.values())},
                         schema={unit: frame.schema[unit], "__used": pl.Int64})
    ranked = frame.sort(unit, "__step", "__order").with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(unit).alias("__rank"))
    ranked = ranked.join(prior, on=unit, how="left").with_columns(pl.col("__used").fill_null(0))
    kept = ranked.filter(pl.col("__used") + pl.col("__rank") <= monitor.contributions)
    # kept: [unit, __step, group, column, ...] at most L rows per person over the horizon
    updated = dict(used)
    for person, count in kept.group_by(unit).len().iter_rows():
        updated[person] = updated.get(person, 0) + int(count)
    n = len(monitor.keys)
    codes = np.zeros(kept.height, dtype=np.int64) if group is None else group_codes(kept[group], monitor.keys)
    steps = kept["__step"].to_numpy() - first
    valid = codes >= 0
    cell = steps[valid] * n + codes[valid]
    size = n_steps * n
    out: dict[str, np.ndarray] = {}
    counts = np.bincount(cell, minlength=size).astype(np.int64)
    if spec.metric == "count":
        out["counts"] = counts.reshape(n_steps, n)
    elif spec.metric == "share_above":
        x = kept[spec.column].cast(pl.Float64).to_numpy()[valid]  # type: ignore[index]
        above = np.bincount(cell[x > spec.threshold], minlength=size).astype(np.int64)
        out["above"] = np.concatenate([above.reshape(n_steps, n), (counts - above).reshape(n_steps, n)], axis=1)
    else:
        x = kept[spec.column].cast(pl.Float64).to_numpy()[valid]  # type: ignore[index]
        middle = (monitor.lower + monitor.upper) / 2
        units = np.round((np.clip(x, monitor.lower, monitor.upper) - middle) / monitor.resolution)
        units = np.clip(units, -monitor.unit, monitor.unit).astype(np.int64)  # finite: no NaN reaches here
        out["sums"] = cell_sums(cell, units, size, monitor.unit).reshape(n_steps, n)
        out["counts"] = counts.reshape(n_steps, n)
    return out, updated
