"""The state's identity: created once by ``civicdp init``, checked by every process that opens it.

A civicdp state is three things that must stay together:

* the **state database** (SQLite ``civicdp.db`` in ``CIVICDP_DATA_DIR``, or PostgreSQL at
  ``DATABASE_URL``; on SQLite the policy rules live beside it in ``policies.db``);
* the **key-hashing secret** (``server.secret``, or ``CIVICDP_SECRET_FILE``): the database
  holds only HMACs of API keys made with it;
* the **signing key** (``audit-signing.key``, or ``CIVICDP_AUDIT_KEY_FILE``) that signs
  the audit log's checkpoints and feed releases.

:func:`initialise` creates what is missing and records, in the single row of table
``civicdp_state``, SHA-256 fingerprints of the secret and of the signing key's public key.
:func:`check` is run by every server process and every state command before anything
else: a missing state is refused (naming ``CIVICDP_DATA_DIR``, ``DATABASE_URL`` and
``civicdp init``) and never created on the side; a secret or signing key whose
fingerprint is not the recorded one is refused with both fingerprints -- a second server
with files of its own would otherwise refuse every API key and sign with a key nobody
holds. A signing key replaced by ``civicdp audit rotate-key`` is accepted because the
rotation is in the audit log (entry ``audit.key_rotate``, old key -> new key); the
recorded fingerprint then follows it.

An older database (made before this row existed) is *adopted* by ``civicdp init``: its
files are recorded if they fit it (a database holding API keys needs its secret; one whose
log was signed needs a key the log knows).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel

from civicdp.audit.signing import KeyError_, SigningKey, VerifierKey
from civicdp.server.state import auth
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import ApiKey, AuditEntry, AuditKey, utcnow
from civicdp.server.state.settings import Settings

TABLE = "civicdp_state"


class StateIdentity(SQLModel, table=True):
    """The one row naming the secret and signing key this database belongs with."""

    __tablename__ = TABLE

    id: int = Field(default=1, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)
    secret_sha256: str = Field(max_length=64)
    signing_key_sha256: str = Field(max_length=64)
    signing_key: str = Field(max_length=300, description="The public (verifier) key, for messages and audits")
    updated_at: datetime | None = None


class StateError(ValueError):
    """The state cannot be used as configured; the message says what to do."""


class StateMissing(StateError):
    """There is no state where the settings point."""


class StateMismatch(StateError):
    """The files given do not belong with this database (or the database with them)."""


def key_fingerprint(key: VerifierKey) -> str:
    """SHA-256 (hex) of the Ed25519 public key."""
    return hashlib.sha256(key.public).hexdigest()


def _short(fingerprint: str) -> str:
    return f"SHA-256 {fingerprint[:16]}…"


def location(settings: Settings) -> str:
    """Where the settings point, in the words of the variables that set it."""
    data_dir = settings.data_dir.resolve()
    if settings.database_url:
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        url = make_url(settings.database_url).render_as_string(hide_password=True)
        return f"database {url} (DATABASE_URL), files in {data_dir} (CIVICDP_DATA_DIR)"
    return f"{data_dir} (CIVICDP_DATA_DIR; DATABASE_URL not set: SQLite in that folder)"


def _missing(settings: Settings, why: str) -> StateMissing:
    return StateMissing(
        f"no civicdp state at {location(settings)}: {why}. Create it once with `civicdp init` "
        "(see `civicdp init --help`), or point CIVICDP_DATA_DIR / DATABASE_URL at the existing state")


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0])


def exists(settings: Settings) -> bool:
    """Whether the state database file exists (always True for a server database: it is asked)."""
    path = sqlite_file(settings.state_url)
    return path is None or path.is_file()


def read(db: DbEngine) -> StateIdentity | None:
    """The identity row, or None if the database has no state yet (no table or no row)."""
    if not inspect(db).has_table(TABLE):
        return None
    with Session(reader(db)) as session:
        return session.get(StateIdentity, 1)


@dataclass(frozen=True)
class Opened:
    """What :func:`check` verified: the secret to hash keys with and the identity row."""

    secret: bytes
    identity: StateIdentity


# -- checking ---------------------------------------------------------------------------------


def check(settings: Settings, db: DbEngine) -> Opened:
    """Refuse unless ``db`` holds a state whose secret and signing key are the files the settings name."""
    identity = read(db)
    if identity is None:
        raise _missing(settings, "the database has no civicdp state yet")
    secret = _checked_secret(settings, identity)
    identity = _checked_signing_key(settings, db, identity)
    return Opened(secret, identity)


def _checked_secret(settings: Settings, identity: StateIdentity) -> bytes:
    path = settings.secret_path
    if not path.exists():
        raise StateMismatch(
            f"the state at {location(settings)} was initialised on {identity.created_at:%Y-%m-%d} with a "
            f"key-hashing secret ({_short(identity.secret_sha256)}), but there is no secret file at {path}. "
            "Copy server.secret from the data directory of the server that made this state (or set "
            "CIVICDP_SECRET_FILE to it); a new secret would make every existing API key fail")
    try:
        secret = auth.load_server_secret(path)
    except auth.ServerSecretError as exc:
        raise StateMismatch(str(exc)) from None
    found = auth.secret_fingerprint(secret)
    if found != identity.secret_sha256:
        raise StateMismatch(
            f"the key-hashing secret at {path} ({_short(found)}) is not the one the state at {location(settings)} "
            f"was initialised with ({_short(identity.secret_sha256)}): every API key would be refused. Use the "
            "server.secret of the server that made this state (CIVICDP_SECRET_FILE), or the database it belongs to")
    return secret


def _checked_signing_key(settings: Settings, db: DbEngine, identity: StateIdentity) -> StateIdentity:
    path = settings.audit_key_path
    if not path.exists():
        raise StateMismatch(
            f"the state at {location(settings)} signs its audit log with the key {identity.signing_key} "
            f"({_short(identity.signing_key_sha256)}), but there is no signing key file at {path}. Copy "
            "audit-signing.key from the data directory of the server that made this state (or set "
            "CIVICDP_AUDIT_KEY_FILE to it); a new key would be a second, unannounced log key")
    try:
        key = SigningKey.load(path).verifier
    except (KeyError_, OSError) as exc:
        raise StateMismatch(f"the signing key at {path} cannot be read: {exc}") from None
    found = key_fingerprint(key)
    if found == identity.signing_key_sha256:
        return identity
    if _rotated_to(db, identity.signing_key, key.encode()):
        with session_scope(db) as session:
            row = session.get(StateIdentity, 1)
            assert row is not None
            row.signing_key, row.signing_key_sha256, row.updated_at = key.encode(), found, utcnow()
            session.add(row)
            session.flush()
            session.expunge(row)
        return row
    raise StateMismatch(
        f"the signing key at {path} ({key.encode()}, {_short(found)}) is not the key of the state at "
        f"{location(settings)} ({identity.signing_key}, {_short(identity.signing_key_sha256)}), and the audit "
        "log records no rotation to it. Use the audit-signing.key of the server that made this state "
        "(CIVICDP_AUDIT_KEY_FILE); replace a key only with `civicdp audit rotate-key`")


def _rotated_to(db: DbEngine, recorded: str, current: str) -> bool:
    """Whether the audit log's rotations lead from the recorded key to ``current``."""
    with Session(reader(db)) as session:
        rows = session.execute(select(AuditEntry.entry_json).where(AuditEntry.action == "audit.key_rotate")
                               .order_by(AuditEntry.seq)).scalars().all()
    key = recorded
    for text in rows:
        try:
            detail = json.loads(text).get("detail") or {}
        except ValueError:
            continue
        if detail.get("old_key") == key and isinstance(detail.get("new_key"), str):
            key = detail["new_key"]
    return key == current


