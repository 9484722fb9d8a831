"""Start-up: the state database, the policy store, the query service, the server secret.

Nothing here creates a state on the side: :func:`build_state` opens an existing state and
checks that its files belong with its database (:mod:`civicdp.server.state.identity`), and refuses
otherwise. Only :func:`init_state` (``civicdp init``, or ``build_state(init=True)`` for tests
and the demo, also ``CIVICDP_INIT_STATE``) creates one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.exc import OperationalError

from civicdp.policies.defaults import default_rules
from civicdp.policies.enforcer import PolicyStore
from civicdp.policies.storage import VersionedAdapter
from civicdp.queries.context import EngineLimits
from civicdp.queries.engine import Engine
from civicdp.queries.polars_backend import PolarsBackend
from civicdp.server.state import identity
from civicdp.server.auditlog.alarms import AuditLogFailed
from civicdp.server.auditlog.append import ensure_head
from civicdp.server.auditlog.budgets import install_spend_check
from civicdp.server.auditlog.log import AuditLog
from civicdp.server.auditlog.reconcile import check_state as reconcile_state
from civicdp.server.state.db import init_db, make_engine, reader
from civicdp.server.services.app_state import AppState
from civicdp.server.state.ledger import CapDefaults
from civicdp.server.services.computations import abandon_stale
from civicdp.server.services.query_service import QueryService
from civicdp.server.state.settings import Settings


logger = logging.getLogger(__name__)


def policy_file(settings: Settings, db: DbEngine) -> Path | None:
    """The SQLite file of the policy rules (None when they live in the state database)."""
    return None if db.dialect.name != "sqlite" else (settings.data_dir / "policies.db").resolve()


def policy_database(settings: Settings, db: DbEngine) -> DbEngine:
    """Where the policy rules live: the state database, or on SQLite a file of their own.

    The Casbin adapter writes through its own connections; on SQLite, which has one
    writer at a time, that would wait forever on a steward's open transaction.
    """
    path = policy_file(settings, db)
    return db if path is None else make_engine(f"sqlite:///{path}")


def build_policies(db: DbEngine, *, defaults: bool = False, refresh_seconds: float = 0.0) -> PolicyStore:
    """The policy store over the stored rules (unique, versioned: every process sees every change).

    ``defaults``: add the default rules if there are none (a new state).
    """
    policies = PolicyStore(VersionedAdapter(db, read_engine=reader(db)), refresh_seconds=refresh_seconds)
    if defaults and not policies.rules():
        default_rules(policies)
    policies.check_arity()
    return policies


@dataclass
class Opened:
    """An open, checked state database: its policy store, its secret, and what opening it did.

    ``status``: ``created`` or ``adopted`` (:func:`civicdp.server.state.identity.initialise`), else ``existing``.
    """

    db: DbEngine
    policy_db: DbEngine
    policies: PolicyStore
    secret: bytes
    identity: identity.StateIdentity
    status: str

    def close(self) -> None:
        self.db.dispose()
        if self.policy_db is not self.db:
            self.policy_db.dispose()


def open_state(settings: Settings, *, init: bool = False) -> Opened:
    """Open the state the settings point at, checked to be whole and to match its files.

    With ``init`` a state that does not exist yet is created first (database tables, the
    default policy rules, the key-hashing secret, the signing key, then the identity row);
    without it a missing or mismatched state raises :class:`civicdp.server.state.identity.StateError`,
    and nothing is created.
    """
    if not init and not identity.exists(settings):
        raise identity.StateMissing(
            f"no civicdp state at {identity.location(settings)}: there is no database file "
            f"{identity.sqlite_file(settings.state_url)}. Create the state once with `civicdp init` (see "
            "`civicdp init --help`), or point CIVICDP_DATA_DIR / DATABASE_URL at the existing state")
    if init:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = make_engine(settings.state_url)
    policy_db: DbEngine | None = None
    try:
        if init and identity.read(db) is None:
            init_db(db)
            policy_db = policy_database(settings, db)
            # The rules before the identity row: a state with a row is always whole.
            policies = build_policies(policy_db, defaults=True, refresh_seconds=settings.policy_refresh_seconds)
            checked, status = identity.initialise(settings, db)
        else:
            checked, status = identity.check(settings, db), identity.EXISTING  # before anything is created
            path = policy_file(settings, db)
            if path is not None and not path.is_file():
                raise identity.StateMissing(
                    f"the state at {identity.location(settings)} has no policy rules file {path} (it holds every "
                    "grant). Restore the data directory from its backup; `civicdp init` creates the file only "
                    "for a new state")
            init_db(db)  # tables a newer civicdp added
            policy_db = policy_database(settings, db)
            policies = build_policies(policy_db, refresh_seconds=settings.policy_refresh_seconds)
    except OperationalError as exc:
        _dispose(db, policy_db)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None and str(exc.orig).strip() else exc
        raise identity.StateError(f"cannot open the state database at {identity.location(settings)}: "
                                  f"{reason}") from None
    except BaseException:
        _dispose(db, policy_db)
        raise
    return Opened(db, policy_db, policies, checked.secret, checked.identity, status)


def _dispose(db: DbEngine, policy_db: DbEngine | None) -> None:
    db.dispose()
    if policy_db is not None and policy_db is not db:
        policy_db.dispose()


def init_state(settings: Settings) -> tuple[identity.StateIdentity, str]:
    """``civicdp init``: create the state if there is none; its identity and what was done.

    ``created``: a new state; ``adopted``: a database made by an earlier civicdp, its files
    recorded; ``existing``: the state was there and its files match (nothing changed).
    """
    opened = open_state(settings, init=True)
    opened.close()
    return opened.identity, opened.status


def check_state(settings: Settings) -> identity.StateIdentity:
    """Refuse (:class:`civicdp.server.state.identity.StateError`) unless the settings point at an existing, matching state."""
    opened = open_state(settings)
    opened.close()
    return opened.identity


def build_state(settings: Settings, *, init: bool | None = None) -> AppState:
    """Open the state for a server process or a command.

    ``init`` (default: ``settings.init_state``) creates the state first if there is none;
    otherwise a missing or mismatched state is refused with :class:`civicdp.server.state.identity.StateError`.
    """
    opened = open_state(settings, init=settings.init_state if init is None else init)
    db, policy_db, policies = opened.db, opened.policy_db, opened.policies
    caps = CapDefaults.from_settings(settings)
    ensure_head(db)
    install_spend_check()  # the ledger refuses to charge budgets that failed reconciliation
    audit = AuditLog(db, settings.audit_key_path, settings.audit_origin, settings.checkpoint_every_entries,
                     settings.checkpoint_every_minutes, state_check=reconcile_state)
    audit.key  # noqa: B018 - records the signing key's public key (the key itself exists: checked above)
    # Tables are read from the snapshot prepared at registration (under the state, never the
    # steward's folder); one registered without preparation is ranked there at its first query.
    engine = Engine(backend=PolarsBackend(cache_dir=settings.prepared_path),
                    limits=EngineLimits(max_epsilon=settings.max_epsilon, auto_fraction=settings.auto_fraction))
    timeout = timedelta(minutes=settings.computation_timeout_minutes)
    # Charged computations a crash left behind: audited as abandoned, their charges kept. With
    # the log frozen by a failed integrity check nothing can be recorded: they wait until it
    # verifies again (readiness reports the log; the next start abandons them).
    try:
        abandon_stale(db, timeout)
    except AuditLogFailed:
        logger.warning("charged computations left by a crash are not abandoned: the audit log is frozen")
    return AppState(settings=settings, db=db, policy_db=policy_db, policies=policies,
                    queries=QueryService(db, engine, policies, caps, timeout,
                                         timedelta(seconds=settings.query_wait_seconds)), caps=caps,
                    secret=opened.secret, audit=audit)
