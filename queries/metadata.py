"""The data owner's declaration of a dataset: privacy unit, bounds and public keys.

Metadata is public and comes from the data steward, never from the analyst and
never from the data. It names the privacy-unit column, the maximum number of rows
a query may keep per person by default (``max_contributions``), and for every
column its type and either a public key set or public clipping bounds. Time columns
have public bounds from which the keys of their buckets (hour, weekday, day, ISO
week, month) are derived.
"""

from __future__ import annotations

import json
import math
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from civicdp.privacy.accounting import Accounting
from civicdp.privacy.bounding import coarsest_needed
from civicdp.privacy.errors import InvalidLoss
from civicdp.queries.errors import MetadataError

ColumnType = Literal["int", "float", "str", "datetime", "bool"]
#: How identifying a column is (the values of ``civicdp.policies.actions.ColumnClass``, which queries may not import).
ColumnClassName = Literal["public", "quasi", "sensitive"]
TIME_BUCKETS = ("hour", "weekday", "day", "week", "month")
MAX_BUCKET_KEYS = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnMeta(_Strict):
    """Declaration of one column.

    ``column_class`` is the JSON field ``class`` (a Python keyword): the steward's statement
    of how identifying the column is, which registration applies to the policies (SECURITY.md:
    lower caps on quasi-identifiers, no queries on sensitive columns). ``None``: not stated
    -- public, unless a steward classified the column otherwise. ``ends_case``: the column is
    missing while a case is open (its end time, or a duration computed from it), so the
    steward's check counts open cases by it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)  # only "class" in JSON

    type: ColumnType
    identifier: bool = False
    keys: tuple[int | str | bool, ...] | None = None
    bounds: tuple[float, float] | tuple[datetime, datetime] | None = None
    nullable: bool = False
    resolution: float | None = Field(default=None, gt=0)
    column_class: ColumnClassName | None = Field(default=None, alias="class")
    ends_case: bool = False

    @model_validator(mode="after")
    def _check(self) -> ColumnMeta:
        if self.identifier and self.column_class is not None:
            raise ValueError(f"an identifier column cannot have a 'class' (got {self.column_class!r}): identifiers "
                             "are never grouped by, filtered on or measured, whatever their class; remove 'class'")
        if self.keys is not None:
            if len(self.keys) == 0:
                raise ValueError("keys must not be empty: list the public values or remove 'keys'")
            if len(set(self.keys)) != len(self.keys):
                raise ValueError("keys must be unique")
        if self.type == "datetime" and self.bounds is None:
            raise ValueError("a datetime column needs public 'bounds' [start, end]")
        if self.bounds is not None:
            lo, hi = self.bounds
            timed = [isinstance(b, datetime) for b in self.bounds]
            if self.type == "datetime" and not all(timed):
                raise ValueError("a datetime column's bounds must be ISO times, e.g. [\"2024-01-01T00:00:00Z\", "
                                 f"\"2025-01-01T00:00:00Z\"], not numbers (got {[str(b) for b in self.bounds]})")
            if self.type != "datetime" and any(timed):
                raise ValueError(f"a {self.type} column's bounds must be numbers, not times")
            if all(timed) and (lo.utcoffset() is None) != (hi.utcoffset() is None):  # type: ignore[union-attr]
                raise ValueError("a datetime column's bounds must both have a time zone (e.g. 'Z') or both not")
            if isinstance(lo, float) and not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("bounds must be finite numbers")
            if not lo < hi:
                raise ValueError(f"bounds must be increasing, got [{lo}, {hi}]")
        return self

    @property
    def public(self) -> bool:
        """Whether the column may be grouped by or filtered on."""
        return self.keys is not None or self.type == "datetime"

    @property
    def value_resolution(self) -> float:
        """Granularity to which clipped values are rounded before private sums."""
        if self.resolution is not None:
            return self.resolution
        lo, hi = self.bounds  # type: ignore[misc]
        span = float(hi) - float(lo)
        # A millionth of the span, but never so fine that exact sums could overflow.
        return max(10.0 ** math.floor(math.log10(span / 1e6)), coarsest_needed(float(lo), float(hi)))


class TableMeta(_Strict):
    """One table. ``max_contributions``: a linked table's own default of rows kept per privacy
    unit (steps per case); without it such a table takes the dataset's ``max_contributions``."""

    path: str
    columns: dict[str, ColumnMeta]
    privacy_unit_via: dict[str, str] | None = None
    max_contributions: int | None = Field(default=None, ge=1, le=100_000)


class AccountingMeta(_Strict):
    """How the dataset accounts for privacy loss (``civicdp.privacy.accounting``): chosen by its steward."""

    mode: Literal["pure", "zcdp"] = "pure"
    delta: float = 0.0  # zcdp: the public delta at which losses are stated as (epsilon, delta)

    @model_validator(mode="after")
    def _check(self) -> AccountingMeta:
        try:
            self.rule  # noqa: B018 - validates mode and delta together
        except InvalidLoss as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def rule(self) -> Accounting:
        return Accounting(self.mode, self.delta)


class ProposedFromData(_Strict):
    """Values of a draft declaration that ``civicdp datasets init`` read off the data.

    They are not public knowledge until the steward confirms them: ``fields`` names each
    (``max_contributions``, ``tables.events.columns.channel.keys``, ...) and registration
    refuses a declaration that still lists any (``server/state/dataset_checks.py``).
    ``notice`` says so in plain words for whoever opens the file.
    """

    notice: str = ""
    fields: tuple[str, ...] = ()


