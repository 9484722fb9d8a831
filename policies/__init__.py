"""Who may do what: the Casbin access policy of civicdp.

``actions`` names the roles, actions and column classes; ``objects`` the objects and
groups rules talk about; ``model.conf`` is the Casbin model (RBAC with agencies as
domains, object groups, deny overrides allow, per-query epsilon caps checked by
``caps``); ``enforcer.PolicyStore`` stores rules (in memory or through an adapter the
server hands in) and answers ``check``/``check_all`` with a ``Decision``; ``catalog``
registers datasets, columns and feeds; ``defaults`` holds the default rule set. This
package imports nothing of the project and no web framework.
"""
