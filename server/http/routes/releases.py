"""Stored releases: what was answered, at what loss, with the hash of what left."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Path

from civicdp.policies.actions import Action
from civicdp.server.state import registry
from civicdp.server.state.caller import Caller
from civicdp.server.http.deps import CurrentCaller, ReadSession, StateDep, authorize
from civicdp.server.state.errors import NOT_VISIBLE, AccessDenied
from civicdp.server.state.models import Account, Release
from civicdp.server.http.routes.common import errors
from civicdp.server.services.schemas import Loss, ReleaseOut

router = APIRouter(prefix="/releases", tags=["releases"])
#: Release ids are positive 64-bit integers; larger ones cannot be looked up in SQL at all.
ReleaseId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("/{release_id}", response_model=ReleaseOut, responses=errors(401, 403, 422),
            summary="One release's query, loss and result hash (your agency's, unless shared)")
def get_release(release_id: ReleaseId, caller: CurrentCaller, state: StateDep, session: ReadSession) -> ReleaseOut:
    release = session.get(Release, release_id)
    # One 403 text whether the release does not exist, is another agency's, or the dataset is not
    # readable: walking sequential ids tells nothing.
    refused = AccessDenied(NOT_VISIBLE.format(what="release", name=release_id))
    if release is None:
        raise refused
    try:
        authorize(state, caller, Action.RELEASE_READ, f"dataset:{release.dataset}")
    except AccessDenied:
        raise refused from None
    if not _visible_across_agencies(state, caller, session, release):
        raise refused
    loss = registry.metadata_of(registry.get(session, release.dataset)).accounting.rule.shown(release.loss_micro)
    return ReleaseOut(id=release.id or 0, dataset=release.dataset, dataset_version=release.dataset_version,
                      query=json.loads(release.canonical_query), loss=Loss(**loss), result_hash=release.result_hash,
                      created_at=release.created_at)


def _visible_across_agencies(state: StateDep, caller: Caller, session: ReadSession, release: Release) -> bool:
    """An agency sees its own releases' queries; roles held in every agency (stewards, oversight)
    see all; an agency may share its releases with everyone (``CIVICDP_SHARED_RELEASE_AGENCIES``)."""
    owner = session.get(Account, release.account_id) if release.account_id else None
    agency = owner.agency if owner else None
    if agency is None or agency == caller.agency or agency in state.settings.shared_release_agencies:
        return True
    return any(role_agency == "*" for _, role_agency in state.policies.roles_of(caller.subject))
