"""Console sign-in: an API key posted once, exchanged for a server-side session.

The browser never keeps the key: the sign-in form posts it, the server verifies it exactly
as a ``Bearer`` header is verified (:func:`civicdp.server.state.auth.verify_key`, the same
401 for every cause, ``auth.failed`` in the log) and answers with a cookie holding a random
256-bit session id. The database keeps only the id's SHA-256, the account, the key's row
(so revoking the key, its expiry or a disabled account ends the session at the next
request), a CSRF token and the session's end. Signing in and out are audit entries
(``console.sign_in``, ``console.sign_out``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete
from sqlmodel import Session, select

from civicdp.server.auditlog.append import record
from civicdp.server.auditlog.slots import current_slot
from civicdp.server.state import auth
from civicdp.server.state.caller import Caller
from civicdp.server.state.console_models import ConsoleSession
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import Account, ApiKey
from civicdp.server.services.app_state import AppState

COOKIE = "civicdp_console"
#: A session ends this long after sign-in, whatever happens (sign in again to go on).
LIFETIME = timedelta(hours=8)


@dataclass(frozen=True)
class Signed:
    """A signed-in browser: who, and the CSRF token its forms must carry."""

    caller: Caller
    csrf: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def sign_in(state: AppState, presented: str, now: datetime) -> tuple[str, Signed]:
    """A new session for the holder of ``presented`` (an API key): the cookie's token and the session.

    Raises :class:`civicdp.server.state.auth.AuthenticationFailed` (recorded as ``auth.failed``)
    when the key does not authenticate; the caller answers one 401 whatever the reason.
    """
    try:
        with Session(reader(state.db)) as session:
            account = auth.verify_key(session, presented, state.secret, now)
            prefix = auth.parse_key(presented)[0]
            key = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).one()
    except auth.AuthenticationFailed as failure:
        with session_scope(state.db) as session:
            record(session, None, "auth.failed", "console", "unauthenticated", reason=failure.reason,
                   key_prefix=failure.prefix)
        raise
    caller = Caller(account_id=account.id or 0, name=account.name, agency=account.agency)
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    expires = now + LIFETIME
    if key.expires_at is not None:
        expires = min(expires, _aware(key.expires_at))  # a session outlives not its key
    slot = current_slot()
    if slot is not None:  # the entry names the account and its roles, as an API request's does
        slot.caller = caller
        slot.roles = [f"{role}@{agency}" for role, agency in state.policies.roles_of(caller.subject)]
    with session_scope(state.db) as session:
        # Sessions that can no longer be used are dropped here, so the table holds only live ones.
        session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))  # type: ignore[arg-type]
        session.add(ConsoleSession(id_hash=_digest(token), account_id=caller.account_id, key_id=key.id or 0,
                                   csrf=csrf, created_at=now, expires_at=expires))
        record(session, caller, "console.sign_in", "console", key_prefix=key.prefix, expires_at=expires)
    return token, Signed(caller, csrf)


def current(state: AppState, token: str | None, now: datetime) -> Signed | None:
    """The live session a cookie's token names, or None (unknown, ended, expired, key revoked...)."""
    if not token or len(token) > 100:
        return None
    with Session(reader(state.db)) as session:
        row = session.get(ConsoleSession, _digest(token))
        if row is None or row.ended_at is not None or now >= _aware(row.expires_at):
            return None
        key = session.get(ApiKey, row.key_id)
        account = session.get(Account, row.account_id)
        if key is None or key.revoked_at is not None or account is None or account.disabled:
            return None
        if key.expires_at is not None and now >= _aware(key.expires_at):
            return None
        return Signed(Caller(account_id=account.id or 0, name=account.name, agency=account.agency), row.csrf)


def sign_out(state: AppState, token: str, signed: Signed, now: datetime) -> None:
    """End the session now (it cannot be used again, even if the cookie was copied)."""
    with session_scope(state.db) as session:
        row = session.get(ConsoleSession, _digest(token))
        if row is not None and row.ended_at is None:
            row.ended_at = now
            session.add(row)
            record(session, signed.caller, "console.sign_out", "console")


def csrf_matches(signed: Signed, sent: str | None) -> bool:
    """Does a form's token match its session's? (constant time)"""
    return bool(sent) and hmac.compare_digest(signed.csrf.encode(), (sent or "").encode("utf-8", "replace"))
