"""API keys: round trip, every way to fail (each with its own reason), hash-only storage,
and the server secret file's permissions."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel

import civicdp.server.state.auth
from civicdp.server.state.auth import (
    REASONS, AuthenticationFailed, ServerSecretError, create_key, load_or_create_server_secret, revoke_key,
    verify_key,
)
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import Account, ApiKey

SERVER_SECRET = bytes(range(32))
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def account_id(sqlite_engine: Engine) -> int:
    with session_scope(sqlite_engine) as session:
        account = Account(name="ana", agency="health")
        session.add(account)
        session.flush()
        return account.id  # type: ignore[return-value]


def _new_key(engine: Engine, account_id: int, expires_at: datetime | None = None) -> str:
    with session_scope(engine) as session:
        return create_key(session, account_id, SERVER_SECRET, expires_at)[1]


def _verify(engine: Engine, presented: object, now: datetime = NOW,
            server_secret: bytes = SERVER_SECRET) -> Account:
    with Session(engine) as session:
        return verify_key(session, presented, server_secret, now)  # type: ignore[arg-type]


# -- round trip ---------------------------------------------------------------------------


def test_a_created_key_authenticates_its_account(db_engine: Engine) -> None:
    """cdp_<12-char prefix>_<43-char secret>; the row keeps the prefix and HMAC-SHA256 of the secret."""
    with session_scope(db_engine) as session:
        account = Account(name="ana", agency="health")
        session.add(account)
        session.flush()
        key, plaintext = create_key(session, account.id, SERVER_SECRET)  # type: ignore[arg-type]
        account_id, prefix, stored = account.id, key.prefix, key.secret_hash
    match = re.fullmatch(r"cdp_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})", plaintext)
    assert match and match[1] == prefix
    assert stored == hmac.new(SERVER_SECRET, match[2].encode(), hashlib.sha256).hexdigest()
    assert _verify(db_engine, plaintext).id == account_id


def test_keys_are_unique(sqlite_engine: Engine, account_id: int) -> None:
    keys = {_new_key(sqlite_engine, account_id) for _ in range(20)}
    assert len(keys) == len({k.split("_")[1] for k in keys}) == 20


# -- failures -----------------------------------------------------------------------------


def _flip_last(text: str) -> str:
    return text[:-1] + ("A" if text[-1] != "A" else "B")


@pytest.mark.parametrize("presented", [
    lambda key: None,
    lambda key: "",
], ids=["none", "empty"])
def test_a_missing_key_is_refused(sqlite_engine: Engine, account_id: int, presented) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuthenticationFailed, match="missing") as failed:
        _verify(sqlite_engine, presented(_new_key(sqlite_engine, account_id)))
    assert failed.value.reason == "missing"


@pytest.mark.parametrize("presented", [
    lambda key: f"Bearer {key}",
    lambda key: key.replace("cdp_", "xyz_", 1),
    lambda key: key[:-1],
    lambda key: key + "A",
    lambda key: key[:5] + "_" + key[6:],  # "_" inside the prefix
    lambda key: key.replace("_", "-"),
    lambda key: key + "\n",
    lambda key: key[:-1] + "é",
    lambda key: "cdp_" + "A" * 5000,
    lambda key: key.encode(),
    lambda key: 12345,
], ids=["bearer-prefix", "wrong-scheme", "short-secret", "long-secret", "underscore-in-prefix",
        "no-separators", "trailing-newline", "non-ascii", "very-long", "bytes", "number"])
def test_a_malformed_key_is_refused(sqlite_engine: Engine, account_id: int, presented) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuthenticationFailed, match="malformed") as failed:
        _verify(sqlite_engine, presented(_new_key(sqlite_engine, account_id)))
    assert failed.value.reason == "malformed"


@pytest.mark.parametrize("reason, setup", [
    ("unknown_prefix", lambda engine, key: "cdp_" + "Z" * 12 + key[16:]),
    ("wrong_secret", lambda engine, key: _flip_last(key)),
    ("expired", lambda engine, key: _expire(engine, key, NOW)),
    ("expired", lambda engine, key: _expire(engine, key, NOW - timedelta(days=1))),
    ("revoked", lambda engine, key: _revoke(engine, key)),
    ("account_disabled", lambda engine, key: _disable(engine, key)),
], ids=["unknown-prefix", "wrong-secret", "expires-now", "expired-yesterday", "revoked", "disabled-account"])
def test_each_failure_has_its_own_reason(sqlite_engine: Engine, account_id: int, reason: str, setup) -> None:  # type: ignore[no-untyped-def]
    """Distinct reasons for the audit log; the HTTP layer answers all of them with one 401."""
    presented = setup(sqlite_engine, _new_key(sqlite_engine, account_id))
    with pytest.raises(AuthenticationFailed, match=reason) as failed:
        _verify(sqlite_engine, presented)
    assert (failed.value.reason, failed.value.prefix) == (reason, _prefix(presented))


def _prefix(key: str) -> str:
    return key[4:16]


def _expire(engine: Engine, key: str, when: datetime) -> str:
    with session_scope(engine) as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == _prefix(key)).values(expires_at=when))
    return key


def _revoke(engine: Engine, key: str) -> str:
    with session_scope(engine) as session:
        revoke_key(session, _prefix(key), NOW - timedelta(hours=1))
    return key


def _disable(engine: Engine, key: str) -> str:
    with session_scope(engine) as session:
        session.execute(update(Account).values(disabled=True))
    return key


def test_a_future_expiry_still_works(sqlite_engine: Engine, account_id: int) -> None:
    key = _new_key(sqlite_engine, account_id, expires_at=NOW + timedelta(seconds=1))
    assert _verify(sqlite_engine, key).name == "ana"
    with pytest.raises(AuthenticationFailed, match="expired"):
        _verify(sqlite_engine, key, now=NOW + timedelta(seconds=1))


def test_the_state_of_a_key_is_revealed_only_to_its_secret_holder(sqlite_engine: Engine, account_id: int) -> None:
    """A guesser with a revoked key's prefix learns only 'wrong secret', not that it was revoked."""
    key = _revoke(sqlite_engine, _new_key(sqlite_engine, account_id))
    with pytest.raises(AuthenticationFailed, match="wrong_secret"):
        _verify(sqlite_engine, _flip_last(key))


