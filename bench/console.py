"""Web console — each page's response time and size, the oversight page's first paint, and the
in-browser verification of the audit log, with the demo's data and an audit log of 100,000 entries.

Usage::

    python -m bench.console [--people 300] [--entries 100000] [--runs 20] [--queries 30]

Serves the demo (``civicdp demo``'s data, as the browser tests do: uvicorn in a subprocess), has
the analyst ask ``--queries`` fresh questions (charges for the charts), and appends read entries (``dataset.read``, as an analyst's page views leave) until the log holds
``--entries``, then signs a checkpoint. Each page is fetched ``--runs`` times over loopback by
a signed-in client: the p50 of the response time (server time plus loopback transfer; the
server's own time is at most this) and the transfer size. Then Chromium (Debian's, headless)
opens the oversight page (first paint from the Performance API) and runs the verification
page on the whole log (the time it reports).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine

from civicdp.server.auditlog.append import append_many
from civicdp.server.state.caller import Caller
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, start_live_server, stop_live_server

PAGES = ["/console/", "/console/oversight", "/console/audit", "/console/audit?latest=true", "/console/audit/5",
         "/console/feeds-overview", "/console/verify", "/console/audit-log/checkpoints",
         "/console/audit-log/entries.jsonl?limit=10000"]
STEWARD_PAGES = ["/console/steward"]
ANALYST_PAGES = ["/console/analyst", "/console/query"]


def signed_in(url: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=120)
    form = client.get("/console/sign-in").text
    pre = re.search(r'name="pre" value="([^"]+)"', form)
    assert pre is not None
    answer = client.post("/console/session", data={"key": key, "pre": pre[1]})
    assert answer.status_code == 303, answer.text
    return client


def fill_log(data_dir: Path, entries: int) -> int:
    """Append read entries until the log holds ``entries``; how many were added."""
    engine = create_engine(f"sqlite:///{data_dir / 'civicdp.db'}")
    reader = Caller(account_id=2, name="ana-health", agency="health")
    with engine.connect() as connection:
        size = connection.exec_driver_sql("SELECT size FROM audithead WHERE id = 1").scalar_one()
    added = 0
    while size + added < entries:
        batch = min(10_000, entries - size - added)
        with engine.begin() as connection:
            append_many(connection, [{"caller": reader, "action": "dataset.read", "target": "dataset:civic-demo",
                                      "decision": "allowed", "roles": ["analyst@health"],
                                      "request": {"method": "GET", "path": "/console/analyst"},
                                      "detail": {"status": 200}} for _ in range(batch)])
        added += batch
    engine.dispose()
    return added


def spend(server: object, queries: int) -> None:
    """Fresh questions by the analyst, so the budget charts have charges to draw."""
    for i in range(queries):
        spec = {"dataset": server.dataset, "aggregate": "count", "group_by": ["channel"],  # type: ignore[attr-defined]
                "epsilon": round(0.01 + 0.001 * i, 3)}
        answer = server.post("ana-health", "/v1/queries", json=spec)  # type: ignore[attr-defined]
        assert answer.status_code == 200, answer.text


def time_pages(client: httpx.Client, pages: list[str], runs: int) -> None:
    for path in pages:
        times, size = [], 0
        for _ in range(runs):
            started = time.perf_counter()
            answer = client.get(path)
            times.append((time.perf_counter() - started) * 1000)
            assert answer.status_code == 200, (path, answer.status_code)
            size = len(answer.content)
        print(f"  {path:48s} p50 {statistics.median(times):7.1f} ms   {size / 1024:8.1f} KiB")


def browser_figures(url: str, key: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(base_url=url).new_page()
        page.goto("/console/sign-in")
        page.fill("input[name=key]", key)
        with page.expect_navigation():
            page.click("button[type=submit]")
        paints = []
        for _ in range(5):
            page.goto("/console/oversight")
            page.wait_for_selector("body[data-charts]")
            paints.append(page.evaluate(
                "performance.getEntriesByType('paint').find(p => p.name === 'first-contentful-paint').startTime"))
        print(f"  oversight page first contentful paint: median {statistics.median(paints):.0f} ms (5 loads)")
        page.goto("/console/verify")
        page.click("#verify-run")
        page.wait_for_selector("#verify-result[data-outcome]", timeout=600_000)
        print(f"  in-browser verification: {page.inner_text('#verify-time')} "
              f"({page.get_attribute('#verify-result', 'data-outcome')}: {page.inner_text('#verify-result')[:120]})")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=300)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--queries", type=int, default=30, help="fresh analyst queries before timing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        server, process = start_live_server(Path(root), people=args.people)
        try:
            spend(server, args.queries)
            started = time.perf_counter()
            added = fill_log(server.data_dir, args.entries)
            assert server.get("oversight", "/v1/audit/checkpoint").status_code == 200
            print(f"audit log filled with {added:,} entries and checkpointed in {time.perf_counter() - started:.1f} s")
            print(f"console pages ({args.runs} loopback requests each):")
            time_pages(signed_in(server.url, server.keys["oversight"]), PAGES, args.runs)
            time_pages(signed_in(server.url, server.keys["steward"]), STEWARD_PAGES, args.runs)
            time_pages(signed_in(server.url, server.keys["ana-health"]), ANALYST_PAGES, args.runs)
            browser_figures(server.url, server.keys["oversight"])
        finally:
            stop_live_server(process)


if __name__ == "__main__":
    main()
