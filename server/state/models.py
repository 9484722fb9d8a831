"""What the server stores (SQLModel): accounts, API keys, datasets and their preparations,
budgets, the ledger, releases and the audit log (entries, signed checkpoints, public keys).

Amounts of privacy loss are integers in micro-epsilon (``civicdp.privacy.loss.MICRO``), so
sums are exact and a cap of 0.3 holds three charges of 0.1. HTTP schemas live in
``server/services/schemas.py`` and never expose key hashes or table internals.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, Integer, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Account(SQLModel, table=True):
    """A person or service that calls the API. Roles are granted per agency in the policy store."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=100)
    agency: str = Field(index=True, max_length=100)
    created_at: datetime = Field(default_factory=utcnow)
    disabled: bool = False


class ApiKey(SQLModel, table=True):
    """An API key: a public lookup prefix and the HMAC-SHA256 of its secret, never the secret."""

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", index=True)
    prefix: str = Field(index=True, unique=True, max_length=32)
    secret_hash: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class Dataset(SQLModel, table=True):
    """A registered dataset: where its Parquet files are and its public metadata."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=100)
    version: str = Field(max_length=100)
    path: str
    metadata_json: str = Field(sa_column=Column(Text, nullable=False))
    registered_at: datetime = Field(default_factory=utcnow)


class DatasetPreparation(SQLModel, table=True):
    """One preparation of a registered version: its snapshot's progress, shared by every process.

    Registration through the CLI or the API writes a ``pending`` row with the version as
    registered; one worker claims it (a conditional update: ``preparing``, its name and a
    heartbeat), reports each table done, and when the snapshot is complete makes the
    version the served one in the ``dataset`` row (``ready``). The version served before
    stays served until then. ``superseded``: replaced (or a newer registration came first),
    its files removed after a grace period (then ``removed``); ``failed``: ``error`` says why,
    in words that quote no data. Ids are never reused (they name the snapshot folders).
    """

    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    dataset: str = Field(index=True, max_length=100)
    version: str = Field(max_length=100)
    path: str = Field(sa_column=Column(Text, nullable=False))
    metadata_json: str = Field(sa_column=Column(Text, nullable=False))
    #: True when no version of the dataset was served at registration: queries wait for this one.
    first: bool = False
    state: str = Field(default="pending", index=True, max_length=20)
    tables_total: int = 0
    tables_done: int = 0
    current_table: str | None = Field(default=None, max_length=200)
    requested_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    superseded_at: datetime | None = None
    heartbeat_at: datetime | None = None
    worker: str | None = Field(default=None, max_length=200)
    error: str | None = Field(default=None, sa_column=Column(Text))
    #: The source files' states when they were prepared (JSON), to tell a re-registration of unchanged files.
    sources_json: str | None = Field(default=None, sa_column=Column(Text))


class BudgetCap(SQLModel, table=True):
    """The cap of one kind of scope on one dataset, set by a steward.

    ``subject`` is an account name (scope ``analyst``), an agency (scope ``agency``) or
    ``*`` for the default of that kind; ``dataset`` and ``lifetime`` scopes use ``*``.
    """

    __table_args__ = (UniqueConstraint("dataset", "scope", "subject"),)
    id: int | None = Field(default=None, primary_key=True)
    dataset: str = Field(index=True, max_length=100)
    scope: str = Field(max_length=20)  # analyst | agency | dataset | lifetime
    subject: str = Field(max_length=100)
    cap_micro: int = Field(sa_column=Column(BigInteger, nullable=False))


class Budget(SQLModel, table=True):
    """One scope's spending in one period: the row the conditional charge updates."""

    __table_args__ = (UniqueConstraint("dataset", "scope", "subject", "period"),)
    id: int | None = Field(default=None, primary_key=True)
    dataset: str = Field(index=True, max_length=100)
    scope: str = Field(max_length=20)
    subject: str = Field(max_length=100)
    period: str = Field(max_length=20)  # "2026-11" for monthly scopes, "lifetime"
    cap_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    spent_micro: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class LedgerEntry(SQLModel, table=True):
    """One charge against one budget row, written in the transaction that releases."""

    id: int | None = Field(default=None, primary_key=True)
    budget_id: int = Field(foreign_key="budget.id", index=True)
    release_id: int | None = Field(default=None, foreign_key="release.id", index=True)
    account_id: int | None = Field(default=None, foreign_key="account.id")
    amount_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    spent_before_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    spent_after_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Release(SQLModel, table=True):
    """A released answer, stored so an identical question gets the same answer for free."""

    __table_args__ = (UniqueConstraint("dataset", "dataset_version", "query_hash"),)
    id: int | None = Field(default=None, primary_key=True)
    dataset: str = Field(index=True, max_length=100)
    dataset_version: str = Field(max_length=100)
    query_hash: str = Field(max_length=64)
    canonical_query: str = Field(sa_column=Column(Text, nullable=False))
    loss_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    result_json: str = Field(sa_column=Column(Text, nullable=False))
    result_hash: str = Field(max_length=64)
    account_id: int | None = Field(default=None, foreign_key="account.id")
    created_at: datetime = Field(default_factory=utcnow)


