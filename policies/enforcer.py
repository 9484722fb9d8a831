"""The policy store: Casbin decides who may do what, in which agency, on which object, up to which epsilon.

:class:`PolicyStore` wraps a ``casbin.SyncedEnforcer`` built from ``model.conf`` (package
data next to this module) and an optional storage adapter handed in by the server
(``sqlalchemy_adapter.Adapter(engine)``; without one the rules live in memory). Every
rule has the six fields ``subject-or-role, agency, object, action, cap, effect`` —
exactly the adapter's ``v0..v5``; :meth:`PolicyStore.check_arity` refuses, at
start-up and after every load, a model or stored rule of another width, because the
adapter silently cuts longer rules. Requests are denied by default: an unknown
action, an object never registered (see :mod:`civicdp.policies.objects`), a subject without
a matching grant, or an epsilon that is not a finite number above 0 is refused with a
reason in plain words, and a deny rule always beats an allow rule. :meth:`check`
returns a :class:`Decision` carrying the rule that decided, for the audit entry.

A role held in the agency ``*`` holds in every agency, including the agency an object
was registered for: besides the caller's own agency, the matcher evaluates the rules of
such roles in each named agency where the object is linked (``linked_in_agency``, see
``model.conf``). So a server-wide steward or oversight sees a dataset registered for
``health`` alone, while a deny rule naming ``health`` or ``*`` still refuses them, and an
analyst holding ``analyst`` in ``transport`` still does not see it.

With a :class:`civicdp.policies.storage.VersionedAdapter` the stored rules are the one source of
truth for every process: each change is made in the database first (the row count says
whether anything changed, so a grant already held or a revoke of nothing reports False
whatever this process remembered), and the policy version moves in the same
transaction. Before deciding, the store asks its :class:`~civicdp.policies.storage.PolicyVersionWatcher`
whether the version moved (``refresh_seconds``: at most that long between looks; 0:
before every decision) and reloads every rule if it did, which also drops the
memoised decisions. A change made by another process -- the command line, another
worker -- is therefore in force at this process's next decision.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import casbin
from casbin.core_enforcer import EnforceContext
from casbin.persist.adapter import Adapter

from civicdp.policies.actions import QUERY_ACTIONS, Action, Role
from civicdp.policies.caps import NO_CAP, epsilon_within, format_cap, parse_epsilon
from civicdp.policies.catalog import CatalogMixin
from civicdp.policies.errors import InvalidRuleValue, RuleArityMismatch
from civicdp.policies.objects import WILDCARD, validate_name
from civicdp.policies.storage import PolicyVersionWatcher, VersionedAdapter

#: The SQLAlchemy adapter stores a rule in columns v0..v5 and silently drops the rest.
MAX_FIELDS = 6
ALLOW, DENY = "allow", "deny"
MODEL_TEXT = resources.files(__package__).joinpath("model.conf").read_text(encoding="utf-8")
#: Evaluates matcher m2 (allow rules, caps ignored): only to explain a refusal.
_UNCAPPED = EnforceContext(rtype="r", ptype="p", etype="e", mtype="m2")


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


def _show(rule: Sequence[str]) -> str:
    return "[" + ", ".join(rule) + "]"


class PolicyStore(CatalogMixin):
    """Rules, grants and object groups, and the enforcement of them."""

    def __init__(self, adapter: Adapter | None = None, *, model_text: str = MODEL_TEXT,
                 refresh_seconds: float = 0.0) -> None:
        self._adapter = adapter
        self._lock = threading.RLock()
        self._watcher: PolicyVersionWatcher | None = None
        if isinstance(adapter, VersionedAdapter):
            # Built without the adapter, then loaded at a known version (a change landing in
            # between is seen by the first poll).
            self._enforcer = casbin.SyncedEnforcer(casbin.Enforcer.new_model(text=model_text), None)
            self._enforcer.set_adapter(adapter)
            self._enforcer.enable_auto_save(False)  # changes go to the database first, see _mutate
            self._watcher = PolicyVersionWatcher(adapter, refresh_seconds)
            self._watcher.set_update_callback(self._reload)
            self._enforcer.set_watcher(self._watcher)
            self._watcher.loaded = adapter.version()
            self._enforcer.load_policy()
        else:
            self._enforcer = casbin.SyncedEnforcer(casbin.Enforcer.new_model(text=model_text), adapter)
        self._enforcer.add_function("epsilon_within", epsilon_within)
        self._enforcer.add_function("linked_in_agency", self._linked_in_agency)
        self._objects: frozenset[str] | None = None
        # object -> the named agencies (never "*") in which it is a member of some group.
        self._homes: dict[str, tuple[str, ...]] | None = None
        self._g2: Any = None  # the role manager of g2, fetched with the index (outside enforce)
        # Decisions are pure functions of the request and the rules: remember them until
        # the rules change (every change clears this), so repeated requests cost a lookup.
        self._decisions: dict[tuple[object, ...], tuple[bool, list[str]]] = {}
        self.check_arity()

    # -- start-up and persistence ---------------------------------------------------------

    def check_arity(self) -> None:
        """Raise :class:`RuleArityMismatch` unless every definition and rule fits 6 fields exactly as defined."""
        model = self._enforcer.get_model()
        for sec in ("p", "g"):
            for ptype, assertion in model[sec].items():
                width = len(assertion.tokens)
                if width > MAX_FIELDS:
                    raise RuleArityMismatch(
                        f"The model defines {ptype} with {width} fields, but the policy storage keeps at most "
                        f"{MAX_FIELDS} (v0..v5) and would silently cut the rest; shorten the definition.",
                        ptype=ptype, expected=MAX_FIELDS, found=width)
                for rule in assertion.policy:
                    if len(rule) != width:
                        raise RuleArityMismatch(
                            f"The stored {ptype} rule {_show(rule)} has {len(rule)} fields but the model defines "
                            f"{width}; fix or remove it before starting (at most {MAX_FIELDS} fields are stored).",
                            ptype=ptype, expected=width, found=len(rule))

    def save(self) -> None:
        """Write every rule to the adapter (replacing what it holds); nothing without an adapter.

        Changes are already saved one by one as they are made; this is for a bulk rewrite.
        """
        if self._adapter is not None:
            with self._lock:
                self._enforcer.save_policy()
                if self._watcher is not None:
                    self._reload()

    def load(self) -> None:
        """Reload every rule from the adapter (e.g. after another process changed them), then check arity."""
        if self._adapter is not None:
            with self._lock:
                if self._watcher is not None:
                    self._watcher.loaded = self._watcher.adapter.version()
                self._enforcer.load_policy()
                self._forget()
        self.check_arity()

    def refresh(self) -> bool:
        """Reload the rules if another process changed them since they were loaded; True if it did.

        Called before every decision and change; a store without a versioned adapter has
        nothing to refresh from.
        """
        if self._watcher is None:
            return False
        return self._watcher.poll()

    @property
    def version(self) -> int | None:
        """The policy version the rules in memory were loaded at (None: rules kept in memory only)."""
        return None if self._watcher is None else self._watcher.loaded

    def _reload(self) -> None:
        with self._lock:
            self.load()

    def _forget(self) -> None:
        """Drop what is derived from the rules: the object index and the memoised decisions."""
        self._objects = None
        self._homes = None
        self._decisions.clear()

    # -- decisions ------------------------------------------------------------------------

    def check(self, subject: str, agency: str, obj: str, action: Action | str,
              epsilon: float | None = None) -> Decision:
        """May ``subject``, acting in ``agency``, do ``action`` on ``obj`` (spending ``epsilon``)?

        Query actions need the epsilon the query would spend; it must be a finite number
        above 0 and within the cap of the rule that allows it.
        """
        self.refresh()
        return self._check(subject, agency, obj, action, epsilon)

    def _check(self, subject: str, agency: str, obj: str, action: Action | str,
               epsilon: float | None) -> Decision:
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
        request = (subject, agency, obj, act.value, "" if epsilon is None else epsilon)
        allowed, rule = self._enforce(*request)
        if allowed:
            return Decision(True, list(rule), f"rule {_show(rule)} allows {subject!r} to {act} on {obj!r} "
                                              f"in agency {agency!r}", [list(rule)])
        if rule:  # with "deny overrides", a refusal with a matched rule is a deny rule
            return Decision(False, list(rule), f"rule {_show(rule)} forbids {subject!r} to {act} on {obj!r} "
                                               f"in agency {agency!r}", [list(rule)])
        _, capped = self._enforce(_UNCAPPED, *request)
        if capped:
            cap = capped[4]
            reason = (f"the per-query cap {cap} is below the requested epsilon {epsilon}" if epsilon is not None
                      else f"the per-query cap {cap} applies but no epsilon was given")
            return Decision(False, list(capped), f"{reason} (rule {_show(capped)}, {act} on {obj!r})",
                            [list(capped)])
        return Decision(False, None, f"no rule allows {subject!r} ({self._describe_roles(subject)}) to {act} "
                                     f"on {obj!r} in agency {agency!r}")

    def _enforce(self, *request: object) -> tuple[bool, list[str]]:
        # One decision at a time: Casbin evaluates matchers by parsing them with Python's
        # ast module, and CPython 3.11 can fail ("AST constructor recursion depth
        # mismatch") when threads parse at once. A decision takes under a millisecond.
        with self._lock:
            known = self._decisions.get(request)
            if known is None:
                allowed, rule = self._enforcer.enforce_ex(*request)
                known = (bool(allowed), list(rule))
                if len(self._decisions) > 100_000:  # bounded: requests can make up epsilons
                    self._decisions.clear()
                self._decisions[request] = known
            return known[0], list(known[1])

    def check_all(self, subject: str, agency: str, objects: Iterable[str], action: Action | str,
                  epsilon: float | None = None) -> Decision:
        """:meth:`check` every object (the dataset, then each column a query reads).

        Returns the first refusal, or an allowed decision whose ``rules`` lists the rule
        that allowed each object. An empty list of objects is refused.
        """
        self.refresh()  # once: every object is judged on the same rules
        decisions: list[Decision] = []
        for obj in objects:
            decision = self._check(subject, agency, obj, action, epsilon)
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

    # -- internals ------------------------------------------------------------------------

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

    def _mutate(self, ptype: str, rule: list[str], *, add: bool) -> bool:
        """Add or remove one rule; whether anything changed.

        With a versioned adapter the database decides: the change is made there first, in
        a transaction that moves the policy version, and then mirrored in memory -- or, if
        another process changed the rules meanwhile, every rule is reloaded.
        """
        sec = "p" if ptype == "p" else "g"
        with self._lock:
            if self._watcher is None:
                changed = bool(self._memory(ptype, rule, add=add))
                self._forget()
                return changed
            self.refresh()
            adapter = self._watcher.adapter
            before = self._watcher.loaded
            changed = bool(adapter.add_policy(sec, ptype, rule) if add else adapter.remove_policy(sec, ptype, rule))
            if changed and before is not None and adapter.last_version == before + 1:
                self._memory(ptype, rule, add=add)  # ours was the only change since the rules were loaded
                self._watcher.loaded = adapter.last_version
                self._forget()
            elif changed:
                self._reload()
            else:
                self.refresh()  # nothing changed here: if memory disagreed, another process moved the version
            return changed

    def _memory(self, ptype: str, rule: list[str], *, add: bool) -> bool:
        """Add or remove ``rule`` in the enforcer (and, without a versioned adapter, its adapter)."""
        if ptype == "p":
            op = self._enforcer.add_named_policy if add else self._enforcer.remove_named_policy
        else:
            op = self._enforcer.add_named_grouping_policy if add else self._enforcer.remove_named_grouping_policy
        return bool(op(ptype, *rule))

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
