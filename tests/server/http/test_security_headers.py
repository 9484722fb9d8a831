"""Every answer carries the security headers; pages get the page policy, a route's own CSP stays."""

from __future__ import annotations

import warnings

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, PlainTextResponse

from civicdp.server.http.security_headers import OTHER_POLICY, PAGE_POLICY, SecurityHeadersMiddleware, page_policy
from tests.server.api_fixtures import ANALYST, Api, api, count_query, dataset_folder  # noqa: F401 - fixtures

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


def _fixed(headers: object) -> None:
    assert headers["x-content-type-options"] == "nosniff"  # type: ignore[index]
    assert headers["referrer-policy"] == "no-referrer"  # type: ignore[index]
    assert headers["x-frame-options"] == "DENY"  # type: ignore[index]


def _small_app() -> TestClient:
    app = FastAPI()

    @app.get("/page", response_class=HTMLResponse)
    def page() -> str:
        return "<p>hello</p>"

    @app.get("/own", response_class=HTMLResponse)
    def own() -> HTMLResponse:
        return HTMLResponse("<p>own</p>", headers={"Content-Security-Policy": "default-src 'none'"})

    @app.get("/text", response_class=PlainTextResponse)
    def text() -> str:
        return "<script>alert(1)</script>"

    app.add_middleware(SecurityHeadersMiddleware)
    return TestClient(app)


def test_the_page_policy_allows_the_server_alone_and_no_inline_script() -> None:
    directives = dict(part.split(" ", 1) for part in PAGE_POLICY.split("; "))
    assert directives["script-src"] == "'self'" and "unsafe" not in PAGE_POLICY
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
    assert all(source in ("'self'", "'none'", "data:", "blob:") for value in directives.values()
               for source in value.split())
    assert "style-src 'self' 'unsafe-inline'" in page_policy(style_src="'self' 'unsafe-inline'")


def test_an_html_answer_gets_the_page_policy_and_others_get_none() -> None:
    with _small_app() as client:
        page, text = client.get("/page"), client.get("/text")
        missing = client.get("/nowhere")
    assert page.headers["content-security-policy"] == PAGE_POLICY
    for answer in (text, missing):
        assert answer.headers["content-security-policy"] == OTHER_POLICY
    for answer in (page, text, missing):
        _fixed(answer.headers)


def test_a_routes_own_policy_is_kept_not_doubled() -> None:
    with _small_app() as client:
        answer = client.get("/own")
    assert answer.headers.get_list("content-security-policy") == ["default-src 'none'"]
    _fixed(answer.headers)


def test_the_apps_answers_carry_them_cached_and_refused_too(api: Api) -> None:  # noqa: F811
    # Asked three times: computed, cached by the full path, then by the lean path (server/http/lean.py).
    answers = [api.query(ANALYST, count_query()) for _ in range(3)]
    assert [(a.status_code, a.json()["cached"]) for a in answers] == [(200, False), (200, True), (200, True)]
    refused = api.query(None, count_query())
    assert refused.status_code == 401
    for answer in (*answers, refused, api.get(None, "/v1/health")):
        assert answer.headers["content-security-policy"] == OTHER_POLICY
        _fixed(answer.headers)
