"""Signing a TestClient into the web console as one of the demo accounts (see ``api_fixtures``)."""

from __future__ import annotations

import re
import warnings

from tests.server.api_fixtures import Api

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def browser_of(api: Api) -> TestClient:
    """A client of the running app with a cookie jar of its own (one per signed-in person)."""
    return TestClient(api.client.app, follow_redirects=False)  # type: ignore[arg-type]


def sign_in(api: Api, who: str) -> TestClient:
    """A client signed in to the console with ``who``'s key."""
    client = browser_of(api)
    form = client.get("/console/sign-in")
    assert form.status_code == 200, form.text
    pre = re.search(r'name="pre" value="([^"]+)"', form.text)
    assert pre is not None
    answer = client.post("/console/session", data={"key": api.keys[who], "pre": pre[1]})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/console/"
    return client


def csrf_of(client: TestClient, path: str = "/console/") -> str:
    """The CSRF token the session's pages carry."""
    found = CSRF.search(client.get(path).text)
    assert found is not None
    return found[1]
