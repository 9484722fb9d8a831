"""``/docs`` and ``/redoc`` render in Chromium with the network off, every asset served by the server,
and nothing the pages' Content-Security-Policy refuses (an inline script or style would be)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import LiveServer, screenshot

pytestmark = pytest.mark.browser


#: ReDoc 2.5's sidebar footer shows Redocly's logo from its CDN, hard-coded (no option turns it off).
#: The page's CSP refuses it before any request is made (and ReDoc hides the image when it fails),
#: so the one refusal the pages may show is that one.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


class Watched:
    """What a page did wrong: CSP refusals and other console errors, failed or refused loads."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        self.failed: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("requestfailed", lambda request: self.failed.append(f"{request.url}: {request.failure}"))
        page.on("response", lambda answer: answer.status >= 400 and self.failed.append(f"{answer.url}: {answer.status}"))

    def assert_clean(self, refused_logo: bool = False) -> None:
        """Nothing failed (with ``refused_logo``: except the CSP's refusal of ReDoc's logo)."""
        failed, errors = self.failed, self.errors
        if refused_logo:
            assert f"{REDOC_LOGO}: csp" in failed, failed
            failed = [f for f in failed if f != f"{REDOC_LOGO}: csp"]
            errors = [e for e in errors if not (REDOC_LOGO in e and "Content Security Policy" in e)]
        assert failed == [], failed
        assert errors == [], errors


@pytest.fixture
def watched(page: Any) -> Iterator[Watched]:
    yield Watched(page)


def _operations(live_server: LiveServer) -> list[tuple[str, str]]:
    schema = live_server.get(None, "/openapi.json").json()
    return sorted((method.upper(), path) for path, item in schema["paths"].items() for method in item)


def test_swagger_ui_shows_every_operation_offline(page: Any, watched: Watched, live_server: LiveServer) -> None:
    page.goto("/docs")
    page.locator(".opblock").first.wait_for()
    shown = page.eval_on_selector_all(
        ".opblock-summary", """blocks => blocks.map(b => [
            b.querySelector('.opblock-summary-method').textContent.trim(),
            b.querySelector('.opblock-summary-path').getAttribute('data-path')])""")
    assert sorted(map(tuple, shown)) == _operations(live_server)
    assert page.locator(".info .title").first.inner_text().startswith("civicdp")
    page.locator(".opblock-summary", has_text="/v1/queries").first.click()  # opens; the body example shows
    page.locator(".opblock-body").first.wait_for()
    screenshot(page, "docs-swagger-ui")
    watched.assert_clean()


def test_redoc_renders_offline(page: Any, watched: Watched, live_server: LiveServer) -> None:
    page.goto("/redoc")
    page.locator("h1", has_text="civicdp").wait_for()
    operations = page.locator("[data-section-id^='operation/']")
    operations.first.wait_for()
    assert operations.count() == len(_operations(live_server))
    page.locator("[data-section-id^='operation/']", has_text="/v1/queries").first.scroll_into_view_if_needed()
    watched.assert_clean(refused_logo=True)


def test_the_pages_send_their_policy_and_inline_script_would_be_refused(page: Any, live_server: LiveServer) -> None:
    """The page CSP is enforced: a script added inline after load does not run."""
    for path in ("/docs", "/redoc"):
        answer = page.goto(path)
        assert answer is not None
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy and "http" not in policy
        ran = page.evaluate("""() => { const s = document.createElement('script');
            s.textContent = 'window.__inline_ran = true'; document.body.appendChild(s);
            return window.__inline_ran === true; }""")
        assert ran is False, f"an inline script ran on {path}"
