"""The collaborators built once at start-up and handed to every request and command."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine as DbEngine

from civicdp.audit.signing import SigningKey
from civicdp.policies.enforcer import PolicyStore
from civicdp.server.auditlog.log import AuditLog
from civicdp.server.services.query_service import QueryService
from civicdp.server.state.ledger import CapDefaults
from civicdp.server.state.settings import Settings


@dataclass
class AppState:
    """Collaborators built once at start-up and handed to every request."""

    settings: Settings
    db: DbEngine
    policy_db: DbEngine
    policies: PolicyStore
    queries: QueryService
    caps: CapDefaults
    secret: bytes
    audit: AuditLog

    @property
    def signing_key(self) -> SigningKey:
        """The server's Ed25519 key (audit checkpoints, feed releases); follows key rotation."""
        return self.audit.key

    def close(self) -> None:
        self.db.dispose()
        if self.policy_db is not self.db:
            self.policy_db.dispose()
