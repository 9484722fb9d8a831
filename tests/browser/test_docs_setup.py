"""The browser set-up itself: chromium drives the live server, and a context cannot leave loopback."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import OUTPUT, Blocked, LiveServer, take_offline

pytestmark = pytest.mark.browser


def test_the_browser_reaches_the_live_server(page: Any, live_server: LiveServer) -> None:
    answer = page.goto("/v1/health")
    assert answer is not None and answer.status == 200
    assert '"status"' in page.content()
    assert live_server.keys.keys() >= {"steward", "ana-health", "oversight", "feed-health"}


def test_requests_to_other_hosts_are_aborted_and_recorded(browser: Any, live_server: LiveServer) -> None:
    context = browser.new_context(base_url=live_server.url)
    blocked: Blocked = take_offline(context)
    try:
        page = context.new_page()
        page.set_content("<p>a page without the server's CSP, which would refuse the fetch itself</p>")
        outcome = page.evaluate("""async () => {
            try { await fetch('http://example.org/x.js'); return 'fetched'; }
            catch (error) { return 'refused'; } }""")
        assert outcome == "refused"
        assert blocked.urls == ["http://example.org/x.js"]
    finally:
        context.close()


def test_the_page_fixture_saves_a_screenshot(page: Any) -> None:
    page.goto("/v1/health")
    from tests.browser.conftest import screenshot

    path = screenshot(page, "setup-health")
    assert path.parent == OUTPUT and path.stat().st_size > 0
