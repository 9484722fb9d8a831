"""Deciding requests: may this subject -- or a holder of this role -- do this action on this object, up to this epsilon?

Requests are denied by default: an unknown action, an object never registered (see
:mod:`civicdp.policies.objects`), a subject without a matching grant, or an epsilon that is
not a finite number above 0 is refused with a reason in plain words, and a deny rule
always beats an allow rule. :meth:`PolicyDecisions.check` returns a :class:`Decision`
carrying the rule that decided, for the audit entry.

A role held in the agency ``*`` holds in every agency, including the agency an object
was registered for: besides the caller's own agency, the matcher evaluates the rules of
such roles in each named agency where the object is linked (``linked_in_agency``, see
``model.conf``). So a server-wide steward or oversight sees a dataset registered for
``health`` alone, while a deny rule naming ``health`` or ``*`` still refuses them, and an
analyst holding ``analyst`` in ``transport`` still does not see it.

:meth:`PolicyDecisions.check_role` and :meth:`PolicyDecisions.check_role_all` ask the same
question of a role instead of an account ("would a holder of ``analyst`` in ``health`` be
allowed this query?"), e.g. for a feed a steward defines for other agencies. They do not
re-implement the rules: for the length of one decision, under the store's lock, a
stand-in subject that no stored rule or grant can name (its name has parentheses, which
:func:`~civicdp.policies.objects.validate_name` refuses) is linked to that role in that
agency in Casbin's role manager only -- not in the stored rules, the adapter or the
policy version -- and asked exactly as :meth:`~PolicyDecisions.check_all` asks for an
account. Its decision is therefore the decision for an account holding that one role in
that agency and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from casbin.core_enforcer import EnforceContext
from casbin.persist.adapter import Adapter

from civicdp.policies.actions import QUERY_ACTIONS, Action, Role
from civicdp.policies.administration import RuleAdmin
from civicdp.policies.caps import epsilon_within, parse_epsilon
from civicdp.policies.errors import InvalidRuleValue
from civicdp.policies.objects import WILDCARD, validate_name
from civicdp.policies.rulebase import DENY, MODEL_TEXT, show_rule

#: Evaluates matcher m2 (allow rules, caps ignored): only to explain a refusal.
_UNCAPPED = EnforceContext(rtype="r", ptype="p", etype="e", mtype="m2")
#: Marks the memoised decisions of a role check's stand-in subject.
_STAND_IN = object()


@dataclass(frozen=True)
class Decision:
    """The answer to one authorisation request.

    ``rule`` is the rule that decided: the allow rule that matched, the deny rule that
    forbade, or the allow rule whose per-query cap was exceeded; ``None`` when no rule
    applies. ``rules`` holds every deciding rule (one per object for ``check_all``).
    """

    allowed: bool
    rule: list[str] | None
    reason: str
    rules: list[list[str]] = field(default_factory=list)


def holder_subject(role: Role, held_in: str) -> str:
    """The stand-in subject of a role check: unstorable (parentheses), one per role and agency."""
    return f"(holder of {role.value} in {held_in})"


class PolicyDecisions(RuleAdmin):
    """The decisions of a store: per account (:meth:`check`) and per role (:meth:`check_role`)."""

    def __init__(self, adapter: Adapter | None = None, *, model_text: str = MODEL_TEXT,
                 refresh_seconds: float = 0.0) -> None:
        self._objects: frozenset[str] | None = None
        # object -> the named agencies (never "*") in which it is a member of some group.
        self._homes: dict[str, tuple[str, ...]] | None = None
        self._g2: Any = None  # the role manager of g2, fetched with the index (outside enforce)
        # Decisions are pure functions of the request and the rules: remember them until
        # the rules change (every change clears this), so repeated requests cost a lookup.
        self._decisions: dict[tuple[object, ...], tuple[bool, list[str]]] = {}
        super().__init__(adapter, model_text=model_text, refresh_seconds=refresh_seconds)
        self._enforcer.add_function("epsilon_within", epsilon_within)
        self._enforcer.add_function("linked_in_agency", self._linked_in_agency)
        self.check_arity()

    def _forget(self) -> None:
        """Drop what is derived from the rules: the object index and the memoised decisions."""
        super()._forget()
        self._objects = None
        self._homes = None
        self._decisions.clear()

    # -- per account ----------------------------------------------------------------------

    def check(self, subject: str, agency: str, obj: str, action: Action | str,
              epsilon: float | None = None) -> Decision:
        """May ``subject``, acting in ``agency``, do ``action`` on ``obj`` (spending ``epsilon``)?

        Query actions need the epsilon the query would spend; it must be a finite number
        above 0 and within the cap of the rule that allows it.
        """
        self.refresh()
        return self._check(subject, agency, obj, action, epsilon)

    def check_all(self, subject: str, agency: str, objects: Iterable[str], action: Action | str,
                  epsilon: float | None = None) -> Decision:
        """:meth:`check` every object (the dataset, then each column a query reads).

        Returns the first refusal, or an allowed decision whose ``rules`` lists the rule
        that allowed each object. An empty list of objects is refused.
        """
        self.refresh()  # once: every object is judged on the same rules
        return self._check_all(subject, agency, objects, action, epsilon)

    # -- per role -------------------------------------------------------------------------

    def check_role(self, role: Role | str, agency: str, obj: str, action: Action | str,
                   epsilon: float | None = None, *, held_in: str | None = None) -> Decision:
        """Would an account holding only ``role`` in ``held_in`` (default: ``agency``), acting in
        ``agency``, be allowed to do ``action`` on ``obj`` (spending ``epsilon``)?

        The same rules as :meth:`check` -- deny overrides, per-query caps, column classes,
        objects registered for one agency -- applied to a holder of the role instead of an
        account. Refused, with a reason, if ``role`` is not a role or ``held_in`` is not an
        agency a role can be granted in. Changes nothing.
        """
        return self.check_role_all(role, agency, (obj,), action, epsilon, held_in=held_in)

    def check_role_all(self, role: Role | str, agency: str, objects: Iterable[str], action: Action | str,
                       epsilon: float | None = None, *, held_in: str | None = None) -> Decision:
        """:meth:`check_role` every object -- as :meth:`check_all` does for an account.

        For a query: the dataset first, then each column it reads, with the epsilon it
        would spend; the first refusal is returned (an empty list of objects is refused).
        """
        try:
            held = Role(role)
        except ValueError:
            return Decision(False, None, f"unknown role {role!r}")
        home = agency if held_in is None else held_in
        try:
            validate_name("agency", home)
        except InvalidRuleValue as exc:
            return Decision(False, None, f"no account can hold {held} in agency {home!r}: {exc}")
        self.refresh()  # once, before the stand-in is linked: every object is judged on the same rules
        with self._holding(held, home) as subject:
            return self._check_all(subject, agency, objects, action, epsilon, holder=(held, home))

    @contextmanager
    def _holding(self, role: Role, held_in: str) -> Iterator[str]:
        """A stand-in subject holding ``role`` in ``held_in``, for as long as the store's lock is held.

        The link is made in the role manager of ``g`` only, which Casbin consults during a
        decision: no stored rule, no adapter row, no policy version, no watcher. Every other
        decision and every reload takes the same lock, so none sees the link, and none can
        rebuild the role links while it is there.
        """
        subject = holder_subject(role, held_in)
        with self._lock:
            manager = self._enforcer.get_model()["g"]["g"].rm
            manager.add_link(subject, role.value, held_in)
            try:
                yield subject
            finally:
                try:
                    manager.delete_link(subject, role.value, held_in)
                except RuntimeError:  # the links were rebuilt meanwhile (they cannot be, under the lock)
                    pass

    # -- the decision ---------------------------------------------------------------------

    def _check_all(self, subject: str, agency: str, objects: Iterable[str], action: Action | str,
                   epsilon: float | None, *, holder: tuple[Role, str] | None = None) -> Decision:
        decisions: list[Decision] = []
        for obj in objects:
            decision = self._check(subject, agency, obj, action, epsilon, holder=holder)
            if not decision.allowed:
                return decision
            decisions.append(decision)
        if not decisions:
            return Decision(False, None, "there is nothing to authorise: no object was named")
        rules: list[list[str]] = []
        for decision in decisions:
            if decision.rule is not None and decision.rule not in rules:
                rules.append(decision.rule)
        return Decision(True, decisions[0].rule, "; ".join(d.reason for d in decisions), rules)

    def _check(self, subject: str, agency: str, obj: str, action: Action | str,
               epsilon: float | None, *, holder: tuple[Role, str] | None = None) -> Decision:
        """The decision for ``subject`` -- or, with ``holder``, for the stand-in of that (role, agency).

        A stand-in's decisions are memoised apart from accounts': they hold only while it is linked.
        """
        try:
            act = Action(action)
        except ValueError:
            return Decision(False, None, f"unknown action {action!r}")
        if act in QUERY_ACTIONS and epsilon is None:
            return Decision(False, None, f"{act} needs the epsilon the query would spend")
        if epsilon is not None and parse_epsilon(epsilon) is None:
            return Decision(False, None,
                            f"the requested epsilon {epsilon!r} is not a finite number greater than 0")
        if subject == WILDCARD or subject in Role._value2member_map_:
            return Decision(False, None, f"{subject!r} is not a subject: roles and '*' are granted, they do not ask")
        if obj not in self._known_objects():
            # Also keeps Casbin's role managers from growing with every unknown name a request makes up.
            return Decision(False, None, f"{obj!r} is not a registered object")
        asker = repr(subject) if holder is None else f"a holder of {holder[0].value!r} in {holder[1]!r}"
        stand_in = holder is not None
        request = (subject, agency, obj, act.value, "" if epsilon is None else epsilon)
        allowed, rule = self._enforce(*request, stand_in=stand_in)
        if allowed:
            return Decision(True, list(rule), f"rule {show_rule(rule)} allows {asker} to {act} on {obj!r} "
                                              f"in agency {agency!r}", [list(rule)])
        if rule:  # with "deny overrides", a refusal with a matched rule is a deny rule
            return Decision(False, list(rule), f"rule {show_rule(rule)} forbids {asker} to {act} on {obj!r} "
                                               f"in agency {agency!r}", [list(rule)])
        _, capped = self._enforce(_UNCAPPED, *request, stand_in=stand_in)
        if capped:
            cap = capped[4]
            reason = (f"the per-query cap {cap} is below the requested epsilon {epsilon}" if epsilon is not None
                      else f"the per-query cap {cap} applies but no epsilon was given")
            return Decision(False, list(capped), f"{reason} (rule {show_rule(capped)}, {act} on {obj!r})",
                            [list(capped)])
        if holder is None:
            asker = f"{subject!r} ({self._describe_roles(subject)})"
        return Decision(False, None, f"no rule allows {asker} to {act} on {obj!r} in agency {agency!r}")

    def _enforce(self, *request: object, stand_in: bool = False) -> tuple[bool, list[str]]:
        # One decision at a time: Casbin evaluates matchers by parsing them with Python's
        # ast module, and CPython 3.11 can fail ("AST constructor recursion depth
        # mismatch") when threads parse at once. A decision takes under a millisecond.
        # A stand-in's decisions are remembered under a key of their own: an account's
        # check naming the stand-in (which then holds nothing) must not find them.
        key = (_STAND_IN, *request) if stand_in else request
        with self._lock:
            known = self._decisions.get(key)
            if known is None:
                allowed, rule = self._enforcer.enforce_ex(*request)
                known = (bool(allowed), list(rule))
                if len(self._decisions) > 100_000:  # bounded: requests can make up epsilons
                    self._decisions.clear()
                self._decisions[key] = known
            return known[0], list(known[1])

    # -- the object index -----------------------------------------------------------------

    def _known_objects(self) -> frozenset[str]:
        """Objects a request may name: group members and objects named by rules, but no bare group."""
        with self._lock:
            if self._objects is None or self._homes is None:
                links = self._enforcer.get_named_grouping_policy("g2")
                members = {link[0] for link in links}
                groups = {link[1] for link in links} - members
                named = {rule[2] for rule in self._enforcer.get_named_policy("p")}
                homes: dict[str, set[str]] = {}
                for member, _, agency in links:
                    if agency != WILDCARD:
                        homes.setdefault(member, set()).add(agency)
                self._homes = {member: tuple(sorted(agencies)) for member, agencies in homes.items()}
                self._g2 = self._enforcer.get_model()["g"]["g2"].rm
                self._objects = frozenset((members | (named - groups)) - {WILDCARD})
            return self._objects

    def _linked_in_agency(self, obj: str, group: str, rule_agency: str, effect: str) -> bool:
        """Matcher function: is ``obj`` in ``group`` in a named agency that the rule covers?

        True if some agency X other than ``*`` holds a link of ``obj`` (so the object exists
        in X), the rule's agency is ``*`` or X, and ``obj`` is ``group`` itself, reaches
        ``group`` through links made in X, or -- for a deny rule only -- ``group`` is ``*``.
        The matcher calls this only for roles held in ``*`` (and deny rules naming the
        account), so that they are evaluated where the object lives, not only in the
        caller's own agency. Links in ``*`` are left to the matcher's first path: an object
        shared with every agency is judged in the caller's agency as before.
        """
        homes = self._homes
        if homes is None:  # check() builds the index before asking Casbin; be safe anyway
            self._known_objects()
            homes = self._homes or {}
        agencies = homes.get(obj, ())
        if not agencies:
            return False
        if group == WILDCARD:
            return effect == DENY and (rule_agency == WILDCARD or rule_agency in agencies)
        return any(self._g2.has_link(obj, group, agency) for agency in agencies
                   if rule_agency in (WILDCARD, agency))

    def _describe_roles(self, subject: str) -> str:
        held = self.roles_of(subject)
        return ", ".join(f"{role} in {agency}" for role, agency in held) if held else "no roles"
