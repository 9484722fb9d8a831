"""One settings object for civicdp, read from ``CIVICDP_``-prefixed environment variables.

``DATABASE_URL`` (no prefix, the common convention) puts the server state in
PostgreSQL instead of the embedded SQLite file.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Operator configuration; every field can be set as ``CIVICDP_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CIVICDP_", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Where datasets and server state live")
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "CIVICDP_DATABASE_URL"),
        description="SQLAlchemy URL of the state database (default: SQLite in data_dir)")
    max_epsilon: float = Field(default=10.0, gt=0, description="Largest privacy loss one query may ask")
    auto_fraction: float = Field(default=0.1, gt=0, lt=1,
                                 description="Share of a query's loss spent choosing its contribution bound")
    host: str = Field(default="127.0.0.1", description="Address the server listens on")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the server listens on")
    secret_file: Path | None = Field(
        default=None, description="File holding the server's key-hashing secret (default: data_dir/server.secret)")
    audit_key_file: Path | None = Field(
        default=None, description="The server's Ed25519 signing key (default: data_dir/audit-signing.key)")
    audit_origin: str = Field(default="civicdp.local/audit", pattern=r"^[^\s+]+$",
                              description="Name of the log in its checkpoints and of the signing key")
    prepared_dir: Path | None = Field(
        default=None,
        description="Where each registered version's prepared tables (a ranked copy of its data, made at "
                    "registration) live; the server's state, never the steward's data folder, which may be "
                    "read-only (default: data_dir/prepared). Every process of one state must see the same folder")
    prepared_keep_seconds: float = Field(
        default=60.0, ge=0, le=86_400,
        description="How long the prepared files of a version replaced by a newer one are kept for queries "
                    "already planned on it, before they are removed")
    checkpoint_every_entries: int = Field(default=1000, ge=1, description="Sign a checkpoint after this many entries")
    checkpoint_every_minutes: float = Field(default=5.0, gt=0, description="... or after this many minutes")
    analyst_month_epsilon: float = Field(default=1.0, gt=0, description="Default analyst x dataset x month cap")
    agency_month_epsilon: float = Field(default=2.0, gt=0, description="Default agency x dataset x month cap")
    dataset_month_epsilon: float = Field(default=3.0, gt=0, description="Default dataset x month cap")
    dataset_lifetime_epsilon: float = Field(default=4.0, gt=0, description="Default dataset lifetime cap")
    computation_timeout_minutes: float = Field(
        default=60.0, gt=0, le=10080,
        description="A charged query still computing after this long is taken as abandoned (its charge stays)")
    query_wait_seconds: float = Field(
        default=30.0, gt=0, le=3600,
        description="How long a query waits for an identical one being computed before answering 503 (retry later)")
    shared_release_agencies: list[str] = Field(
        default_factory=list,
        description="Agencies whose releases' queries every analyst may read (default: each agency its own)")
    feeds_scheduler: bool = Field(default=True, description="Produce feed releases on schedule in this process")
    feeds_check_seconds: float = Field(default=60.0, ge=0.1, le=3600,
                                       description="How often the scheduler looks for due feed releases")
    max_request_bytes: int = Field(
        default=1024 * 1024, ge=1024, le=1024 ** 3,
        description="Largest request body accepted (bytes), counted as it arrives, before any parsing or "
                    "authentication; larger bodies get 413")
    max_batch_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, le=16 * 1024 ** 3,
        description="Largest Parquet body of POST /v1/monitors/{name}/batches (bytes); read only after the "
                    "caller's key has been verified (anonymous bodies stop at max_request_bytes)")
    max_json_depth: int = Field(default=32, ge=2, le=256,
                                description="Deepest nesting of arrays and objects accepted in a JSON body")
    max_json_items: int = Field(default=10_000, ge=10, le=1_000_000,
                                description="Most members of any one JSON array or object in a body")
    anonymous_burst: int = Field(
        default=20, ge=1, le=100_000,
        description="Requests without a valid key a client address may make at once before the rate limit")
    anonymous_per_minute: float = Field(
        default=30.0, gt=0, le=1_000_000,
        description="... and how many more per minute after that (token-bucket refill)")
    anonymous_summary_seconds: float = Field(
        default=60.0, ge=1, le=86_400,
        description="Requests refused by the rate limit are recorded as one audit entry per client per window")

    init_state: bool = Field(
        default=False,
        description="Create the state (database, key-hashing secret, signing key) at start-up if this database has "
                    "none yet, as `civicdp init` does (tests and the demo); otherwise a process refuses to start on "
                    "a missing state")
    policy_refresh_seconds: float = Field(
        default=0.0, ge=0, le=1,
        description="Longest time a process decides on its loaded policy rules before checking the stored policy "
                    "version (one indexed read; 0: before every decision). Changes made by any process, the "
                    "command line included, are in force everywhere after at most this long")

    profile_file: Path | None = Field(
        default=None, description="When the server stops, each process writes the time per stage of its lean "
                                  "cached path here as JSON, its process id added to the name (the W3 benchmark "
                                  "reads it); default: not written")

    @property
    def state_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'civicdp.db').resolve()}"

    @property
    def audit_key_path(self) -> Path:
        return self.audit_key_file or self.data_dir / "audit-signing.key"

    @property
    def secret_path(self) -> Path:
        return self.secret_file or self.data_dir / "server.secret"

    @property
    def prepared_path(self) -> Path:
        return (self.prepared_dir or self.data_dir / "prepared").resolve()
