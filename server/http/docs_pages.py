"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served with every asset from the package.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (blank pages on a network without
internet access) and start Swagger UI with an inline script, which the pages' Content-Security-
Policy forbids (``security_headers.py``). These pages are small templates of their own: the
vendored assets (``static/``, versions and licences in ``static/README.md``) are served under
``/docs/assets/``, and each viewer is started by a served script that reads its settings from
its tag's ``data-`` attributes. ReDoc adds two ``<style>`` elements as it loads, the same two
each time: ``/redoc``'s ``style-src`` allows exactly these by their hashes (scripts stay ``'self'``,
and the rest of ReDoc's styles go through the CSSOM, which CSP does not govern).
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from string import Template

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from civicdp.server.http.security_headers import page_policy

STATIC = Path(__file__).parent / "static"
#: The inline styles ReDoc 2.5.4 adds (the scrollbar's stylesheet, and styled-components' empty
#: sheet): their SHA-256, as Chromium reports them. A new ReDoc may add others: the browser test
#: (tests/browser/test_docs.py) fails on any style the policy refuses.
REDOC_STYLE_HASHES = ("'sha256-QMIg+bpjm3JdElJ388KYke01izlUW0UoNOeKjpMxdgc='",
                      "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='")
REDOC_POLICY = page_policy(style_src=" ".join(("'self'", *REDOC_STYLE_HASHES)))
ASSETS = "/docs/assets"

SWAGGER_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title - Swagger UI</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="$assets/swagger-ui/swagger-ui.css">
<link rel="stylesheet" href="$assets/docs.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="$assets/swagger-ui/swagger-ui-bundle.js"></script>
<script src="$assets/swagger-init.js" data-openapi-url="$openapi"></script>
</body>
</html>
""")

REDOC_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title - ReDoc</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="$assets/docs.css">
</head>
<body>
<div id="redoc"></div>
<script src="$assets/redoc/redoc.standalone.js"></script>
<script src="$assets/redoc-init.js" data-openapi-url="$openapi"></script>
</body>
</html>
""")


def _fields(app: FastAPI, request: Request) -> dict[str, str]:
    """The template's values, escaped (a proxy's root path is part of every URL)."""
    root = request.scope.get("root_path", "").rstrip("/")
    return {"title": escape(app.title), "assets": escape(root + ASSETS),
            "openapi": escape(root + (app.openapi_url or "/openapi.json"))}


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs``, ``/redoc`` and their assets (create ``app`` with ``docs_url=None, redoc_url=None``)."""
    app.mount(ASSETS, StaticFiles(directory=STATIC), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        return HTMLResponse(SWAGGER_PAGE.substitute(_fields(app, request)))

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        return HTMLResponse(REDOC_PAGE.substitute(_fields(app, request)),
                            headers={"Content-Security-Policy": REDOC_POLICY})
