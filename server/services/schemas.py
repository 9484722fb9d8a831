"""HTTP schemas: what the API accepts and returns. Never key hashes or table internals."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from civicdp.policies.actions import Action, ColumnClass, Role
from civicdp.server.services import documented_shapes as shapes
from civicdp.server.services.request_bodies import DocumentAs, QueryRequest

#: Values passed on as built (see documented_shapes.py), documented by their shapes.
Rows = Annotated[list[dict[str, Any]], DocumentAs(list[shapes.ResultRow])]
Mechanisms = Annotated[list[dict[str, Any]], DocumentAs(list[shapes.Mechanism])]
PublicTables = Annotated[dict[str, Any], DocumentAs(dict[str, shapes.PublicTable])]


def examples(*values: dict[str, Any]) -> ConfigDict:
    """A request model's configuration: extra fields refused, and examples for /docs."""
    return ConfigDict(extra="forbid", json_schema_extra={"examples": list(values)})


class Loss(BaseModel):
    epsilon: float = Field(description="Privacy loss: pure epsilon, or on a zCDP dataset the epsilon at its delta")
    delta: float = 0.0
    rho: float | None = Field(default=None, description="zCDP datasets: the loss as rho (what composes)")


class BudgetOut(BaseModel):
    dataset: str
    scope: str = Field(description="analyst, agency, dataset (per period) or lifetime")
    subject: str
    period: str = Field(description="Calendar month (UTC) such as 2026-11, or 'lifetime'")
    cap_epsilon: float
    spent_epsilon: float
    remaining_epsilon: float
    cap_micro: int = Field(description="Exact amounts in the dataset's ledger unit: micro-epsilon, "
                                       "or nano-rho on a zCDP dataset")
    spent_micro: int
    remaining_micro: int
    renews_at: datetime | None = Field(default=None, description="When a monthly budget starts afresh")
    unit: str = Field(default="epsilon", description="What the dataset's budgets count: epsilon or rho")
    cap_rho: float | None = Field(default=None, description="zCDP datasets: the cap in rho")
    spent_rho: float | None = None
    remaining_rho: float | None = None
    delta: float | None = Field(default=None, description="zCDP datasets: the public delta epsilons are stated at")


class SharePublished(BaseModel):
    """One finding of a version's registration check, as its steward published it."""

    kind: Literal["dropped_keys", "undeclared_nulls", "clipped", "open_cases"]
    table: str
    column: str | None
    share: float = Field(description="Share of the table's rows it touches, to the whole percent; 0.01 stands "
                                      "for anything up to 1%")
    accepted: bool = Field(description="Accepted at registration instead of fixed")


class DatasetOut(BaseModel):
    name: str
    version: str
    description: str
    privacy_unit: str
    max_contributions: int
    tables: PublicTables = Field(description="Public metadata: columns, key sets and bounds")
    accepted_shares: list[SharePublished] | None = Field(
        default=None, description="What the registration check found, as shares of rows (rounded to 0.1%), "
                                  "when the steward published them; null otherwise")


