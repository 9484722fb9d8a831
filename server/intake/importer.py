"""Importing a source into a dataset folder: the data converted into the dataset's own Parquet.

``import_source`` reads a CSV, Parquet or PostgreSQL source batch by batch
(:mod:`civicdp.server.intake.sources`) and writes one Parquet table file, so memory stays
bounded whatever the size of the source. A CSV's columns are converted with the types its
first rows suggest (:mod:`civicdp.server.intake.text_columns`) while every value is checked;
if a value further down cannot be read so, the file is written a second time with the
types that read every value (nothing is turned into a missing value). Typed sources are
read once.

Times end up as UTC without a zone: a time with an offset is converted, a time without
one is read in ``time_zone`` (default UTC). Column names are made usable in queries (a
``:`` would read as a time bucket, as in ``case:channel``): anything but letters, digits
and ``_`` becomes ``_``; every rename is reported. The file is written beside its final
name and moved into place when complete, so a failed import leaves no half-written table.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from civicdp.server.intake import sources, text_columns
from civicdp.server.intake.sources import ImportRefused, Source
from civicdp.server.intake.text_columns import Failures, TextPlan

BATCH_ROWS = 250_000
SAMPLE_ROWS = 50_000
#: stage ("writing", "rewriting"), rows done, rows in all (None: not known; for a CSV at first an estimate)
Progress = Callable[[str, int, "int | None"], None]


@dataclass
class ImportResult:
    path: Path
    rows: int
    #: column -> its kind in the dataset: int, float, str, datetime or bool
    types: dict[str, str]
    renamed: dict[str, str] = field(default_factory=dict)
    set_aside: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def import_source(source: Source, out_file: Path, *, time_columns: tuple[str, ...] = (), time_zone: str = "UTC",
                  day_first: bool | None = None, person_column: str | None = None, rows: int = BATCH_ROWS,
                  progress: Progress | None = None) -> ImportResult:
    """Write ``source`` as the Parquet file ``out_file``; refuse (ImportRefused, nothing written) what cannot be read.

    ``person_column``, when given, must be a column of the source (checked before anything is written)."""
    started = time.perf_counter()
    try:
        ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ImportRefused(f"unknown time zone '{time_zone}': use a name such as UTC, Europe/Amsterdam or "
                            "America/Los_Angeles") from None
    report = progress or (lambda stage, done, total: None)
    partial = out_file.with_name(out_file.name + ".partial")
    try:
        if source.kind == "csv":
            result = _import_csv(source, partial, time_columns, time_zone, day_first, person_column, rows, report)
        else:
            result = _import_typed(source, partial, time_columns, time_zone, day_first, person_column, rows, report)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    result.path, result.seconds = out_file, time.perf_counter() - started
    return result


def usable_names(names: list[str]) -> dict[str, str]:
    """Original name -> a name usable in queries (letters, digits, ``_``), for every name that must change."""
    renamed, taken = {}, set(names)
    for name in names:
        usable = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "column"
        if usable == name:
            continue
        candidate, n = usable, 2
        while candidate in taken:
            candidate, n = f"{usable}_{n}", n + 1
        renamed[name] = candidate
        taken.add(candidate)
    return renamed


def _originals(asked: tuple[str, ...], names: list[str], renamed: dict[str, str], what: str) -> set[str]:
    """The source names of the columns the steward named (by their source or their new name)."""
    back = {new: old for old, new in renamed.items()}
    found = set()
    for name in asked:
        original = name if name in names else back.get(name)
        if original is None:
            hint = ("; for data without a person id, name the column of a case or request id: each case is then the "
                    "unit that is protected") if what == "--person-column" else ""
            raise ImportRefused(f"{what} '{name}' is not a column of the source (it has {', '.join(names[:30])}){hint}")
        found.add(original)
    return found


# -- CSV: every column is text -------------------------------------------------------------------------------


def _import_csv(source: Source, partial: Path, time_columns: tuple[str, ...], time_zone: str,
                day_first: bool | None, person: str | None, rows: int, report: Progress) -> ImportResult:
    try:
        # The first rows through a lazy scan: read_csv(n_rows=...) parses far more than it returns (0.6 GB at 10 M rows).
        sample = pl.scan_csv(source.location, infer_schema=False, separator=source.separator,
                             null_values=list(source.nulls) or None).head(SAMPLE_ROWS).collect()
    except pl.exceptions.NoDataError:
        raise ImportRefused(f"{source.location} is empty") from None
    except pl.exceptions.ComputeError as exc:
        raise ImportRefused(f"{source.location} cannot be read as CSV: {str(exc).splitlines()[0]}") from None
    names = sample.columns
    renamed = usable_names(names)
    named = _originals(time_columns, names, renamed, "--time-column")
    _originals((person,) if person else (), names, renamed, "--person-column")
    proposed = text_columns.propose(sample, named, day_first, time_zone)
    chains = {name: text_columns.chain(plan, day_first) for name, plan in proposed.items()}
    first = {name: chain[0] if chain else proposed[name] for name, chain in chains.items()}
    written, failures = _convert(source, partial, first, chains, renamed, time_zone, rows, report, "writing",
                                 sources.csv_rows_estimate(source))
    plans, notes = _decide(proposed, chains, failures, named)
    if any(plans[name] is not first[name] for name in plans):  # a value far down the file changed a type
        written, _ = _convert(source, partial, plans, {}, renamed, time_zone, rows, report, "rewriting", written)
    types = {renamed.get(name, name): plan.kind for name, plan in plans.items()}
    return ImportResult(partial, written, types, renamed, notes=notes)


def _convert(source: Source, partial: Path, plans: dict[str, TextPlan], chains: dict[str, list[TextPlan]],
             renamed: dict[str, str], time_zone: str, rows: int, report: Progress, stage: str, total: int
             ) -> tuple[int, dict[str, list[Failures]]]:
    """Convert and write every row with ``plans``; count, per column, the values each plan of its chain cannot
    read (the next plan is tried only on the values the one before could not read)."""
    checked = [name for name, chain in chains.items() if chain]
    failures = {name: [Failures() for _ in chains[name]] for name in checked}
    writer, written = _Writer(partial, rows), 0
    try:
        for batch in sources.text_batches(source, rows):
            out = batch.select([text_columns.convert(name, plans[name], time_zone) for name in batch.columns]
                               + [text_columns.present(name).alias(f"__present {name}") for name in checked])
            if checked:
                lost = {name: pl.col(f"__present {name}") & pl.col(name).is_null() for name in checked}
                counts = out.select([expr.sum().alias(name) for name, expr in lost.items()]).row(0, named=True)
                for name in (n for n, count in counts.items() if count):
                    rest = batch.select(name).filter(out.select(lost[name]).to_series())
                    _try_chain(rest, name, chains[name], failures[name], time_zone)
                out = out.drop([f"__present {name}" for name in checked])
            writer.add(out.rename(renamed).to_arrow())
            written += batch.height
            report(stage, written, max(total, written))
    finally:
        writer.close()
    if writer.writer is None:
        raise ImportRefused(f"{source.location} has a header but no rows")
    return written, failures


def _try_chain(rest: pl.DataFrame, name: str, chain: list[TextPlan], failures: list[Failures], time_zone: str) -> None:
    """Count the values of ``rest`` (those the first plan could not read) that each plan of the chain cannot read."""
    for i, plan in enumerate(chain):
        if i:
            rest = rest.filter(text_columns.unread(name, plan, time_zone))
        failures[i].add(rest.height, text_columns.failing_examples(rest, name, plan, time_zone))
        if rest.height == 0:
            return


def _decide(proposed: dict[str, TextPlan], chains: dict[str, list[TextPlan]], failures: dict[str, list[Failures]],
            named: set[str]) -> tuple[dict[str, TextPlan], list[str]]:
    """Each column's plan: the first of its chain that read every value; text (or a refusal) if none did."""
    plans, notes = {}, []
    for name, plan in proposed.items():
        chain = chains[name]
        failed = failures.get(name, [])
        good = next((p for p, f in zip(chain, failed) if f.count == 0), None)
        if good is None and chain:
            last = failed[-1]
            shown = ", ".join(repr(v) for v in last.examples)
            if name in named:
                raise ImportRefused(f"--time-column {name}: {last.count:,} values are not times in a format civicdp "
                                    f"reads (e.g. {shown}); fix them in the source, or import without naming it "
                                    "(it is then kept as text)")
            what = "times" if plan.kind == "datetime" else "numbers" if plan.kind in ("int", "float") else "true/false"
            good = TextPlan("str", note=f"{name}: kept as text: {last.count:,} values are not {what} (e.g. "
                                        f"{shown}); if they mean 'missing', import again with --null VALUE")
        elif good is not None and good is not chain[0] and good.kind != plan.kind:
            shown = ", ".join(repr(v) for v in failed[0].examples)
            good = TextPlan(good.kind, good.formats, f"{name}: read as {good.kind}, not {plan.kind}: "
                                                      f"{failed[0].count:,} values such as {shown}")
        plans[name] = good or (chain[0] if chain else plan)
        if plans[name].note or plan.note:
            notes.append(plans[name].note or plan.note)
    return plans, notes


