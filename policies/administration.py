"""Changing and reading the policy: grants of roles, allow and deny rules, and object groups.

Every value is checked before it is stored (:func:`civicdp.policies.objects.validate_name`,
the enums of :mod:`civicdp.policies.actions`, :func:`civicdp.policies.caps.format_cap`), so
a stored rule can neither break the storage nor silently never match; a subject is an
account, never ``*`` or a role name. Each change goes through
:meth:`~civicdp.policies.rulebase.RuleBase._mutate` and reports whether anything changed.
"""

from __future__ import annotations

from civicdp.policies.actions import Action, Role
from civicdp.policies.caps import NO_CAP, format_cap
from civicdp.policies.errors import InvalidRuleValue
from civicdp.policies.objects import WILDCARD, validate_name
from civicdp.policies.rulebase import ALLOW, DENY, RuleBase


class RuleAdmin(RuleBase):
    """Grants, rules and object groups of a :class:`RuleBase`."""

    # -- grants ---------------------------------------------------------------------------

    def grant(self, subject: str, role: Role | str, agency: str) -> bool:
        """Give ``subject`` ``role`` in ``agency`` (``*``: every agency); False if already held."""
        rule = [self._subject(subject), self._role(role), validate_name("agency", agency)]
        return self._mutate("g", rule, add=True)

    def revoke(self, subject: str, role: Role | str, agency: str) -> bool:
        """Take ``role`` in ``agency`` away from ``subject`` (every stored copy); False if it was not held."""
        rule = [subject, self._role(role), agency]
        return self._mutate("g", rule, add=False)

    def roles_of(self, subject: str) -> list[tuple[Role, str]]:
        """The roles granted to ``subject`` directly, as ``(role, agency)`` pairs."""
        self.refresh()
        rows = self._enforcer.get_filtered_named_grouping_policy("g", 0, subject)
        return sorted((Role(row[1]), row[2]) for row in rows if row[1] in Role._value2member_map_)

    # -- rules ----------------------------------------------------------------------------

    def allow(self, subject_or_role: str, agency: str, obj: str, action: Action | str,
              cap: float | str = NO_CAP) -> bool:
        """Add an allow rule (``cap``: the largest epsilon per query, ``*`` for none); False if present."""
        validate_name("object", obj)
        if obj == WILDCARD:
            raise InvalidRuleValue("object", obj, "an allow rule must name an object or a group; "
                                                  "'*' is only for deny rules")
        return self._add(subject_or_role, agency, obj, action, format_cap(cap), ALLOW)

    def deny(self, subject_or_role: str, agency: str, obj: str, action: Action | str,
             cap: float | str = NO_CAP) -> bool:
        """Add a deny rule, which beats every allow rule (``obj`` may be ``*``); False if present."""
        if cap != NO_CAP:
            raise InvalidRuleValue("cap", cap, "a deny rule refuses whatever epsilon is asked; leave the cap '*'")
        return self._add(subject_or_role, agency, obj, action, NO_CAP, DENY)

    def remove_rule(self, subject_or_role: str, agency: str, obj: str, action: Action | str,
                    cap: float | str = NO_CAP, effect: str = ALLOW) -> bool:
        """Remove one rule (``store.remove_rule(*rule)`` works on a row of :meth:`rules`); False if absent."""
        try:
            cap_field = format_cap(cap)
        except InvalidRuleValue:
            return False
        rule = [subject_or_role, agency, obj, str(action), cap_field, effect]
        return self._mutate("p", rule, add=False)

    def rules(self) -> list[list[str]]:
        """Every rule, as ``[subject_or_role, agency, object, action, cap, effect]``."""
        self.refresh()
        return [list(rule) for rule in self._enforcer.get_named_policy("p")]

    # -- object groups --------------------------------------------------------------------

    def assign(self, obj: str, group: str, agency: str = WILDCARD) -> bool:
        """Put ``obj`` in ``group`` for ``agency`` (``*``: every agency); False if already there."""
        link = [validate_name("object", obj), validate_name("group", group), validate_name("agency", agency)]
        if WILDCARD in (obj, group):
            raise InvalidRuleValue("group link", link, "'*' alone is not an object or a group")
        return self._mutate("g2", link, add=True)

    def unassign(self, obj: str, group: str, agency: str = WILDCARD) -> bool:
        """Take ``obj`` out of ``group`` for ``agency``; False if it was not in it."""
        return self._mutate("g2", [obj, group, agency], add=False)

    def groups_of(self, obj: str, agency: str = WILDCARD) -> list[str]:
        """The groups ``obj`` is assigned to directly, in exactly ``agency``."""
        self.refresh()
        rows = self._enforcer.get_filtered_named_grouping_policy("g2", 0, obj)
        return sorted(row[1] for row in rows if row[2] == agency)

    # -- validation -----------------------------------------------------------------------

    def _add(self, subject_or_role: str, agency: str, obj: str, action: Action | str, cap: str,
             effect: str) -> bool:
        try:
            act = Action(action).value
        except ValueError:
            raise InvalidRuleValue("action", action, "not one of the actions in civicdp.policies.actions") from None
        if subject_or_role == WILDCARD:
            raise InvalidRuleValue("subject or role", subject_or_role, "name an account or a role, not '*'")
        rule = [validate_name("subject or role", subject_or_role), validate_name("agency", agency),
                validate_name("object", obj), act, cap, effect]
        return self._mutate("p", rule, add=True)

    @staticmethod
    def _subject(subject: str) -> str:
        validate_name("subject", subject)
        if subject == WILDCARD or subject in Role._value2member_map_:
            raise InvalidRuleValue("subject", subject, "a subject is an account (e.g. 'account:7'), "
                                                       "not '*' or a role name")
        return subject

    @staticmethod
    def _role(role: Role | str) -> str:
        try:
            return Role(role).value
        except ValueError:
            raise InvalidRuleValue("role", role, "not one of the roles in civicdp.policies.actions") from None
