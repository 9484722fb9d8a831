"""Text columns of a source (every CSV column; text columns named as times): their type and how to read them.

A column's type is chosen from every value, never from a sample alone: a sample of the
first rows proposes a type (and, for times, the formats its values are written in), a
full pass counts the values the proposal cannot read, and a column with any is read as
the next type that reads them all (an integer column with a ``12.5`` is a float column;
one with ``N/A`` or a leading zero, as in ``02134``, stays text). Nothing is turned
into a missing value silently.

Times may be written in any of :data:`ISO_FORMATS` and one of the slashed families
(month first, as in ``12/31/2017 11:59 PM``, or day first, ``31/12/2017 23:59``), mixed
freely within a column. A value with an offset (``+01:00``, ``-0500``, ``Z``) is converted
to UTC; a value without one is read in the steward's ``time_zone`` (default UTC) and
converted to UTC. Times are stored as UTC without a zone, the form the engine reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import polars as pl

Kind = Literal["bool", "int", "float", "datetime", "str"]

ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z", "%Y-%m-%d %H:%M%#z",
    "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d",
    "%Y/%m/%d %H:%M:%S%.f", "%Y/%m/%d %H:%M", "%Y/%m/%d",
    "%a, %d %b %Y %H:%M:%S %z", "%d %b %Y %H:%M:%S", "%d %b %Y %H:%M", "%d %b %Y", "%b %d, %Y %I:%M:%S %p",
    "%b %d, %Y", "%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%d.%m.%Y",
)


_CLOCKS = (" %I:%M:%S %p", " %I:%M %p", " %H:%M:%S%.f", " %H:%M", "")
# Two-digit years first: '%Y' would read the '20' of '1/1/20' as the year 20.
MONTH_FIRST = tuple(f"%m/%d/{year}{clock}" for year in ("%y", "%Y") for clock in _CLOCKS)
DAY_FIRST = tuple(f"%d/%m/{year}{clock}" for year in ("%y", "%Y") for clock in _CLOCKS)
#: Years outside this range are a misread (a two-digit year read as four), not data.
YEARS = (1000, 9999)


@dataclass(frozen=True)
class TextPlan:
    """How one text column is read: its kind, and for times the formats tried in order."""

    kind: Kind
    formats: tuple[str, ...] = ()
    #: Why the column is read this way, when the steward should know (a fallback, an ambiguity).
    note: str = ""


@dataclass
class Failures:
    """Values of a column its plan cannot read, counted over a full pass, with a few examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, count: int, examples: list[str]) -> None:
        self.count += count
        for value in examples:
            if len(self.examples) < 3 and value not in self.examples:
                self.examples.append(value)


def _text(name: str) -> pl.Expr:
    return pl.col(name).str.strip_chars()


def parse_times(name: str, formats: tuple[str, ...], time_zone: str) -> pl.Expr:
    """The column's times in UTC without a zone: the first format that reads each value wins."""
    parsed = []
    for fmt in formats:
        value = _read(name, fmt)
        if "%z" not in fmt and "%#z" not in fmt:
            value = value.dt.replace_time_zone(time_zone, ambiguous="earliest", non_existent="null")
        parsed.append(value.dt.convert_time_zone("UTC"))
    return pl.coalesce(parsed).dt.replace_time_zone(None)


def _read(name: str, fmt: str) -> pl.Expr:
    """The column's values that ``fmt`` reads, with a plausible year; null elsewhere."""
    value = _text(name).str.strptime(pl.Datetime("us"), fmt, strict=False, exact=True)
    # A year outside YEARS is a misread ('%Y/%m/%d' reads '1/3/24' as the year 1): the next format tries.
    return pl.when(value.dt.year().is_between(*YEARS)).then(value)


def convert(name: str, plan: TextPlan, time_zone: str) -> pl.Expr:
    """The expression reading text column ``name`` as ``plan`` says (a value it cannot read becomes null)."""
    text = _text(name)
    if plan.kind in ("int", "float"):  # a leading zero (a code such as 02134) is text, not a number
        number = text.cast(pl.Int64 if plan.kind == "int" else pl.Float64, strict=False)
        return pl.when(text.str.contains(r"^[-+]?0\d")).then(None).otherwise(number).alias(name)
    if plan.kind == "bool":
        lower = text.str.to_lowercase()
        return pl.when(lower == "true").then(True).when(lower == "false").then(False).otherwise(None).alias(name)
    if plan.kind == "datetime":
        return parse_times(name, plan.formats, time_zone).alias(name)
    return pl.col(name)