class _Writer:
    """Batches into one Parquet file, in row groups of at least ``rows`` rows (the last one smaller)."""

    def __init__(self, path: Path, rows: int) -> None:
        self.path, self.rows = path, rows
        self.pending: list[pa.Table] = []
        self.writer: pq.ParquetWriter | None = None
        self.written = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        if sum(t.num_rows for t in self.pending) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if self.writer is None:
            self.schema = self.pending[0].schema
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        table = pa.concat_tables([t if t.schema == self.schema else t.cast(self.schema) for t in self.pending])
        self.writer.write_table(table, row_group_size=max(self.rows, table.num_rows))
        self.written += table.num_rows
        self.pending = []

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.writer is not None:
                self.writer.close()


# -- Parquet and PostgreSQL: typed columns ---------------------------------------------------------------


def _import_typed(source: Source, partial: Path, time_columns: tuple[str, ...], time_zone: str,
                  day_first: bool | None, person: str | None, rows: int, report: Progress) -> ImportResult:
    total = sources.total_rows(source)
    writer = _Writer(partial, rows)
    written, aside = 0, {}
    plans: dict[str, TextPlan] | None = None
    renamed: dict[str, str] = {}
    failures: dict[str, Failures] = {}
    types: dict[str, str] = {}
    try:
        for frame, set_aside in _typed_batches(source, rows, time_zone):
            if plans is None:
                aside, renamed = set_aside, usable_names(frame.columns)
                _originals((person,) if person else (), frame.columns, renamed, "--person-column")
                plans = _typed_plans(frame, _originals(time_columns, frame.columns, renamed, "--time-column"),
                                     day_first, time_zone)
                failures = {name: Failures() for name in plans}
            for name, plan in plans.items():
                bad = frame.select(text_columns.unread(name, plan, time_zone).sum()).item()
                if bad:
                    failures[name].add(bad, text_columns.failing_examples(frame, name, plan, time_zone))
            frame = frame.with_columns([text_columns.convert(n, p, time_zone) for n, p in plans.items()])
            types = {renamed.get(n, n): _kind(t) for n, t in frame.schema.items()}
            writer.add(frame.rename(renamed).to_arrow())
            written += frame.height
            report("writing", written, total)
    finally:
        writer.close()
    if writer.writer is None:
        raise ImportRefused(f"{source.label} has no rows")
    for name, failed in failures.items():
        if failed.count:
            raise ImportRefused(f"--time-column {name}: {failed.count:,} values are not times in a format civicdp "
                                f"reads (e.g. {', '.join(repr(v) for v in failed.examples)}); fix them in the source")
    notes = [p.note for p in (plans or {}).values() if p.note]
    return ImportResult(partial, written, types, renamed, aside, notes)


def _typed_batches(source: Source, rows: int, time_zone: str) -> Iterator[tuple[pl.DataFrame, dict[str, str]]]:
    try:
        for batch in sources.arrow_batches(source, rows):
            yield sources.typed_frame(batch, time_zone)
    except (pa.ArrowException, OSError) as exc:
        raise ImportRefused(f"{source.label} cannot be read: {exc}") from None


def _typed_plans(frame: pl.DataFrame, named: set[str], day_first: bool | None, time_zone: str) -> dict[str, TextPlan]:
    """Plans for the text columns named as times (every other typed column keeps its type)."""
    plans = {}
    for name in sorted(named):
        dtype = frame.schema[name]
        if isinstance(dtype, pl.Datetime):
            continue
        if dtype != pl.String:
            raise ImportRefused(f"--time-column {name}: the source stores it as {dtype}, not as times or text; "
                                "convert it in the source")
        plans[name] = text_columns.propose(frame.select(name), {name}, day_first, time_zone)[name]
    return plans


def _kind(dtype: pl.DataType) -> str:
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    if dtype == pl.Boolean:
        return "bool"
    if isinstance(dtype, pl.Datetime):
        return "datetime"
    return "str"
