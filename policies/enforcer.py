"""The policy store: Casbin decides who may do what, in which agency, on which object, up to which epsilon.

:class:`PolicyStore` is what the server holds: a ``casbin.SyncedEnforcer`` built from
``model.conf`` (package data next to this module) and an optional storage adapter handed
in by the server (``sqlalchemy_adapter.Adapter(engine)``; without one the rules live in
memory). It is assembled from one module per job:

* :mod:`civicdp.policies.rulebase` -- the enforcer, its adapter and watcher: the six-field
  arity check (:meth:`PolicyStore.check_arity`), load, save, refresh and the policy
  version, and the one way a rule changes;
* :mod:`civicdp.policies.administration` -- grants of roles, allow and deny rules, object
  groups, each value checked before it is stored;
* :mod:`civicdp.policies.decisions` -- :class:`Decision`, :meth:`PolicyStore.check` and
  :meth:`PolicyStore.check_all` for an account, :meth:`PolicyStore.check_role` and
  :meth:`PolicyStore.check_role_all` for a holder of a role (the same rules, e.g. for a
  feed defined for other agencies), deny by default, deny overrides, per-query caps;
* :mod:`civicdp.policies.catalog` -- registering datasets, columns and feeds.

The names other code imports from here (``PolicyStore``, ``Decision``, ``MAX_FIELDS``,
``MODEL_TEXT``, ``ALLOW``, ``DENY``) stay importable from here.
"""

from __future__ import annotations

from civicdp.policies.catalog import CatalogMixin
from civicdp.policies.decisions import Decision, PolicyDecisions
from civicdp.policies.rulebase import ALLOW, DENY, MAX_FIELDS, MODEL_TEXT

__all__ = ["ALLOW", "DENY", "MAX_FIELDS", "MODEL_TEXT", "Decision", "PolicyStore"]


class PolicyStore(PolicyDecisions, CatalogMixin):
    """Rules, grants and object groups, and the enforcement of them.

    ``PolicyStore(adapter=None, *, model_text=MODEL_TEXT, refresh_seconds=0.0)``.
    """