class DatasetMetadata(_Strict):
    """The whole public declaration of a dataset."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1, max_length=100)
    description: str = ""
    privacy_unit: str
    max_contributions: int = Field(ge=1, le=100_000)
    max_contributions_limit: int = Field(default=1000, ge=1, le=100_000)
    tables: dict[str, TableMeta]
    catalogue: dict[str, Any] | None = None
    accounting: AccountingMeta = Field(default_factory=AccountingMeta)
    proposed_from_data: ProposedFromData | None = None
    #: Which backend computes the exact aggregates: Polars on this machine, or Spark
    #: (queries/spark_backend.py, docs/spark.md), where tables may be URLs or "table:db.name".
    engine: Literal["polars", "spark"] = "polars"

    @model_validator(mode="after")
    def _check(self) -> DatasetMetadata:
        if not self.tables:
            raise ValueError("declare at least one table")
        for tname, table in self.tables.items():
            via = table.privacy_unit_via
            if table.max_contributions is not None:
                if via is None:
                    raise ValueError(f"table '{tname}': a table's own max_contributions is for a table linked "
                                     "through privacy_unit_via; this table holds the privacy unit, so the "
                                     "dataset's max_contributions bounds it: remove it here")
                if table.max_contributions > self.max_contributions_limit:
                    raise ValueError(f"table '{tname}': max_contributions must not exceed max_contributions_limit")
            if via is None:
                if self.privacy_unit not in table.columns:
                    raise ValueError(
                        f"table '{tname}' has no privacy-unit column '{self.privacy_unit}': "
                        "add it to its columns or declare privacy_unit_via"
                    )
            else:
                other = self.tables.get(via.get("table", ""))
                on = via.get("on", "")
                if other is None or on not in other.columns or on not in table.columns:
                    raise ValueError(
                        f"table '{tname}': privacy_unit_via must name another table and a column "
                        "present in both, e.g. {\"table\": \"events\", \"on\": \"event_id\"}"
                    )
        if self.max_contributions > self.max_contributions_limit:
            raise ValueError("max_contributions must not exceed max_contributions_limit")
        return self

    def table(self, name: str) -> TableMeta:
        return self.tables[name]

    def row_limit(self, table: str) -> int:
        """Rows per privacy unit a query on ``table`` keeps by default."""
        return self.tables[table].max_contributions or self.max_contributions

    def linked_rows_note(self, table: str, kept: int | None) -> str | None:
        """For an answer's notes: how a linked table's rows were bounded, and where its default comes from
        (None for a table that holds the privacy unit itself)."""
        meta = self.tables[table]
        via = meta.privacy_unit_via
        if via is None:
            return None
        default = self.row_limit(table)
        source = (f"tables.{table}.max_contributions" if meta.max_contributions is not None else
                  "the dataset's max_contributions: the table declares no max_contributions of its own")
        used = f"at most {kept} of its rows per {self.privacy_unit} were kept" if kept is not None else \
            f"its rows per {self.privacy_unit} are bounded"
        return (f"table '{table}' reaches the privacy unit through {via['table']}.{via['on']}: {used} "
                f"(default {default}, from {source}); rows beyond it are dropped before aggregating")


def parse_metadata(raw: dict[str, Any]) -> DatasetMetadata:
    """Validate a metadata document, with errors that name the field and the fix."""
    try:
        return DatasetMetadata.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "metadata"
        raise MetadataError(where, first["msg"], "Correct the dataset's metadata.json") from None


def load_metadata(path: Path) -> DatasetMetadata:
    """Read ``metadata.json`` (or a dataset folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise MetadataError("metadata", f"no metadata file at {path}",
                            "Point to a dataset folder with a metadata.json") from None
    except json.JSONDecodeError as exc:
        raise MetadataError("metadata", f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})",
                            "Fix the JSON syntax") from None
    if not isinstance(raw, dict):
        raise MetadataError("metadata", "the document must be a JSON object")
    return parse_metadata(raw)


def bucket_keys(column: ColumnMeta, bucket: str) -> list[int | str]:
    """Public keys of a time bucket, derived from the column's declared bounds."""
    if bucket == "hour":
        return list(range(24))
    if bucket == "weekday":
        return list(range(1, 8))
    start, end = column.bounds  # type: ignore[misc]
    return bucket_keys_between(bucket, _as_datetime(start), _as_datetime(end))


def bucket_keys_between(bucket: str, start: datetime | None, end: datetime | None) -> list[str]:
    """Keys of the day, week or month buckets that meet the time range [start, end)."""
    if start is None:
        start = datetime(1, 1, 1)
    if end is None:
        end = datetime(9999, 12, 31)
    first, last = _as_datetime(start).date(), (_as_datetime(end) - timedelta(microseconds=1)).date()
    if (last - first).days > MAX_BUCKET_KEYS:
        raise MetadataError("bounds", f"the time range gives more than {MAX_BUCKET_KEYS} day keys")
    if bucket == "day":
        keys = [str(first + timedelta(days=i)) for i in range((last - first).days + 1)]
    elif bucket == "week":
        monday = first - timedelta(days=first.weekday())
        keys = []
        while monday <= last:
            iso = monday.isocalendar()
            keys.append(f"{iso.year}-W{iso.week:02d}")
            monday += timedelta(days=7)
    elif bucket == "month":
        keys, cursor = [], date(first.year, first.month, 1)
        while cursor <= last:
            keys.append(f"{cursor.year}-{cursor.month:02d}")
            cursor = date(cursor.year + cursor.month // 12, cursor.month % 12 + 1, 1)
    else:
        raise ValueError(bucket)
    if len(keys) > MAX_BUCKET_KEYS:
        raise MetadataError("bounds", f"the time range gives more than {MAX_BUCKET_KEYS} {bucket} keys")
    return keys


def _as_datetime(value: object) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    return datetime.fromisoformat(str(value))
