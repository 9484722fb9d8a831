"""Errors of the policies package: a rule that cannot be stored safely, or a store whose rules are malformed.

Tree::

    PolicyError
    ├── RuleArityMismatch  a model definition or stored rule has more fields than the
    │                      storage keeps (6), or not as many as the model defines
    └── InvalidRuleValue   a name, role, action, cap or effect that a rule cannot hold

A refused *request* is not an error: :meth:`civicdp.policies.enforcer.PolicyStore.check`
returns a ``Decision`` with ``allowed=False`` and a reason instead.
"""

from __future__ import annotations


class PolicyError(Exception):
    """Base of every error raised by :mod:`policies`."""


class RuleArityMismatch(PolicyError):
    """Rules of the wrong width: the SQL adapter would cut them silently, or they cannot match."""

    def __init__(self, message: str, *, ptype: str, expected: int, found: int) -> None:
        super().__init__(message)
        self.ptype = ptype
        self.expected = expected
        self.found = found


class InvalidRuleValue(PolicyError, ValueError):
    """A value that cannot go into a rule (it would break storage, or never match)."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"Invalid {field} {value!r}: {why}")
        self.field = field
        self.value = value