def present(name: str) -> pl.Expr:
    """True where the text column has a value (not missing, not blank)."""
    return pl.col(name).str.strip_chars().str.len_chars().gt(0)


def unread(name: str, plan: TextPlan, time_zone: str) -> pl.Expr:
    """True where the column has a value that ``plan`` cannot read."""
    return present(name) & convert(name, plan, time_zone).is_null()


def propose(sample: pl.DataFrame, time_columns: set[str], day_first: bool | None, time_zone: str
            ) -> dict[str, TextPlan]:
    """A plan for every text column of ``sample`` (the first rows), to be checked over every row."""
    plans = {}
    for name in sample.columns:
        values = sample.select(pl.col(name)).filter(_text(name).str.len_chars() > 0)
        if values.height == 0:
            plans[name] = TextPlan("datetime", ISO_FORMATS + MONTH_FIRST) if name in time_columns else TextPlan("str")
            continue
        if name not in time_columns:
            for kind in ("bool", "int", "float"):
                plan = TextPlan(kind)  # type: ignore[arg-type]
                if not values.select(unread(name, plan, time_zone).any()).item():
                    break
            else:
                plan = _time_plan(values, name, day_first, time_zone, named=False)
            plans[name] = plan
        else:
            plans[name] = _time_plan(values, name, day_first, time_zone, named=True)
    return plans


def _time_plan(values: pl.DataFrame, name: str, day_first: bool | None, time_zone: str, *, named: bool) -> TextPlan:
    """The formats the sample's times are written in (``str`` when they are not times and not named as such)."""
    candidates = ISO_FORMATS + MONTH_FIRST + DAY_FIRST
    if not named:  # most text is not times: a glance at the first values says so
        head = values.head(200)
        if head.select(parse_times(name, candidates, "UTC").is_null().any()).item():
            return TextPlan("str")
    hits = values.select([_read(name, f).is_not_null().sum().alias(str(i)) for i, f in enumerate(candidates)]).row(0)
    count = dict(zip(candidates, hits))
    def read_by(formats: tuple[str, ...]) -> pl.Expr:
        return pl.coalesce([_read(name, f) for f in formats]).is_not_null().sum()

    month, day = values.select(read_by(MONTH_FIRST), read_by(DAY_FIRST).alias("day")).row(0)
    note = ""
    if day_first is None:  # the family that reads more of the slashed dates (a tie: month first, said)
        day_first = day > month
        if month and month == day:
            note = (f"{name}: every slashed date in the first rows reads both month-first and day-first; read as "
                    f"{'day' if day_first else 'month'}-first (import again with --day-first or --month-first "
                    "to choose)")
    family = DAY_FIRST if day_first else MONTH_FIRST
    used = tuple(f for f in ISO_FORMATS + family if count[f] > 0)
    plan = TextPlan("datetime", used or ISO_FORMATS + family, note)
    if not named and values.select(unread(name, plan, time_zone).any()).item():
        return TextPlan("str")
    return plan


def chain(plan: TextPlan, day_first: bool | None) -> list[TextPlan]:
    """The plans a full pass checks for a column, in order: the first that reads every value is used.

    Each plan reads every value the one before it reads (an integer is a float; the whole
    list of time formats reads what the sample's formats read), so a pass need only try the
    next plan on the values the one before could not read. After the last: text (or, for a
    column named as a time, a refusal).
    """
    if plan.kind == "int":
        return [plan, TextPlan("float")]
    if plan.kind == "datetime":
        everything = ISO_FORMATS + (DAY_FIRST if day_first else MONTH_FIRST)
        return [plan] if set(plan.formats) >= set(everything) else [plan, replace(plan, formats=everything)]
    return [plan] if plan.kind != "str" else []


def failing_examples(batch: pl.DataFrame, name: str, plan: TextPlan, time_zone: str) -> list[str]:
    """Up to three values of ``batch`` that ``plan`` cannot read."""
    rows = batch.select(pl.col(name)).filter(unread(name, plan, time_zone)).unique(maintain_order=True).head(3)
    return [str(v) for v in rows.to_series()]
