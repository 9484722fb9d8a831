"""What every ``civicdp`` command shares: how a refusal is printed."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

_stderr = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit (2: bad input; 1: verification failed)."""
    _stderr.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=code)
