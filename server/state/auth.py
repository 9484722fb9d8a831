"""API keys: issued once, stored only as a keyed hash, checked in constant time.

A key reads ``cdp_<prefix>_<secret>``. The 12-character prefix is a public lookup
handle (it may appear in logs and the audit trail, and lets a steward revoke a key
without knowing it); the 256-bit secret is shown to its owner once and never
stored. The database keeps ``HMAC-SHA256(server_secret, secret)``: a copy of the
database alone (a backup, a replica, an SQL injection) does not let anyone present a
key, and because the server secret lives in a separate 0600 file, it cannot be
brute-forced offline either. Verification compares digests with
:func:`hmac.compare_digest` and computes the HMAC even for unknown prefixes, so
response time does not tell an attacker which prefixes exist, and a key's state
(expired, revoked, disabled account) is only revealed to someone holding its
secret. Every failure raises :class:`AuthenticationFailed` with a precise
``reason`` for the audit log; the HTTP layer answers all of them with the same 401.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import string
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from sqlmodel import Session, select

from civicdp.server.state.models import Account, ApiKey

KEY_SCHEME = "cdp"
PREFIX_LENGTH = 12
SECRET_BYTES = 32  # 256 bits
SERVER_SECRET_BYTES = 32
#: Letters and digits only, so the prefix never contains the "_" separator.
_PREFIX_ALPHABET = string.ascii_letters + string.digits
#: Matched with fullmatch(): "$" would also accept a trailing newline.
_KEY_PATTERN = re.compile(
    rf"{KEY_SCHEME}_(?P<prefix>[A-Za-z0-9]{{{PREFIX_LENGTH}}})_(?P<secret>[A-Za-z0-9_-]{{43}})")
_MAX_PRESENTED = 200  # refuse before any work on absurdly long input
#: Compared against when the prefix is unknown, so that path costs the same HMAC.
_DUMMY_HASH = "0" * 64

#: The reasons :class:`AuthenticationFailed` carries.
REASONS = ("missing", "malformed", "unknown_prefix", "wrong_secret", "expired", "revoked",
           "account_disabled")


class AuthenticationFailed(Exception):
    """The presented API key does not authenticate anyone.

    ``reason`` (one of :data:`REASONS`) and ``prefix`` are for the audit log only;
    clients must get one indistinguishable 401 whatever the reason.
    """

    def __init__(self, reason: str, prefix: str | None = None) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.prefix = prefix
        super().__init__(f"authentication failed: {reason}")


class ServerSecretError(RuntimeError):
    """The server secret file is unusable; the server must not start."""


def _hash(server_secret: bytes, secret: str) -> str:
    return hmac.new(server_secret, secret.encode("ascii"), hashlib.sha256).hexdigest()


def _aware(value: datetime, name: str) -> datetime:
    if value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return value.astimezone(timezone.utc)


def _check_server_secret(server_secret: bytes) -> None:
    if not isinstance(server_secret, bytes) or len(server_secret) < SERVER_SECRET_BYTES:
        raise ServerSecretError(f"the server secret must be at least {SERVER_SECRET_BYTES} bytes")


def create_key(session: Session, account_id: int, secret_key: bytes,
               expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """A new key for ``account_id``: the stored row and the plaintext, shown once.

    ``secret_key`` is the server secret (see :func:`load_or_create_server_secret`).
    The row is added and flushed, not committed.
    """
    _check_server_secret(secret_key)
    if session.get(Account, account_id) is None:
        raise LookupError(f"no account with id {account_id}")
    if expires_at is not None:
        expires_at = _aware(expires_at, "expires_at")
    # The prefix (62**12, about 71 bits) only has to be unique, and the unique index
    # enforces that; the secret is what has to be unguessable.
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    secret = secrets.token_urlsafe(SECRET_BYTES)
    key = ApiKey(account_id=account_id, prefix=prefix, secret_hash=_hash(secret_key, secret),
                 expires_at=expires_at)
    session.add(key)
    session.flush()
    return key, f"{KEY_SCHEME}_{prefix}_{secret}"


def parse_key(presented: object) -> tuple[str, str]:
    """``(prefix, secret)`` of a presented key, or :class:`AuthenticationFailed`."""
    if presented is None or presented == "":
        raise AuthenticationFailed("missing")
    if not isinstance(presented, str) or len(presented) > _MAX_PRESENTED:
        raise AuthenticationFailed("malformed")
    match = _KEY_PATTERN.fullmatch(presented)
    if not match:
        raise AuthenticationFailed("malformed")
    return match["prefix"], match["secret"]


def presented_key(authorization: Sequence[str]) -> str:
    """The key sent in a request's ``Authorization`` header values (``""`` if there is none).

    Exactly one header with the ``Bearer`` scheme (in any case) is accepted. Two or more
    headers are refused as malformed rather than reading the first: proxies and
    frameworks disagree on which of several wins, so a request that carries two keys
    has no single identity.
    """
    if not authorization:
        return ""
    if len(authorization) > 1:
        raise AuthenticationFailed("malformed")
    scheme, _, credentials = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise AuthenticationFailed("malformed")
    return credentials.strip()


def verify_key(session: Session, presented: str | None, server_secret: bytes,
               now: datetime) -> Account:
    """The account a presented key belongs to, or :class:`AuthenticationFailed`."""
    _check_server_secret(server_secret)
    now = _aware(now, "now")
    prefix, secret = parse_key(presented)
    key = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    # Always compute the HMAC and compare, also for an unknown prefix, so both paths do
    # the same work; compare_digest takes time independent of where digests differ.
    computed = _hash(server_secret, secret)
    matches = hmac.compare_digest(computed, key.secret_hash if key else _DUMMY_HASH)
    if key is None:
        raise AuthenticationFailed("unknown_prefix", prefix)
    if not matches:
        raise AuthenticationFailed("wrong_secret", prefix)
    # Only a caller holding the real secret learns the key's state.
    if key.revoked_at is not None:
        raise AuthenticationFailed("revoked", prefix)
    if key.expires_at is not None and now >= _aware(key.expires_at, "expires_at"):
        raise AuthenticationFailed("expired", prefix)
    account = session.get(Account, key.account_id)
    if account is None or account.disabled:
        raise AuthenticationFailed("account_disabled", prefix)
    return account


def revoke_key(session: Session, prefix: str, now: datetime) -> ApiKey:
    """Revoke the key with ``prefix`` at ``now`` (idempotent: the first time is kept)."""
    now = _aware(now, "now")
    key = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if key is None:
        raise LookupError(f"no API key with prefix {prefix!r}")
    if key.revoked_at is None:
        key.revoked_at = now
        session.add(key)
        session.flush()
    return key


def secret_fingerprint(server_secret: bytes) -> str:
    """A public fingerprint of the server secret (SHA-256, hex), recorded in the state database.

    It tells which secret the database's key hashes were made with, so a process given
    another secret file refuses to start instead of refusing every key. Domain-separated,
    and of a 256-bit random value: it reveals nothing usable about the secret.
    """
    _check_server_secret(server_secret)
    return hashlib.sha256(b"civicdp server secret fingerprint\x00" + server_secret).hexdigest()


def load_or_create_server_secret(path: Path | str) -> bytes:
    """The server's 32-byte key-hashing secret, created (mode 0600) if the file does not exist.

    Refuses, with :class:`ServerSecretError`, a file readable or writable by group or
    others (anyone who can read it and the database can test guesses offline), or one
    of the wrong size. Only ``civicdp init`` creates the secret; starting processes use
    :func:`load_server_secret`.
    """
    path = Path(path)
    if not path.exists():
        _create_secret_file(path)
    return load_server_secret(path)


def load_server_secret(path: Path | str) -> bytes:
    """The server's existing key-hashing secret; :class:`ServerSecretError` if it is missing or unusable."""
    path = Path(path)
    if not path.exists():
        raise ServerSecretError(f"there is no server secret at {path}")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ServerSecretError(f"server secret {path} is not a regular file")
    if os.name == "posix" and info.st_mode & 0o077:
        raise ServerSecretError(
            f"server secret {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); restrict it with: chmod 600 {path}")
    secret = path.read_bytes()
    if len(secret) != SERVER_SECRET_BYTES:
        raise ServerSecretError(
            f"server secret {path} holds {len(secret)} bytes, expected {SERVER_SECRET_BYTES}")
    return secret


def _create_secret_file(path: Path) -> None:
    """Write a fresh secret to ``path`` atomically, never replacing an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Write a private temporary file (0600 from the first byte, so the secret is never
    # readable by others even briefly), then hard-link it into place: link() fails if
    # another process created the file meanwhile, and a reader never sees it half written.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(SERVER_SECRET_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process won the race; use its secret
    finally:
        temporary.unlink(missing_ok=True)