class Computation(SQLModel, table=True):
    """A query that has been charged and is being computed: paid for before any data is read.

    One row per question (dataset, version, query) at a time, so a concurrent identical
    question waits for its release instead of paying again. The row goes when the release
    is stored or the computation fails; one left by a crash is abandoned (and audited)
    once it is older than the computation timeout. ``ledger_ids`` are the charges it made
    (JSON list), linked to the release when it is stored.

    Its ``id`` is the ``computation_id`` that ties a charge's audit entry to its outcome's
    (released, failed, abandoned), so it is never handed out twice: on SQLite the table is
    ``AUTOINCREMENT`` (a plain integer key reuses the id of the newest row once it is deleted,
    which is what every release and failure does).
    """

    __table_args__ = (UniqueConstraint("dataset", "dataset_version", "query_hash"), {"sqlite_autoincrement": True})
    id: int | None = Field(default=None, primary_key=True)
    dataset: str = Field(index=True, max_length=100)
    dataset_version: str = Field(max_length=100)
    query_hash: str = Field(max_length=64)
    account_id: int | None = Field(default=None, foreign_key="account.id")
    loss_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    ledger_ids: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    started_at: datetime = Field(default_factory=utcnow)


class AuditHead(SQLModel, table=True):
    """The log's size: the one row every append updates, which hands out gapless numbers.

    Updating it takes a row lock held to commit, so entries commit in the order of their
    numbers on PostgreSQL too, and the committed entries are always a prefix of the log.
    """

    id: int = Field(default=1, primary_key=True)
    size: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class AuditEntry(SQLModel, table=True):
    """One entry of the tamper-evident log: canonical JSON bytes and their RFC 9162 leaf hash.

    The other columns repeat fields of the entry so oversight can filter; only
    ``entry_json`` is hashed and exported.
    """

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    account: str | None = Field(default=None, index=True, max_length=100)
    account_id: int | None = Field(default=None, index=True)
    agency: str | None = Field(default=None, index=True, max_length=100)
    action: str = Field(index=True, max_length=60)
    target: str = Field(max_length=200)
    dataset: str | None = Field(default=None, index=True, max_length=100)
    decision: str = Field(index=True, max_length=20)
    entry_json: str = Field(sa_column=Column(Text, nullable=False))
    leaf_hash: str = Field(max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    """A signed checkpoint (C2SP note text) of the log's first ``size`` entries."""

    size: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    root: str = Field(max_length=64)
    note: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class AuditKey(SQLModel, table=True):
    """A public key the log has signed with (never a private key), and when it was used."""

    id: int | None = Field(default=None, primary_key=True)
    verifier: str = Field(unique=True, max_length=300)
    activated_at: datetime = Field(default_factory=utcnow)
    retired_at: datetime | None = None


class AuditTile(SQLModel, table=True):
    """A tile of the log's Merkle tree (:mod:`civicdp.audit.tiles`): up to 256 hashes of one height, concatenated.

    Written by whichever server process integrates new entries, under one lock
    (:mod:`civicdp.server.auditlog.tree_store`); a full tile never changes, a partial one only grows.
    """

    level: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    idx: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    hashes: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class AuditTree(SQLModel, table=True):
    """How many entries the stored tree holds (entries ``0 .. size - 1`` are integrated into its tiles)."""

    id: int = Field(default=1, primary_key=True)
    size: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