class DerivedOut(BaseModel):
    """How an answer was computed from stored releases alone (issue 18): post-processing, free."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    from_: list[int] = Field(alias="from", description="The stored releases it is computed from")
    how: str = Field(description="The derivation (roll-up, subset of cells, ratio) and how its interval is bounded")


class EstimateOut(BaseModel):
    dataset: str
    loss: Loss
    contributions: int | str
    confidence: float
    mechanisms: Mechanisms
    accuracy: Annotated[dict[str, Any], DocumentAs(shapes.Accuracy)]
    notes: list[str]
    cached: bool = Field(description="An identical question was answered before: running it costs nothing")
    derived: DerivedOut | None = Field(
        default=None, description="Running it would answer from stored releases, free (as the answer's derived says)")


class TableOut(BaseModel):
    columns: list[str]
    rows: Annotated[list[dict[str, Any]], DocumentAs(list[shapes.TableRow])]


class QueryResultOut(BaseModel):
    release_id: int
    dataset: str
    dataset_version: str
    cached: bool = Field(description="The stored answer to an identical earlier question; nothing was charged")
    charged: Loss = Field(description="What this request charged (zero when cached)")
    derived: DerivedOut | None = Field(
        default=None, description="Computed from stored releases of this version, charged nothing; else null")
    loss: Loss = Field(description="The privacy loss of the release itself")
    contributions: int
    confidence: float
    columns: list[str]
    rows: Rows = Field(description="One row per cell: group keys, value, ci_low, ci_high")
    mechanisms: Mechanisms
    notes: list[str]
    tables: dict[str, TableOut] = Field(default_factory=dict,
                                        description="Further tables of an analysis (e.g. bundles), by name")
    budgets: list[BudgetOut] = Field(description="The caller's budgets on this dataset after the charge")


class ReleaseOut(BaseModel):
    id: int
    dataset: str
    dataset_version: str
    query: Annotated[dict[str, Any], DocumentAs(QueryRequest)] = Field(description="The question, canonical")
    loss: Loss
    result_hash: str
    created_at: datetime


class AccountCreate(BaseModel):
    model_config = examples({"name": "ana-health", "agency": "health"})
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    agency: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class AccountOut(BaseModel):
    name: str
    agency: str
    disabled: bool
    roles: list[dict[str, str]]


class KeyCreate(BaseModel):
    model_config = examples({"expires_in_days": 90}, {"expires_in_days": None})
    expires_in_days: int | None = Field(default=90, ge=1, le=3650)


class KeyOut(BaseModel):
    prefix: str
    account: str
    expires_at: datetime | None
    api_key: str | None = Field(default=None, description="The secret key: shown once, at creation")


class RoleGrant(BaseModel):
    model_config = examples({"role": "analyst", "agency": "health"}, {"role": "oversight", "agency": "*"})
    role: Role
    agency: str = Field(min_length=1, max_length=100, pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]*)$")


class PolicyRule(BaseModel):
    model_config = examples({"subject": "analyst", "agency": "health", "object": "civic-demo",
                             "action": "query.run", "cap": "0.5", "effect": "allow"})
    subject: str = Field(min_length=1, max_length=100)
    agency: str = Field(min_length=1, max_length=100)
    object: str = Field(min_length=1, max_length=200)
    action: Action
    cap: str = Field(default="*", max_length=20, pattern=r"^(\*|[0-9]+(\.[0-9]+)?)$")
    effect: str = Field(default="allow", pattern=r"^(allow|deny)$")


class DatasetRegister(BaseModel):
    model_config = examples({"path": "/srv/civicdp/datasets/civic-demo"},
                            {"path": "/srv/civicdp/datasets/civic-demo", "accept": ["dropped_keys"],
                             "publish_accepted_shares": True})
    path: str = Field(min_length=1, max_length=1000, description="Folder with metadata.json and Parquet files, on the server")
    accept: list[Literal["undeclared_nulls", "dropped_keys"]] = Field(
        default_factory=list, max_length=2,
        description="Check problems accepted rather than fixed (recorded in the audit log): 'undeclared_nulls' - "
                    "missing values in a column not declared nullable, dropped after bounding; 'dropped_keys' - "
                    "rows whose value is not in a column's declared keys (in no group)")
    publish_accepted_shares: bool = Field(
        default=False, description="Show analysts the share of rows each finding of the check touches (dropped "
                                   "keys, nulls, clipped values, open cases) in the public metadata. The shares "
                                   "are data: private unless the steward chooses")


class ColumnClassSet(BaseModel):
    """A steward's change of a column's class (issue 14)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={"examples": [{"class": "quasi"}]})
    column_class: ColumnClass = Field(alias="class", description="public, quasi (quasi-identifier: the lower "
                                      "per-query cap) or sensitive (never queried)")


class ColumnClassOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    dataset: str
    column: str
    column_class: ColumnClass = Field(alias="class")
    changed: bool = Field(description="False if the column had this class already (nothing recorded)")


class BudgetCapSet(BaseModel):
    model_config = examples({"dataset": "civic-demo", "scope": "analyst", "subject": "ana-health", "epsilon": 1.5},
                            {"dataset": "civic-demo", "scope": "lifetime", "epsilon": 8})
    dataset: str = Field(min_length=1, max_length=100)
    scope: str = Field(pattern=r"^(analyst|agency|dataset|lifetime)$")
    subject: str = Field(default="*", min_length=1, max_length=100)
    epsilon: float = Field(gt=0, le=1000, allow_inf_nan=False)


class Health(BaseModel):
    status: str


class AuditEntryOut(BaseModel):
    seq: int
    leaf_hash: str = Field(description="SHA-256(0x00 || entry bytes), hex: the RFC 9162 leaf")
    entry: Annotated[dict[str, Any], DocumentAs(shapes.AuditEntry)] = Field(
        description="The entry exactly as hashed (its canonical JSON parsed): recompute the leaf hash from it")


class AuditEntriesOut(BaseModel):
    entries: list[AuditEntryOut]
    next_after: int | None = Field(description="Pass as `after` for the next page; null on the last page")


class LedgerOut(BaseModel):
    budgets: list[BudgetOut]
    history: Annotated[list[dict[str, Any]], DocumentAs(list[shapes.LedgerCharge])] = Field(description="Each charge: time, scope, amount, before and after, and the "
                                          "cap in force when it was charged (cap_micro; null if not known)")


class InclusionProofOut(BaseModel):
    seq: int
    tree_size: int
    leaf_hash: str
    root: str
    path: list[str]


class ConsistencyProofOut(BaseModel):
    first: int
    second: int
    first_root: str
    second_root: str
    path: list[str]
