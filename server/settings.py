"""One settings object for civicdp, read from ``CIVICDP_``-prefixed environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Operator configuration; every field can be set as ``CIVICDP_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CIVICDP_", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Where datasets and server state live")
    max_epsilon: float = Field(default=10.0, gt=0, description="Largest privacy loss one query may ask")
    auto_fraction: float = Field(default=0.1, gt=0, lt=1,
                                 description="Share of a query's loss spent choosing its contribution bound")
