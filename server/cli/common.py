"""What every ``civicdp`` command shares: how a refusal is printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

_stderr = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit (2: bad input; 1: verification failed)."""
    _stderr.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=code)


def read_json(path: Path, what: str) -> Any:
    """The JSON document in ``path``; a missing file or bad JSON ends the command with a clear error.

    ``what`` names the file in the error, e.g. "query spec file".
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        fail(f"no {what} at {path}")
    except json.JSONDecodeError as exc:
        fail(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); it must hold one JSON object")
