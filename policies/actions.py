"""Roles, actions and column classes of the access policy, in one place.

Routes, the policy store and the default rules name roles and actions only through
these enums, never as string literals. They are ``StrEnum``s: a member *is* its
value (``Action.QUERY_RUN == "query.run"``), so it can be stored in a Casbin rule,
written to the audit log or sent over HTTP as is. ``QUERY_ACTIONS`` are the actions
that spend (or price) privacy loss: a request for one of them must state the epsilon
it would spend, and is held to the per-query cap of the rule that allows it.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """What an account may be granted in an agency (or in every agency, ``*``)."""

    STEWARD = "steward"
    ANALYST = "analyst"
    OVERSIGHT = "oversight"
    FEED_CONSUMER = "feed_consumer"


class Action(StrEnum):
    """Everything the server asks the policy about."""

    DATASET_LIST = "dataset.list"
    DATASET_READ = "dataset.read"  # public metadata only
    QUERY_ESTIMATE = "query.estimate"
    QUERY_RUN = "query.run"
    RELEASE_READ = "release.read"
    BUDGET_READ_OWN = "budget.read_own"
    BUDGET_READ_ALL = "budget.read_all"
    ACCOUNT_MANAGE = "account.manage"
    KEY_MANAGE = "key.manage"
    ROLE_MANAGE = "role.manage"
    POLICY_MANAGE = "policy.manage"
    DATASET_MANAGE = "dataset.manage"
    BUDGET_MANAGE = "budget.manage"
    AUDIT_READ = "audit.read"
    FEED_READ = "feed.read"
    FEED_MANAGE = "feed.manage"  # define feeds and trigger releases
    MONITOR_MANAGE = "monitor.manage"  # define monitors, append their batches (stewards)
    MONITOR_READ = "monitor.read"  # monitors, their losses, releases and alerts (oversight, stewards)
    MONITOR_SUBSCRIBE = "monitor.subscribe"  # follow a monitor of one's own agency and read its alerts


class ColumnClass(StrEnum):
    """How identifying a column is; decides the per-query cap an analyst gets on it."""

    PUBLIC = "public"
    QUASI = "quasi"  # quasi-identifier: combined with others it can single a person out
    SENSITIVE = "sensitive"  # never queried by analysts


#: Actions that spend or price privacy loss: they need an epsilon and obey per-query caps.
QUERY_ACTIONS = frozenset({Action.QUERY_RUN, Action.QUERY_ESTIMATE})