def test_another_server_secret_does_not_verify(sqlite_engine: Engine, account_id: int) -> None:
    """A stolen database without the server's secret file cannot check key guesses."""
    key = _new_key(sqlite_engine, account_id)
    with pytest.raises(AuthenticationFailed, match="wrong_secret"):
        _verify(sqlite_engine, key, server_secret=bytes(32))


def test_unknown_prefixes_cost_the_same_hmac_as_known_ones(
        sqlite_engine: Engine, account_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HMAC and the constant-time comparison run whether or not the prefix exists."""
    calls: list[str] = []
    real_hash, real_compare = civicdp.server.state.auth._hash, hmac.compare_digest
    monkeypatch.setattr(civicdp.server.state.auth, "_hash", lambda s, secret: calls.append("hash") or real_hash(s, secret))
    monkeypatch.setattr(civicdp.server.state.auth.hmac, "compare_digest",
                        lambda a, b: calls.append("compare") or real_compare(a, b))
    key = _new_key(sqlite_engine, account_id)
    calls.clear()
    _verify(sqlite_engine, key)
    known = list(calls)
    calls.clear()
    with pytest.raises(AuthenticationFailed, match="unknown_prefix"):
        _verify(sqlite_engine, "cdp_" + "Z" * 12 + key[16:])
    assert calls == known == ["hash", "compare"]


def test_revocation_is_idempotent_and_unknown_prefixes_are_reported(sqlite_engine: Engine, account_id: int) -> None:
    key = _new_key(sqlite_engine, account_id)
    with session_scope(sqlite_engine) as session:
        first = revoke_key(session, _prefix(key), NOW).revoked_at
        assert revoke_key(session, _prefix(key), NOW + timedelta(days=1)).revoked_at == first == NOW
        with pytest.raises(LookupError, match="no API key"):
            revoke_key(session, "Z" * 12, NOW)


@pytest.mark.parametrize("call, error, message", [
    (lambda s, a: create_key(s, 999, SERVER_SECRET), LookupError, "no account"),
    (lambda s, a: create_key(s, a, b"short"), ServerSecretError, "at least 32 bytes"),
    (lambda s, a: create_key(s, a, SERVER_SECRET, datetime(2027, 1, 1)), ValueError, "timezone-aware"),
    (lambda s, a: verify_key(s, "x", SERVER_SECRET, datetime(2027, 1, 1)), ValueError, "timezone-aware"),
], ids=["unknown-account", "short-server-secret", "naive-expiry", "naive-now"])
def test_programming_errors_are_not_authentication_failures(
        sqlite_engine: Engine, account_id: int, call, error: type[Exception], message: str) -> None:  # type: ignore[no-untyped-def]
    with Session(sqlite_engine) as session, pytest.raises(error, match=message):
        call(session, account_id)


def test_authentication_failed_takes_only_known_reasons() -> None:
    assert len(set(REASONS)) == 7
    with pytest.raises(AssertionError):
        AuthenticationFailed("because")


# -- only the hash is stored ---------------------------------------------------------------


def _every_stored_value(engine: Engine) -> str:
    with Session(engine) as session:
        return repr([session.execute(select(table)).all() for table in SQLModel.metadata.sorted_tables])


def test_only_the_hash_is_stored(db_engine: Engine) -> None:
    """Neither the plaintext key nor its secret appears in any table."""
    with session_scope(db_engine) as session:
        account = Account(name="ana", agency="health")
        session.add(account)
        session.flush()
        plaintext = create_key(session, account.id, SERVER_SECRET)[1]  # type: ignore[arg-type]
    secret = plaintext.split("_", 2)[2]
    stored = _every_stored_value(db_engine)
    assert plaintext[4:16] in stored  # the scan does see the key's row
    assert secret not in stored and plaintext not in stored


def test_the_secret_is_not_in_the_sqlite_files(sqlite_engine: Engine, account_id: int, sqlite_url: str) -> None:
    """Not in the database file, its WAL, or a full SQL dump: only the hash was ever written."""
    plaintext = _new_key(sqlite_engine, account_id)
    secret = plaintext.split("_", 2)[2]
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    assert plaintext[4:16].encode() in raw
    assert secret.encode() not in raw
    connection = sqlite3.connect(path)
    try:
        assert secret not in "\n".join(connection.iterdump())
    finally:
        connection.close()


# -- the server secret file ----------------------------------------------------------------


@pytest.fixture
def secret_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state" / "nested" / "server.secret"


def test_the_server_secret_is_created_private_and_reused(secret_path: Path) -> None:
    """32 random bytes, mode 0600, parent directories created; the same secret on every start."""
    secret = load_or_create_server_secret(secret_path)
    assert len(secret) == 32
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert load_or_create_server_secret(secret_path) == secret
    assert load_or_create_server_secret(secret_path.parent.parent / "other.secret") != secret
    assert [p.name for p in secret_path.parent.iterdir()] == ["server.secret"]  # no temporary left


def test_concurrent_first_starts_agree_on_one_secret(secret_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        secrets_seen = set(pool.map(lambda _: load_or_create_server_secret(secret_path), range(16)))
    assert len(secrets_seen) == 1


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o666], ids=["g-r", "o-r", "g-rw", "go-r", "go-rw"])
def test_a_secret_file_open_to_others_is_refused(secret_path: Path, mode: int) -> None:
    """Anyone who can read it and the database could test key guesses offline."""
    load_or_create_server_secret(secret_path)
    secret_path.chmod(mode)
    with pytest.raises(ServerSecretError, match=f"accessible by group or others .*{mode:04o}.*chmod 600"):
        load_or_create_server_secret(secret_path)


@pytest.mark.parametrize("content", [b"", b"x" * 31, b"x" * 33], ids=["empty", "short", "long"])
def test_a_secret_file_of_the_wrong_size_is_refused(secret_path: Path, content: bytes) -> None:
    secret_path.parent.mkdir(parents=True)
    secret_path.write_bytes(content)
    secret_path.chmod(0o600)
    with pytest.raises(ServerSecretError, match=f"holds {len(content)} bytes, expected 32"):
        load_or_create_server_secret(secret_path)


def test_a_directory_is_not_a_secret_file(secret_path: Path) -> None:
    secret_path.mkdir(parents=True)
    with pytest.raises(ServerSecretError, match="not a regular file"):
        load_or_create_server_secret(secret_path)
