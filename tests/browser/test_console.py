"""The web console in real Chromium: each role signs in and sees only its pages, a query's interval
chart, a steward's cap change seen by oversight, the log verified in the browser and a tampered copy
caught. Screenshots of each page go to tests-output/browser/.

These tests change the session's live server (a cap, a release, a checkpoint): later tests must
not count on its budgets as the demo left them.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import LiveServer, screenshot

pytestmark = pytest.mark.browser


def sign_in(page: Any, server: LiveServer, who: str) -> None:
    page.goto("/console/sign-in")
    page.fill("input[name=key]", server.keys[who])
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url.endswith("/console/"), page.inner_text("main")
    assert who in page.inner_text("header")


#: Pages each role must be refused (403, the refusal shown), and a page it may open.
REFUSED = {"ana-health": ["/console/audit", "/console/oversight", "/console/steward"],
           "feed-health": ["/console/query", "/console/audit", "/console/analyst"],
           "steward": ["/console/audit", "/console/verify"],
           "oversight": ["/console/steward", "/console/analyst"]}
ALLOWED = {"ana-health": "/console/analyst", "feed-health": "/console/feeds", "steward": "/console/steward",
           "oversight": "/console/oversight"}


@pytest.mark.parametrize("who", sorted(REFUSED), ids=sorted(REFUSED))
def test_each_role_sees_only_what_it_may(page: Any, live_server: LiveServer, who: str) -> None:
    sign_in(page, live_server, who)
    screenshot(page, f"console-home-{who}")
    for path in REFUSED[who]:
        answer = page.goto(path)
        assert answer is not None and answer.status == 403, path
        assert page.locator("#refusal").is_visible()
    answer = page.goto(ALLOWED[who])
    assert answer is not None and answer.status == 200
    screenshot(page, f"console-{who}-{ALLOWED[who].rsplit('/', 1)[1]}")


def test_an_analyst_sees_the_estimate_then_the_interval_chart(page: Any, live_server: LiveServer) -> None:
    sign_in(page, live_server, "ana-health")
    page.goto("/console/query")
    page.select_option("#examples", label="Bundles (analysis)")  # an analysis is priced the same way
    page.click("#estimate")
    assert "epsilon 0.5" in page.inner_text("#estimate-table")
    page.select_option("#examples", label="Count by channel")
    page.click("#estimate")
    assert "epsilon 0.1" in page.inner_text("#estimate-table")
    screenshot(page, "console-analyst-estimate")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#run")
    page.wait_for_selector("body[data-charts='1']")
    assert page.locator("#interval-chart").bounding_box()["height"] > 50
    assert page.locator("#result tr").count() > 1
    screenshot(page, "console-analyst-result")


def test_a_stewards_cap_change_is_seen_in_the_oversight_view(context: Any, browser: Any,
                                                             live_server: LiveServer) -> None:
    steward = context.new_page()
    sign_in(steward, live_server, "steward")
    steward.goto("/console/steward")
    steward.select_option("#cap-form select[name=scope]", "agency")
    steward.fill("#cap-form input[name=subject]", "health")
    steward.fill("#cap-form input[name=epsilon]", "4.25")
    steward.on("dialog", lambda dialog: dialog.accept())
    steward.click("#cap-form button")
    assert "Cap set" in steward.inner_text("#done")
    assert "4.25" in steward.inner_text("#caps")
    screenshot(steward, "console-steward-cap-set")
    oversight_context = browser.new_context(base_url=live_server.url)
    try:
        oversight = oversight_context.new_page()
        sign_in(oversight, live_server, "oversight")
        oversight.goto("/console/audit?action=budget.set_cap")
        rows = oversight.locator("#entries tr")
        assert rows.count() >= 2 and "steward" in rows.last.inner_text()
        rows.last.locator("a").click()
        assert "4250000" in oversight.inner_text("#raw")
        screenshot(oversight, "console-oversight-cap-entry")
        spec = {"dataset": live_server.dataset, "aggregate": "count", "group_by": ["channel"], "epsilon": 0.031}
        assert live_server.post("ana-health", "/v1/queries", json=spec).status_code == 200  # a charge to draw
        oversight.goto("/console/oversight")
        oversight.wait_for_selector("body[data-charts]")
        # A chart per kind of scope the charge moved (analyst, agency, dataset, lifetime) and the refusals'.
        assert int(oversight.get_attribute("body", "data-charts")) >= 5
        assert "4.25" in oversight.inner_text("#budgets")
        screenshot(oversight, "console-oversight-budgets")
    finally:
        oversight_context.close()


def test_a_steward_creates_an_account_and_issues_its_key_shown_once(page: Any, live_server: LiveServer) -> None:
    sign_in(page, live_server, "steward")
    page.goto("/console/steward")
    page.on("dialog", lambda dialog: dialog.accept())  # each change is confirmed first
    page.fill("#account-form input[name=name]", "console-clerk")
    page.fill("#account-form input[name=agency]", "housing")
    page.click("#account-form button")
    assert "Account created" in page.inner_text("#done")
    assert "console-clerk" in page.inner_text("#accounts")
    page.select_option("#key-form select[name=account]", "console-clerk")
    with page.expect_navigation():
        page.click("#key-form button")
    secret = page.inner_text("#issued-key")
    screenshot(page, "console-steward-key-issued")
    assert live_server.get(None, "/v1/datasets", headers={"Authorization": f"Bearer {secret}"}).status_code != 401
    page.goto("/console/steward")
    assert secret not in page.content() and secret.split("_")[1] in page.inner_text("#keys")


def _tampered(route: Any) -> None:
    """The entries as served, with one character of entry 1 changed."""
    answer = route.fetch()
    lines = answer.text().split("\n")
    if len(lines) > 2:
        lines[1] = lines[1].replace('"decision":"allowed"', '"decision":"denied"', 1) \
            if '"decision":"allowed"' in lines[1] else lines[1].replace("a", "b", 1)
    route.fulfill(response=answer, body="\n".join(lines))


def test_the_log_verifies_in_the_browser_and_a_tampered_copy_does_not(page: Any, live_server: LiveServer) -> None:
    held = live_server.get("oversight", "/v1/audit/checkpoint")  # a signed head, kept as an officer would
    assert held.status_code == 200
    sign_in(page, live_server, "oversight")
    page.goto("/console/verify")
    page.fill("#trusted", held.text)
    page.click("#verify-run")
    page.wait_for_selector("#verify-result[data-outcome]", timeout=60_000)
    assert page.get_attribute("#verify-result", "data-outcome") == "verified", page.inner_text("#verify-result")
    assert "OK:" in page.inner_text("#verify-result")
    assert "consistent with your checkpoint" in page.inner_text("#verify-result")
    screenshot(page, "console-verify-ok")
    # A checkpoint the officer holds whose signed text was altered is refused.
    lines = held.text.split("\n")
    lines[1] = str(int(lines[1]) - 1)
    page.fill("#trusted", "\n".join(lines))
    page.evaluate("document.getElementById('verify-result').removeAttribute('data-outcome')")
    page.click("#verify-run")
    page.wait_for_selector("#verify-result[data-outcome]", timeout=60_000)
    assert "your checkpoint is not signed" in page.inner_text("#verify-result")
    page.fill("#trusted", "")
    page.route("**/console/audit-log/entries.jsonl*", _tampered)
    page.evaluate("document.getElementById('verify-result').removeAttribute('data-outcome')")
    page.click("#verify-run")
    page.wait_for_selector("#verify-result[data-outcome]", timeout=60_000)
    assert page.get_attribute("#verify-result", "data-outcome") == "tampered"
    assert "TAMPERED" in page.inner_text("#verify-result")
    screenshot(page, "console-verify-tampered")


def test_a_feed_consumer_sees_feeds_releases_signatures_and_csv(page: Any, live_server: LiveServer) -> None:
    feed = {"name": "console-weekly", "dataset": live_server.dataset, "schedule": "weekly", "releases": 2,
            "agencies": ["health"], "specs": [{"aggregate": "count", "group_by": ["channel"], "epsilon": 0.02}]}
    assert live_server.post("steward", "/v1/feeds", json=feed).status_code == 201
    assert live_server.post("steward", "/v1/feeds/console-weekly/releases").status_code == 201
    sign_in(page, live_server, "feed-health")
    page.goto("/console/feeds")
    page.click("#feeds a:text('console-weekly')")
    screenshot(page, "console-feed")
    page.click("#releases a:text('1')")
    assert page.inner_text("#signature-status").startswith("Signature valid")
    screenshot(page, "console-feed-release")
    with page.expect_download() as download:
        page.click("a:text('Download as CSV')")
    assert "channel" in Path(download.value.path()).read_text()


def _tampered_bundle(original: bytes, target: Path) -> Path:
    """The bundle with one entry of entries.jsonl changed (its checkpoints and proofs left as signed)."""
    with zipfile.ZipFile(io.BytesIO(original)) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for name in source.namelist():
            data = source.read(name)
            if name == "entries.jsonl":
                lines = data.split(b"\n")
                lines[2] = lines[2].replace(b'"decision":"allowed"', b'"decision":"denied"', 1) \
                    if b'"decision":"allowed"' in lines[2] else lines[2].replace(b"a", b"b", 1)
                data = b"\n".join(lines)
            out.writestr(name, data)
    return target


def test_an_exported_bundle_verifies_in_the_browser_and_a_tampered_one_does_not(
        page: Any, live_server: LiveServer, tmp_path: Path) -> None:
    assert live_server.get("oversight", "/v1/audit/checkpoint").status_code == 200
    export = live_server.get("oversight", "/v1/audit/export")
    assert export.status_code == 200
    good = tmp_path / "audit.zip"
    good.write_bytes(export.content)
    sign_in(page, live_server, "oversight")
    page.goto("/console/verify")
    for bundle, outcome in ((good, "verified"), (_tampered_bundle(export.content, tmp_path / "tampered.zip"), "tampered")):
        page.set_input_files("#bundle", str(bundle))
        page.evaluate("document.getElementById('verify-result').removeAttribute('data-outcome')")
        page.click("#verify-run")
        page.wait_for_selector("#verify-result[data-outcome]", timeout=60_000)
        assert page.get_attribute("#verify-result", "data-outcome") == outcome, page.inner_text("#verify-result")
        screenshot(page, f"console-verify-bundle-{outcome}")
    assert "TAMPERED" in page.inner_text("#verify-result")
