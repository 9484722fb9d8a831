"""Domain errors every part raises; the HTTP layer maps them to responses (server/http/errors.py).

Texts depend on the request and the public state (policies, budgets), never on the data.
"""

from __future__ import annotations


#: The one text for anything a caller may not see, whether it exists or not (no existence oracle).
NOT_VISIBLE = "you may not read {what} '{name}', or it does not exist"


class AccessDenied(Exception):
    """The policy store refused the request."""

    def __init__(self, reason: str, rule: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule = rule


class NotFound(Exception):
    """A named thing that does not exist (or that the caller may not see)."""


class Conflict(Exception):
    """A change that clashes with the current state (e.g. a name already taken)."""


class InvalidRequest(Exception):
    """A parameter outside what the server can answer (e.g. a log size beyond the log)."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        super().__init__(f"{field}: {problem}. {fix}")
        self.field, self.problem, self.fix = field, problem, fix
