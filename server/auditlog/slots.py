"""What one HTTP request has told the audit log so far: its :class:`AuditSlot`.

Every request under ``/v1`` gets one slot (:mod:`civicdp.server.http.request_log`); code
that records an entry for the request marks it recorded, and the mark is undone if the
recording transaction rolls back (:mod:`civicdp.server.auditlog.append`).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from civicdp.server.state.caller import Caller


@dataclass
class AuditSlot:
    """What one HTTP request has told the log so far."""

    method: str = ""
    path: str = ""
    caller: Caller | None = None
    roles: list[str] = field(default_factory=list)
    action: str | None = None
    target: str | None = None
    rule: list[str] | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. the query an estimate priced
    recorded: bool = False


SLOT: contextvars.ContextVar[AuditSlot | None] = contextvars.ContextVar("civicdp_audit_slot", default=None)


def current_slot() -> AuditSlot | None:
    return SLOT.get()
