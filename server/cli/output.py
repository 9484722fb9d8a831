"""How the command line prints: one console, results and tables as rich tables or JSON."""

from __future__ import annotations

from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from civicdp.queries.engine import Result

console = Console(soft_wrap=True)


def result_json(result: Result) -> dict[str, Any]:
    return {
        "table": result.table.to_dicts(),
        "loss": result.loss.as_dict(),
        "contributions": result.contributions,
        "confidence": result.confidence,
        "mechanisms": result.mechanisms,
        "notes": result.notes,
        "tables": {name: table.to_dicts() for name, table in result.tables.items()},
    }


def print_result(result: Result, title: str = "", limit: int = 40) -> None:
    print_table(result.table, title, limit)
    for name, extra in result.tables.items():
        print_table(extra, name, limit)
    console.print(f"privacy loss spent: {result.loss}; at most {result.contributions} rows per person; "
                  f"intervals at {result.confidence:.0%} confidence (they describe the noise)")
    for note in result.notes:
        console.print(f"note: {note}")


def print_table(frame: pl.DataFrame, title: str = "", limit: int = 40) -> None:
    table = Table(title=title or None, title_justify="left")
    for column in frame.columns:
        numeric = frame.schema[column].is_numeric()
        table.add_column(column, justify="right" if numeric else "left")
    for row in frame.head(limit).iter_rows():
        table.add_row(*(_fmt(v) for v in row))
    console.print(table)
    if frame.height > limit:
        console.print(f"... {frame.height - limit} more rows (use --json for all)")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