# -- creating ---------------------------------------------------------------------------------


#: What :func:`initialise` did: made a new state, recorded the files of a database made
#: before states had an identity, or found the state already there (and checked it).
CREATED, ADOPTED, EXISTING = "created", "adopted", "existing"


def initialise(settings: Settings, db: DbEngine) -> tuple[Opened, str]:
    """Record this state's secret and signing key, creating the files if this is a new state.

    The tables must exist already. Returns what :func:`check` returns and what was done
    (:data:`CREATED`, :data:`ADOPTED` or :data:`EXISTING`). Refuses, like :func:`check`,
    files that do not belong with the database.
    """
    identity = read(db)
    if identity is not None:
        return check(settings, db), EXISTING
    with Session(reader(db)) as session:
        has_keys = session.execute(select(func.count()).select_from(ApiKey)).scalar_one() > 0
        log_keys = list(session.execute(select(AuditKey.verifier)).scalars())
        entries = session.execute(select(func.count()).select_from(AuditEntry)).scalar_one()
    adopted = has_keys or bool(log_keys) or entries > 0
    secret = _secret_for_new_state(settings, has_keys)
    key = _key_for_new_state(settings, log_keys)
    row = StateIdentity(secret_sha256=auth.secret_fingerprint(secret), signing_key_sha256=key_fingerprint(key),
                        signing_key=key.encode())
    try:
        with session_scope(db) as session:
            session.add(row)
    except IntegrityError:
        return check(settings, db), EXISTING  # another process initialised it first: ours must match
    return check(settings, db), ADOPTED if adopted else CREATED


def _secret_for_new_state(settings: Settings, has_keys: bool) -> bytes:
    path = settings.secret_path
    if path.exists():
        try:
            return auth.load_server_secret(path)
        except auth.ServerSecretError as exc:
            raise StateMismatch(str(exc)) from None
    if has_keys:
        raise StateMismatch(
            f"the database at {location(settings)} holds API keys but there is no key-hashing secret at {path}: "
            "they were hashed with a secret that is not here. Copy its server.secret (or set CIVICDP_SECRET_FILE)")
    return auth.load_or_create_server_secret(path)


def _key_for_new_state(settings: Settings, log_keys: list[str]) -> VerifierKey:
    path = settings.audit_key_path
    if path.exists():
        try:
            key = SigningKey.load(path).verifier
        except (KeyError_, OSError) as exc:
            raise StateMismatch(f"the signing key at {path} cannot be read: {exc}") from None
        if log_keys and key.encode() not in log_keys:
            raise StateMismatch(
                f"the signing key at {path} ({key.encode()}) never signed the audit log of the database at "
                f"{location(settings)}, which knows {len(log_keys)} other key(s). Use the server's own "
                "audit-signing.key (CIVICDP_AUDIT_KEY_FILE)")
        return key
    if log_keys:
        raise StateMismatch(
            f"the audit log of the database at {location(settings)} is signed with {log_keys[-1]}, but there is "
            f"no signing key at {path}. Copy the server's audit-signing.key (or set CIVICDP_AUDIT_KEY_FILE)")
    return _create_signing_key(path, settings.audit_origin)


def _create_signing_key(path: Path, origin: str) -> VerifierKey:
    """A new signing key at ``path``, never replacing one another process created meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    SigningKey.generate(origin).save(temporary)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process won the race: use its key
    finally:
        temporary.unlink(missing_ok=True)
    return SigningKey.load(path).verifier
