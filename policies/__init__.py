"""Who may do what: the Casbin access policy of civicdp.

``actions`` names the roles, actions and column classes; ``objects`` the objects and
groups rules talk about; ``model.conf`` is the Casbin model (RBAC with agencies as
domains, object groups, deny overrides allow, per-query epsilon caps checked by
``caps``); ``enforcer.PolicyStore`` stores rules (in memory or through an adapter the
server hands in) and answers ``check``/``check_all`` for an account and
``check_role``/``check_role_all`` for a holder of a role with a ``Decision``. It is
assembled from ``rulebase`` (the enforcer, its storage and arity), ``administration``
(grants, rules, object groups), ``decisions`` (the decisions) and ``catalog``
(registering datasets, columns and feeds); ``storage`` is the versioned SQL adapter and
``defaults`` holds the default rule set. This package imports nothing of the project and
no web framework.
"""
