"""A feed answers its consumer agencies no more than they could ask themselves (issue 19).

A steward defines a feed, and the feed consumers of its agencies read the answers; so
the steward must not be able to give an agency, through a feed, a query its own analysts
would be refused — a loss above the per-query cap, a quasi-identifier above its smaller
cap, a sensitive column at all. Each spec of a feed is therefore held, for each consumer
agency, to exactly the decision a query by that agency gets: the one
:meth:`~civicdp.server.services.query_service.QueryService.authorise` asks with
``check_all(subject, agency, objects, Action.QUERY_RUN, epsilon)``, with the same objects
(the dataset, then each column the spec reads) and the same epsilon (what the spec spends
in one release), asked of a holder of :data:`QUERY_ROLE` in that agency
(:meth:`~civicdp.policies.decisions.PolicyDecisions.check_role_all`).

The role is ``analyst``, not ``feed_consumer``: in the default rules a feed consumer may
only read feeds (``feed.read``, which has no per-query cap) and is refused every query,
so asking about ``feed_consumer`` would refuse every feed and say nothing about caps or
column classes. The analyst is who asks "a query by that agency", and the analyst's
rules (caps, column classes, deny rules naming the agency) are the ones a feed must keep.

The consumer agencies are the feed's agencies; a feed shared with ``*`` (every agency)
is asked of a holder of the role in every agency, acting in ``*`` — the rules that hold
everywhere — and, as well, in each agency where an account holds ``feed_consumer`` now.
The question is asked when the feed is defined, when it is shared with another agency,
and before every period's charge, so a rule tightened after the definition refuses the
next release before anything is charged (the period is recorded as refused, as a budget
refusal is; a rule changed between this check and the charge applies from the next
period, as for a query, which is authorised and then charged).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.policies.actions import Action, Role
from civicdp.policies.decisions import Decision
from civicdp.policies.enforcer import PolicyStore
from civicdp.policies.objects import WILDCARD
from civicdp.server.feeds.approval import Plans
from civicdp.server.services.query_service import QueryService
from civicdp.server.state.caller import subject_of
from civicdp.server.state.db import reader
from civicdp.server.state.errors import AccessDenied
from civicdp.server.state.models import Account

#: Whose query a feed's spec is held to, and as which action: a query by an analyst of the agency.
QUERY_ROLE = Role.ANALYST
QUERY_ACTION = Action.QUERY_RUN


class ConsumerRefused(AccessDenied):
    """A spec of a feed that one of its consumer agencies could not ask as a query (403, with the rule)."""

    def __init__(self, feed: str, spec: int, agency: str, decision: Decision) -> None:
        who = "every agency" if agency == WILDCARD else f"agency '{agency}'"
        super().__init__(f"specs[{spec}] of feed '{feed}' would not be allowed as a query by {who}, a consumer of "
                         f"the feed: {decision.reason}. A feed is held to the rules of a query by each agency it "
                         "is shared with (a holder of 'analyst' there); spend less per release, read other "
                         "columns, or share the feed with other agencies", decision.rule)
        self.spec, self.agency, self.decision = spec, agency, decision


def consumer_agencies(db: DbEngine, policies: PolicyStore, agencies: Iterable[str]) -> list[str]:
    """The agencies whose queries a feed shared with ``agencies`` is held to (``*`` expanded, see above)."""
    named = set(agencies)
    if WILDCARD in named:
        with Session(reader(db)) as session:
            accounts = list(session.exec(select(Account.name, Account.agency)))
        named |= {agency for name, agency in accounts
                  if any(role is Role.FEED_CONSUMER for role, _ in policies.roles_of(subject_of(name)))}
    return sorted(named, key=lambda agency: (agency != WILDCARD, agency))


def authorise(policies: PolicyStore, feed: str, plans: Plans, agencies: Iterable[str]) -> None:
    """Every spec as a query by each agency of ``agencies``; ConsumerRefused names the first refused."""
    for agency in agencies:
        for i, (_, plan) in enumerate(plans):
            decision = policies.check_role_all(QUERY_ROLE, agency, QueryService.objects(plan), QUERY_ACTION,
                                               plan.loss.as_dict()["epsilon"])
            if not decision.allowed:
                raise ConsumerRefused(feed, i, agency, decision)
