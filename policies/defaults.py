"""The default rule set: what each role may do, with separation of duties written as deny rules.

Every rule uses the agency ``*`` as its domain, meaning "in whichever agency the role
is held": a grant of ``analyst`` in ``health`` lets the analyst rules apply in
``health`` only, while a grant in ``*`` (oversight, server-wide stewards) applies in
every agency. Objects follow :mod:`civicdp.policies.objects`; the server authorises a query
with ``check_all(subject, agency, ["dataset:<ds>", "column:<ds>/<col>", ...],
Action.QUERY_RUN, epsilon)`` — the dataset first, then every column the query groups
by, filters on or aggregates. Analysts may spend up to 0.5 per query on the dataset
as a whole (counts) and on public columns, 0.1 on quasi-identifiers, and never touch
sensitive columns. Stewards and oversight are *denied* queries outright, so a
mistaken grant or allow rule cannot give a steward or an auditor data access: deny
overrides. The caps are the defaults of GOVERNANCE.md, to be ratified by an
oversight body; period and lifetime budgets live in the SQL ledger, not here.
"""

from __future__ import annotations

from typing import Protocol

from civicdp.policies.actions import QUERY_ACTIONS, Action, ColumnClass, Role
from civicdp.policies.objects import ALL_DATASETS, ALL_FEEDS, SERVER, WILDCARD, class_group

PUBLIC_CAP = "0.5"
QUASI_CAP = "0.1"
DATASET_CAP = PUBLIC_CAP  # a query naming no column (a row count) is as revealing as one on a public column

STEWARD_SERVER_ACTIONS = (
    Action.ACCOUNT_MANAGE, Action.KEY_MANAGE, Action.ROLE_MANAGE, Action.POLICY_MANAGE,
    Action.DATASET_MANAGE, Action.BUDGET_MANAGE, Action.DATASET_LIST, Action.BUDGET_READ_ALL,
    Action.FEED_MANAGE, Action.MONITOR_MANAGE, Action.MONITOR_READ,
)
OVERSIGHT_SERVER_ACTIONS = (Action.AUDIT_READ, Action.BUDGET_READ_ALL, Action.DATASET_LIST, Action.MONITOR_READ)


class RuleSink(Protocol):
    """What :func:`default_rules` needs of a store (``PolicyStore`` has it)."""

    def allow(self, subject_or_role: str, agency: str, obj: str, action: Action | str,
              cap: float | str = ...) -> bool: ...

    def deny(self, subject_or_role: str, agency: str, obj: str, action: Action | str,
             cap: float | str = ...) -> bool: ...


def default_rules(store: RuleSink) -> None:
    """Add the default rules to ``store`` (rules already present are left as they are)."""
    every = WILDCARD
    analyst, steward, oversight = Role.ANALYST, Role.STEWARD, Role.OVERSIGHT

    for action in (Action.DATASET_LIST, Action.BUDGET_READ_OWN, Action.MONITOR_SUBSCRIBE):
        store.allow(analyst, every, SERVER, action)
    for action in (Action.DATASET_LIST, Action.DATASET_READ, Action.RELEASE_READ):
        store.allow(analyst, every, ALL_DATASETS, action)
    for action in sorted(QUERY_ACTIONS):
        store.allow(analyst, every, ALL_DATASETS, action, DATASET_CAP)
        store.allow(analyst, every, class_group(ColumnClass.PUBLIC), action, PUBLIC_CAP)
        store.allow(analyst, every, class_group(ColumnClass.QUASI), action, QUASI_CAP)
        store.deny(analyst, every, class_group(ColumnClass.SENSITIVE), action)

    for action in STEWARD_SERVER_ACTIONS:
        store.allow(steward, every, SERVER, action)
    for action in (Action.DATASET_LIST, Action.DATASET_READ, Action.DATASET_MANAGE):
        store.allow(steward, every, ALL_DATASETS, action)

    for action in OVERSIGHT_SERVER_ACTIONS:
        store.allow(oversight, every, SERVER, action)
    for action in (Action.DATASET_LIST, Action.DATASET_READ, Action.RELEASE_READ):
        store.allow(oversight, every, ALL_DATASETS, action)

    # Separation of duties, whatever else is granted: stewards and oversight never read data,
    # neither by a query nor through a feed they could define and share with themselves.
    for action in (*sorted(QUERY_ACTIONS), Action.FEED_READ):
        store.deny(steward, every, WILDCARD, action)
        store.deny(oversight, every, WILDCARD, action)

    store.allow(Role.FEED_CONSUMER, every, ALL_FEEDS, Action.FEED_READ)
