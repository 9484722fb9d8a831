"""Stored releases: what was answered, at what loss, with the hash of what left."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Path

from policies.actions import Action
from server.deps import CurrentCaller, ReadSession, StateDep, authorize
from server.errors import NotFound
from server.models import Release
from server.routes.common import errors
from server.schemas import Loss, ReleaseOut

router = APIRouter(prefix="/releases", tags=["releases"])
#: Release ids are positive 64-bit integers; larger ones cannot be looked up in SQL at all.
ReleaseId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("/{release_id}", response_model=ReleaseOut, responses=errors(401, 403, 404, 422),
            summary="One release's query, loss and result hash")
def get_release(release_id: ReleaseId, caller: CurrentCaller, state: StateDep, session: ReadSession) -> ReleaseOut:
    release = session.get(Release, release_id)
    if release is None:
        raise NotFound(f"no release {release_id}")
    authorize(state, caller, Action.RELEASE_READ, f"dataset:{release.dataset}")
    return ReleaseOut(id=release.id or 0, dataset=release.dataset, dataset_version=release.dataset_version,
                      query=json.loads(release.canonical_query),
                      loss=Loss(epsilon=release.loss_micro / 1_000_000), result_hash=release.result_hash,
                      created_at=release.created_at)
