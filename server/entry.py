"""The ``civicdp`` console script: the command line's commands, plus ``serve`` and ``demo``,
which start the HTTP server.

The composition root: the one module that joins the command line (server/cli/) and the
HTTP layer (server/http/), which never import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from civicdp.queries.metadata import load_metadata
from civicdp.server.cli.demo import prepare_demo, print_welcome
from civicdp.server.cli.main import app, require_state
from civicdp.server.cli.output import console
from civicdp.server.http import serving
from civicdp.server.state.settings import Settings

__all__ = ["app", "main"]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: CIVICDP_HOST, else 127.0.0.1)")
                    ] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port to listen on (default: CIVICDP_PORT, "
                                                                      "else 8000)")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes, all on the same state database "
                                                             "and listening socket")] = 1,
) -> None:
    """Start the HTTP server on existing state (CIVICDP_DATA_DIR, or DATABASE_URL for PostgreSQL)."""
    settings = Settings()
    require_state(settings)
    serving.run(host or settings.host, port or settings.port, workers)


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="Demo dataset folder (created if missing)")] = Path("data/demo"),
    people: Annotated[int, typer.Option(min=1000, help="People to simulate if the dataset is missing")] = 200_000,
    serve_too: Annotated[bool, typer.Option("--serve/--no-serve", help="Start the server afterwards")] = True,
) -> None:
    """Set up the demo (data, accounts for every role, fresh keys), print examples, and serve."""
    settings = Settings()
    keys = prepare_demo(settings, data, people, console)
    print_welcome(console, settings, keys, load_metadata(data).name)
    if serve_too:
        serve()


def main() -> None:  # pragma: no cover - console entry point
    app()
