"""Browser tests: Debian's chromium driven by Playwright, against a live civicdp server.

One browser for the whole test session (``browser``), a fresh context per test (``context``,
``page``), one live server for the session (``live_server``: ``civicdp demo``'s data for a few
hundred people, its accounts and a fresh key each, served by uvicorn in a subprocess on a free
port). Every context is offline: each request that does not go to loopback is aborted and
recorded, and the test fails at teardown if one was attempted (``blocked``). A screenshot of
each test's page is saved under ``tests-output/browser/`` (git-ignored) when the test ends;
``screenshot(page, name)`` saves more.

Chromium is found at ``$CIVICDP_CHROMIUM`` or ``/usr/bin/chromium`` (``make install-browser``
installs it, and ``make test`` depends on that). When it cannot be found the browser tests are
skipped with the reason, unless ``CIVICDP_REQUIRE_BROWSER=1`` (CI), where that is a failure.
Mark browser tests ``@pytest.mark.browser`` (``pytestmark = pytest.mark.browser``): they are
marked slow here too, so ``make test-fast`` leaves them out.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from rich.console import Console

from civicdp.server.cli.demo import prepare
from tests.server.api_fixtures import settings_for, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "tests-output" / "browser"
CHROMIUM = Path(os.environ.get("CIVICDP_CHROMIUM", "/usr/bin/chromium"))
#: Headless, and quiet: without the background-networking flags Chromium calls home (updates,
#: sync, field trials), and this closed network refuses those connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: People in the live server's demo data: enough for every page to have something to show.
DEMO_PEOPLE = 300
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
#: Playwright waits this long (ms) for a page or an element before failing the test.
TIMEOUT_MS = 15_000

SERVE = """
import sys, uvicorn
from civicdp.server.http.app import create_app
from civicdp.server.state.settings import Settings
uvicorn.run(create_app(Settings()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every browser test is a slow test as well."""
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(pytest.mark.slow)


@dataclass
class LiveServer:
    """A civicdp server answering on ``url``, with a plaintext key per demo account."""

    url: str
    keys: dict[str, str]
    data_dir: Path
    dataset: str

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def get(self, who: str | None, path: str, **kwargs: Any) -> httpx.Response:
        """A plain HTTP call (set-up and checks beside the browser); ``who=None`` is anonymous."""
        headers = {**(self.auth(who) if who else {}), **kwargs.pop("headers", {})}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def post(self, who: str | None, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**(self.auth(who) if who else {}), **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_prepared(server: LiveServer, seconds: float = 120) -> None:
    """Registration is prepared in the background (issue 14): wait until the dataset is served."""
    deadline = time.monotonic() + seconds
    while True:
        answer = server.get("steward", f"/v1/datasets/{server.dataset}/preparation")
        assert answer.status_code == 200, answer.text
        preparation = answer.json()["preparation"]
        if preparation is None or preparation["state"] == "ready":
            return
        assert preparation["state"] in ("pending", "preparing"), preparation
        assert time.monotonic() < deadline, preparation
        time.sleep(0.1)


def start_live_server(root: Path, people: int = DEMO_PEOPLE, **settings: str) -> tuple[LiveServer, subprocess.Popen[bytes]]:
    """Set up the demo in ``root`` (as ``civicdp demo`` does) and serve it; ``settings`` are extra
    ``CIVICDP_*`` settings (``checkpoint_every_entries="10"``). Stop it with :func:`stop_live_server`."""
    config = settings_for(root / "state", feeds_scheduler=False)
    prepared = prepare(config, root / "demo-data", people, Console(file=io.StringIO()))
    env = {name: value for name, value in os.environ.items() if not name.startswith("CIVICDP_")}
    env.update(CIVICDP_DATA_DIR=str(config.data_dir), CIVICDP_FEEDS_SCHEDULER="false", PYTHONPATH=str(ROOT),
               **{f"CIVICDP_{name.upper()}": value for name, value in settings.items()})
    port = _free_port()
    log = root / "server.log"
    with log.open("wb") as errors:
        process = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    dataset = json.loads((root / "demo-data" / "metadata.json").read_text())["name"]
    server = LiveServer(url, prepared.keys, config.data_dir, dataset)
    try:
        wait_until_serving(url, process, 120, log=log)
        _wait_prepared(server)
    except BaseException:
        stop_live_server(process)
        raise
    return server, process


def stop_live_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="package")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One demo server for the whole session (tests that change its state must say so, or start
    their own with :func:`start_live_server`)."""
    server, process = start_live_server(tmp_path_factory.mktemp("live-server"))
    try:
        yield server
    finally:
        stop_live_server(process)


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, shared by every browser test of the session."""
    if not CHROMIUM.exists():
        reason = (f"no chromium at {CHROMIUM}: run `make install-browser` (as root it installs Debian's "
                  "chromium) or set CIVICDP_CHROMIUM")
        if os.environ.get("CIVICDP_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Blocked:
    """Requests a context tried to send off the machine (all aborted)."""

    urls: list[str] = field(default_factory=list)


def take_offline(context: Any) -> Blocked:
    """Abort every request of ``context`` that does not go to loopback; what was aborted."""
    blocked = Blocked()

    def route(request_route: Any) -> None:
        url = request_route.request.url
        host = urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:", "about:")) or host in LOOPBACK:
            request_route.continue_()
        else:
            blocked.urls.append(url)
            request_route.abort("internetdisconnected")

    context.route(re.compile(r".*"), route)
    return blocked


@pytest.fixture
def blocked() -> Blocked:
    """What this test's context tried to fetch from outside (filled by ``context``)."""
    return Blocked()


@pytest.fixture
def context(browser: Any, live_server: LiveServer, blocked: Blocked) -> Iterator[Any]:
    """A fresh, offline browser context whose relative URLs go to the live server."""
    fresh = browser.new_context(base_url=live_server.url)
    fresh.set_default_timeout(TIMEOUT_MS)
    blocked.urls = take_offline(fresh).urls
    try:
        yield fresh
    finally:
        fresh.close()
    assert blocked.urls == [], f"the page tried to reach other hosts: {blocked.urls}"


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as ``tests-output/browser/<name>.png``; its path."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def page(context: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A page in a fresh context; its last state is saved as ``<test name>.png`` when the test ends."""
    opened = context.new_page()
    try:
        yield opened
    finally:
        if not opened.is_closed():
            try:
                screenshot(opened, request.node.name)
            except Exception as exc:  # noqa: BLE001 - a failed screenshot must not hide the test's outcome
                print(f"screenshot of {request.node.name} failed: {exc}")
