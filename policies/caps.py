"""Per-query epsilon caps: the one numeric attribute the access policy decides on.

A rule's ``cap`` field is ``*`` (no cap) or a decimal number; :func:`epsilon_within`
is registered with Casbin under that name and called by the matcher as
``epsilon_within(r.eps, p.cap)``. It fails closed: a requested epsilon that is not a
finite number greater than 0 (NaN, infinity, 0, negatives, booleans, text that does
not parse) never matches, and neither does a cap that does not parse. Period budgets
and lifetime caps are not here: they are numbers with state and live in the SQL
ledger (GOVERNANCE.md, "Access policies").
"""

from __future__ import annotations

import math

from civicdp.policies.errors import InvalidRuleValue

#: The cap field of a rule without a per-query cap (and of every deny rule).
NO_CAP = "*"


def parse_epsilon(value: object) -> float | None:
    """``value`` as a finite float greater than 0, or ``None`` if it is not one.

    Numbers and numeric strings are accepted (rule fields are always strings);
    booleans are refused although Python counts them as integers.
    """
    if isinstance(value, bool):
        return None
    try:
        epsilon = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return epsilon if math.isfinite(epsilon) and epsilon > 0 else None


def epsilon_within(requested: object, cap: object) -> bool:
    """Whether the requested epsilon is allowed under a rule's cap (Casbin matcher function).

    ``requested`` is ``""`` when the request states no epsilon: that passes only an
    uncapped rule (the server refuses query actions without an epsilon before asking).
    """
    if requested is None or requested == "":
        return cap == NO_CAP
    epsilon = parse_epsilon(requested)
    if epsilon is None:
        return False
    if cap == NO_CAP:
        return True
    limit = parse_epsilon(cap)
    return limit is not None and epsilon <= limit


def format_cap(cap: object) -> str:
    """The canonical rule field for ``cap``: ``*`` or the shortest repr of a float > 0.

    Raises :class:`InvalidRuleValue` for anything else, so a rule can never carry a
    cap that would silently never match.
    """
    if cap == NO_CAP:
        return NO_CAP
    limit = parse_epsilon(cap)
    if limit is None:
        raise InvalidRuleValue("cap", cap, "a per-query cap must be '*' or a finite number greater than 0")
    return repr(limit)
