"""Web console sessions: a browser's sign-in, stored server-side so every worker sees it.

Only the SHA-256 of the session id is stored: a copy of the database does not let anyone
present a session (as API keys are stored only as keyed hashes). The session names the key
it was opened with, so revoking that key, its expiry or a disabled account ends the session
at the next request.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from civicdp.server.state.models import utcnow


class ConsoleSession(SQLModel, table=True):
    """One signed-in browser: whose, through which key, until when, and its CSRF token."""

    id_hash: str = Field(primary_key=True, max_length=64)  # SHA-256 hex of the cookie's random id
    account_id: int = Field(foreign_key="account.id", index=True)
    key_id: int = Field(foreign_key="apikey.id", index=True)
    csrf: str = Field(max_length=64)  # sent in every form; compared in constant time
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    ended_at: datetime | None = None  # signed out
