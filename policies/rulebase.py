"""The Casbin enforcer under the policy store: built from ``model.conf``, arity-checked, kept in step with storage.

:class:`RuleBase` owns the ``casbin.SyncedEnforcer``, the optional storage adapter the
server hands in (``sqlalchemy_adapter.Adapter(engine)``; without one the rules live in
memory), the store's lock, and the one way a rule is changed (:meth:`RuleBase._mutate`).
Every rule has the six fields ``subject-or-role, agency, object, action, cap, effect`` --
exactly the adapter's ``v0..v5``; :meth:`RuleBase.check_arity` refuses, at start-up and
after every load, a model or stored rule of another width, because the adapter silently
cuts longer rules.

With a :class:`civicdp.policies.storage.VersionedAdapter` the stored rules are the one source of
truth for every process: each change is made in the database first (the row count says
whether anything changed, so a grant already held or a revoke of nothing reports False
whatever this process remembered), and the policy version moves in the same
transaction. Before deciding, the store asks its :class:`~civicdp.policies.storage.PolicyVersionWatcher`
whether the version moved (``refresh_seconds``: at most that long between looks; 0:
before every decision) and reloads every rule if it did, which also drops what was
derived from the rules (:meth:`RuleBase._forget`). A change made by another process --
the command line, another worker -- is therefore in force at this process's next decision.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib import resources

import casbin
from casbin.persist.adapter import Adapter

from civicdp.policies.errors import RuleArityMismatch
from civicdp.policies.storage import PolicyVersionWatcher, VersionedAdapter

#: The SQLAlchemy adapter stores a rule in columns v0..v5 and silently drops the rest.
MAX_FIELDS = 6
ALLOW, DENY = "allow", "deny"
MODEL_TEXT = resources.files(__package__).joinpath("model.conf").read_text(encoding="utf-8")


def show_rule(rule: Sequence[str]) -> str:
    """A rule as it appears in reasons and errors: ``[analyst, *, dataset:*, query.run, 0.5, allow]``."""
    return "[" + ", ".join(rule) + "]"


class RuleBase:
    """The enforcer, its adapter and watcher, and the changes, loads and saves of its rules."""

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
                            f"The stored {ptype} rule {show_rule(rule)} has {len(rule)} fields but the model defines "
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
        """Drop what is derived from the rules; called after every change and load.

        Nothing here: the decisions (:mod:`civicdp.policies.decisions`) extend it to drop
        their object index and memoised decisions.
        """

    # -- the one way a rule changes -------------------------------------------------------

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
