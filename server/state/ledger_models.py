"""What the ledger stores beside each charge: the cap it was checked against.

A budget row holds only its current cap (a steward may raise or lower it, and
:func:`civicdp.server.state.budget_scopes.apply_cap` puts the change into force on open rows),
so a charge's history would show today's cap. :func:`civicdp.server.state.ledger.charge`
records, with each :class:`~civicdp.server.state.models.LedgerEntry`, the cap of its row as
the conditional ``UPDATE`` saw it. The record is a table of its own, not a column of
``ledgerentry``: ``init_db`` creates the tables a newer civicdp adds to an existing database
at every start and alters no table, so an existing database keeps working, and charges made
before this table existed simply have no row here (:mod:`civicdp.server.state.ledger_history`
then reads the cap their audit entry states, if it states one).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Integer
from sqlmodel import Field, SQLModel


class LedgerEntryCap(SQLModel, table=True):
    """The cap in force on a charge's budget row when it was charged, in the ledger's unit."""

    ledger_entry_id: int = Field(sa_column=Column(Integer, ForeignKey("ledgerentry.id", ondelete="CASCADE"),
                                                  primary_key=True, autoincrement=False))
    cap_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
