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
from civicdp.server.cli.common import fail
from civicdp.server.cli.demo import ResetRefused, prepare, print_state_note, print_welcome, remove_state, reset_plan
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
    reset: Annotated[bool, typer.Option(
        "--reset", help="First remove the demo's state (database, policy rules, secret, signing key, monitors' "
                        "files in CIVICDP_DATA_DIR: every account, key, budget spent, audit entry, feed and "
                        "monitor), then start afresh; refused for a state the demo did not create. The dataset "
                        "folder is kept")] = False,
    remove: Annotated[bool, typer.Option(
        "--remove", help="Only remove the demo's state, as --reset does, and stop (`make clean`)")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before removing")] = False,
) -> None:
    """Set up the demo (data, accounts for every role, fresh keys), print examples, and serve.

    Without --reset the demo continues the state of its last run (budgets spent stay spent)
    and says so; `civicdp demo --reset` starts from fresh budgets.
    """
    settings = Settings()
    if reset or remove:
        try:
            files = reset_plan(settings)
        except ResetRefused as exc:
            fail(f"not resetting: {exc}")
        if not files:
            console.print(f"no demo state in {settings.data_dir}: nothing to remove", highlight=False)
        else:
            console.print(f"the demo's state in {settings.data_dir} (accounts, keys, budgets, audit log, feeds, "
                          "monitors) is:", highlight=False)
            for path in files:
                console.print(f"  {path}{'/' if path.is_dir() else ''}", highlight=False, markup=False)
            if not yes:
                typer.confirm("Remove these?", abort=True)
            remove_state(files)
            console.print(f"removed the demo's state in {settings.data_dir} (the dataset {data} is kept)",
                          highlight=False)
        if remove:
            return
    prepared = prepare(settings, data, people, console)
    print_state_note(console, settings, prepared)
    print_welcome(console, settings, prepared.keys, load_metadata(data).name)
    if serve_too:
        serve()


def main() -> None:  # pragma: no cover - console entry point
    app()
