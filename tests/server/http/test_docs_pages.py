"""``/docs`` and ``/redoc`` name only assets the server serves itself, all shipped in the package.

(That they render offline in Chromium is tests/browser/test_docs.py.)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from civicdp.server.http.docs_pages import REDOC_POLICY, STATIC
from civicdp.server.http.security_headers import PAGE_POLICY
from tests.server.api_fixtures import Api, api, dataset_folder  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_a_docs_page_loads_only_the_servers_own_assets(api: Api, path: str) -> None:  # noqa: F811
    page = api.get(None, path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>" not in page.text and "style=" not in page.text, "inline script or style"
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text), "an asset from another origin"
    assets = re.findall(r"(?:src|href)=\"(/[^\"]+)\"", page.text)
    assert len(assets) >= 3
    for asset in assets:
        answer = api.get(None, asset)
        assert answer.status_code == 200, asset
        assert answer.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript",
                                                                "text/css", "application/json"), asset
    assert page.headers["content-security-policy"] == (PAGE_POLICY if path == "/docs" else REDOC_POLICY)


def test_redocs_policy_differs_from_the_pages_in_its_styles_alone() -> None:
    def directives(policy: str) -> dict[str, str]:
        return dict(part.split(" ", 1) for part in policy.split("; "))
    page, redoc = directives(PAGE_POLICY), directives(REDOC_POLICY)
    assert {name for name in page if page[name] != redoc[name]} == {"style-src"}
    assert "unsafe" not in redoc["style-src"] and redoc["style-src"].startswith("'self' 'sha256-")


def test_the_fastapi_cdn_pages_are_gone(api: Api) -> None:  # noqa: F811
    for path in ("/docs", "/redoc"):
        assert "cdn.jsdelivr.net" not in api.get(None, path).text
    assert api.get(None, "/docs/oauth2-redirect").status_code == 404


def test_every_asset_is_package_data() -> None:
    """pyproject's package-data globs for civicdp.server.http cover every file under static/."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["civicdp.server.http"]
    base = STATIC.parent
    covered = {path for pattern in globs for path in base.glob(pattern) if path.is_file()}
    files = {path for path in STATIC.rglob("*") if path.is_file()}
    assert files and files - covered == set()
