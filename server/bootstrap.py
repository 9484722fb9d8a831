"""Start-up: the state database, the policy store, the query service, the server secret."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy_adapter import Adapter

from policies.defaults import default_rules
from policies.enforcer import PolicyStore
from queries.context import EngineLimits
from queries.engine import Engine
from server import auth
from server.audit_log import AuditLog, AuditLogFailed, ensure_head
from server.db import init_db, make_engine
from server.deps import AppState
from server.ledger import CapDefaults
from server.computations import abandon_stale
from server.service import QueryService
from server.settings import Settings


logger = logging.getLogger(__name__)


def policy_database(settings: Settings, db: DbEngine) -> DbEngine:
    """Where the policy rules live: the state database, or on SQLite a file of their own.

    The Casbin adapter writes through its own connections; on SQLite, which has one
    writer at a time, that would wait forever on a steward's open transaction.
    """
    if db.dialect.name != "sqlite":
        return db
    return make_engine(f"sqlite:///{(settings.data_dir / 'policies.db').resolve()}")


def build_policies(db: DbEngine) -> PolicyStore:
    policies = PolicyStore(Adapter(db))
    if not policies.rules():
        default_rules(policies)
    policies.check_arity()
    return policies


def build_state(settings: Settings) -> AppState:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = make_engine(settings.state_url)
    init_db(db)
    policy_db = policy_database(settings, db)
    policies = build_policies(policy_db)
    caps = CapDefaults.from_settings(settings)
    ensure_head(db)
    audit = AuditLog(db, settings.audit_key_path, settings.audit_origin, settings.checkpoint_every_entries,
                     settings.checkpoint_every_minutes)
    audit.key  # noqa: B018 - creates the signing key on first start, and records its public key
    engine = Engine(limits=EngineLimits(max_epsilon=settings.max_epsilon, auto_fraction=settings.auto_fraction))
    timeout = timedelta(minutes=settings.computation_timeout_minutes)
    # Charged computations a crash left behind: audited as abandoned, their charges kept. With
    # the log frozen by a failed integrity check nothing can be recorded: they wait until it
    # verifies again (readiness reports the log; the next start abandons them).
    try:
        abandon_stale(db, timeout)
    except AuditLogFailed:
        logger.warning("charged computations left by a crash are not abandoned: the audit log is frozen")
    return AppState(settings=settings, db=db, policy_db=policy_db, policies=policies,
                    queries=QueryService(db, engine, policies, caps, timeout), caps=caps,
                    secret=auth.load_or_create_server_secret(settings.secret_path),
                    audit=audit)
