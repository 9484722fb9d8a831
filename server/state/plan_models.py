"""Stored workload plans (issue 18): the plan document an analyst made, kept so it can be run again.

A plan is stored as its validated document, not as mechanisms: each run plans it afresh
against the dataset's version served then (planning is a pure function of the document
and that version's public metadata), so a stored plan can be rerun on the next version.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from civicdp.server.state.models import utcnow


class WorkloadPlanRow(SQLModel, table=True):
    """A stored plan: who made it, for which dataset, and its canonical document."""

    __tablename__ = "workload_plan"
    id: str = Field(primary_key=True, max_length=40)
    dataset: str = Field(index=True, max_length=100)
    account_id: int = Field(foreign_key="account.id", index=True)
    agency: str = Field(max_length=100)
    spec_json: str = Field(sa_column=Column(Text, nullable=False))
    spec_hash: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
