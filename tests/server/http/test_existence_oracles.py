"""No existence oracle: one 403 text for anything the caller may not see, existing or not.

``GET /v1/datasets/{x}``, ``/v1/monitors/{x}`` and ``/v1/releases/{n}`` answered 404 for
missing things and 403 (or 200) for existing ones, so walking names or sequential ids
told what exists; analysts could read every agency's release queries. Now a caller gets
the same status and text for a missing thing as for one they may not see, and an agency
sees its own releases' queries only (stewards and oversight all; shared agencies by
setting).
"""

from __future__ import annotations

from pathlib import Path

from tests.server.api_fixtures import ANALYST, OTHER_ANALYST, OVERSIGHT, Api, api, count_query  # noqa: F401
from tests.server.api_fixtures import dataset_folder, running_api  # noqa: F401


def _same(a: object, b: object) -> bool:
    return a.status_code == b.status_code and a.json()["error"] == b.json()["error"]  # type: ignore[attr-defined]


def test_releases_of_another_agency_and_missing_ones_look_alike(api: Api) -> None:  # noqa: F811
    release = api.query(ANALYST, count_query(epsilon=0.1)).json()["release_id"]
    assert api.get(ANALYST, f"/v1/releases/{release}").status_code == 200
    assert api.get(OVERSIGHT, f"/v1/releases/{release}").status_code == 200  # oversight reads all
    theirs = api.get(OTHER_ANALYST, f"/v1/releases/{release}")
    missing = api.get(OTHER_ANALYST, f"/v1/releases/{release + 1000}")
    assert theirs.status_code == missing.status_code == 403
    assert theirs.json()["detail"].replace(str(release), "N") == missing.json()["detail"].replace(
        str(release + 1000), "N")


def test_an_agency_may_share_its_releases(tmp_path: Path, dataset_folder: Path) -> None:  # noqa: F811
    with running_api(tmp_path / "state", dataset_folder, shared_release_agencies=["health"]) as shared:
        release = shared.query(ANALYST, count_query(epsilon=0.1)).json()["release_id"]
        assert shared.get(OTHER_ANALYST, f"/v1/releases/{release}").status_code == 200


def test_a_missing_dataset_and_a_hidden_one_get_one_text(api: Api) -> None:  # noqa: F811
    missing = api.get(ANALYST, "/v1/datasets/no-such-dataset")
    assert missing.status_code == 403
    assert missing.json()["detail"] == "you may not read dataset 'no-such-dataset', or it does not exist"


def test_a_missing_monitor_looks_like_another_agencys_to_an_analyst(api: Api) -> None:  # noqa: F811
    missing = api.get(ANALYST, "/v1/monitors/no-such-monitor")
    assert missing.status_code == 403 and missing.json()["detail"] == "no rule lets you read this monitor"
    subscribe = api.post(ANALYST, "/v1/monitors/no-such-monitor/subscriptions", json={})
    assert subscribe.status_code == 403 and "only to your agency's" in subscribe.json()["detail"]
    assert api.get(OVERSIGHT, "/v1/monitors/no-such-monitor").status_code == 404  # oversight sees every monitor
