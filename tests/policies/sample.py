"""Sample policy data for the tests: the default rules, a few accounts and one classified dataset.

Accounts (subjects are ``account:<name>``, as the server makes them)::

    ana-health      analyst in health          ana-transport   analyst in transport
    steward         steward in * (server-wide) steward-health  steward in health
    oversight       oversight in *             feed-health     feed_consumer in health

Dataset ``civic-demo`` (in every agency): ``service`` and ``channel`` public,
``waiting_minutes`` quasi-identifying, ``remark`` sensitive. Dataset ``health-only``
exists in agency ``health`` alone. Feed ``weekly`` exists in every agency.
"""

from __future__ import annotations

from civicdp.policies.actions import ColumnClass, Role
from civicdp.policies.defaults import default_rules
from civicdp.policies.enforcer import PolicyStore

ACCOUNTS = {
    "ana-health": (Role.ANALYST, "health"),
    "ana-transport": (Role.ANALYST, "transport"),
    "steward": (Role.STEWARD, "*"),
    "steward-health": (Role.STEWARD, "health"),
    "oversight": (Role.OVERSIGHT, "*"),
    "feed-health": (Role.FEED_CONSUMER, "health"),
}
COLUMNS = {
    "service": ColumnClass.PUBLIC,
    "channel": ColumnClass.PUBLIC,
    "waiting_minutes": ColumnClass.QUASI,
    "remark": ColumnClass.SENSITIVE,
}


def populate(store: PolicyStore) -> PolicyStore:
    """Add the default rules, the accounts, the datasets and the feed of this module's docstring."""
    default_rules(store)
    for name, (role, agency) in ACCOUNTS.items():
        store.grant(f"account:{name}", role, agency)
    for column, column_class in COLUMNS.items():
        store.assign_public_column("civic-demo", column)
        if column_class is not ColumnClass.PUBLIC:
            store.classify_column("civic-demo", column, column_class)
    store.assign_public_column("health-only", "service", agency="health")
    store.register_feed("weekly")
    return store


def build_store() -> PolicyStore:
    """A fresh in-memory store, populated."""
    return populate(PolicyStore())
