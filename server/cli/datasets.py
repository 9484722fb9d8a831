"""A steward's intake commands: ``civicdp datasets init`` (import a source with a draft declaration)
and ``civicdp datasets confirm`` (confirm the values the draft read off the data).

They read the steward's own files and database and write only the dataset folder; they
need no server state. ``attach`` adds them to the ``datasets`` group of the command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from civicdp.queries.errors import QueryError
from civicdp.server.cli.common import fail

console = Console(soft_wrap=True)


def datasets_init(
    source: Annotated[str, typer.Argument(help="A CSV file, a Parquet file or folder, or a "
                                               "postgresql://user@host/db URL")],
    name: Annotated[str, typer.Option(help="The dataset's name (letters, digits, '.', '_', '-')")],
    person_column: Annotated[str, typer.Option(help="The column naming the person: the privacy unit. For data "
                                                    "without a person id, a case or request id")],
    time_column: Annotated[list[str] | None, typer.Option(help="A column of times (repeat for several); other "
                                                               "columns whose every value is a time are found too")
                           ] = None,
    out: Annotated[Path | None, typer.Option(help="The dataset folder to write (default: ./NAME)")] = None,
    table: Annotated[str | None, typer.Option(help="PostgreSQL: the table to import (schema.table)")] = None,
    query: Annotated[str | None, typer.Option(help="PostgreSQL: a query whose rows to import")] = None,
    time_zone: Annotated[str, typer.Option(help="The zone of times written without an offset; every time is "
                                                "stored in UTC")] = "UTC",
    day_first: Annotated[bool | None, typer.Option("--day-first/--month-first", help="How to read slashed dates "
                                                   "such as 03/04/2024 (default: what the data says; month first "
                                                   "if it cannot tell)")] = None,
    separator: Annotated[str | None, typer.Option(help="CSV: the separator (default: from the header line)")] = None,
    null: Annotated[list[str] | None, typer.Option(help="CSV: a text that means a missing value, such as NA "
                                                        "(repeat for several; an empty field is always missing)")
                    ] = None,
    max_keys: Annotated[int, typer.Option(min=2, max=100_000, help="Propose keys for columns with at most this "
                                                                   "many distinct values")] = 1000,
    table_name: Annotated[str, typer.Option(help="The table's name in the declaration")] = "events",
    force: Annotated[bool, typer.Option(help="Replace a metadata.json or table file already in the folder")] = False,
) -> None:
    """Import SOURCE into a dataset folder: the data as Parquet, and a draft metadata.json to confirm.

    The draft proposes, per column, a type and a treatment: identifier (the person
    column, id-like columns), keys (low-cardinality columns), bounds and resolution
    (numbers), time bounds, nullable. Whatever was read off the data is listed under
    proposed_from_data in metadata.json: it is not public knowledge until you confirm it
    (edit it, then `civicdp datasets confirm FOLDER`); registration refuses it before.
    """
    from civicdp.server.intake.draft import draft_metadata, write_draft
    from civicdp.server.intake.importer import import_source
    from civicdp.server.intake.sources import ImportRefused, open_source

    started = time.perf_counter()
    folder = out or Path(name)
    try:
        src = open_source(source, table=table, query=query, separator=separator, nulls=tuple(null or ()))
        table_file = folder / f"{table_name}.parquet"
        _refuse_overwrite(folder, table_file, src.location if src.kind == "parquet" else None, force)
        folder.mkdir(parents=True, exist_ok=True)
        with _progress() as progress:
            result = import_source(src, table_file, time_columns=tuple(time_column or ()), time_zone=time_zone,
                                   day_first=day_first, person_column=person_column, progress=progress)
        person = result.renamed.get(person_column, person_column)
        times = tuple(result.renamed.get(c, c) for c in time_column or ())
        with console.status("drafting metadata.json"):
            draft = draft_metadata(table_file, name=name, person=person, types=result.types, table=table_name,
                                   time_columns=times, source_label=src.label, max_keys=max_keys)
        write_draft(folder, draft)
    except (ImportRefused, QueryError, OSError) as exc:
        fail(str(exc))
    _print_draft(folder, result, draft, time_zone, time.perf_counter() - started)


def _refuse_overwrite(folder: Path, table_file: Path, source_folder: str | None, force: bool) -> None:
    from civicdp.server.intake.sources import ImportRefused

    inside = source_folder and Path(source_folder).is_dir()
    if inside and folder.resolve().is_relative_to(Path(source_folder).resolve()):  # type: ignore[arg-type]
        raise ImportRefused("--out must not lie inside the Parquet folder being imported")
    existing = [p.name for p in (folder / "metadata.json", table_file) if p.exists()]
    if existing and not force:
        raise ImportRefused(f"{folder} already holds {' and '.join(existing)}; choose another --out, or pass --force "
                            "to replace them (a confirmed metadata.json would be lost)")


class _progress:
    """A rich progress bar per stage, as the importer reports rows."""

    def __enter__(self) -> _progress:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.bar.__enter__()
        self.tasks: dict[str, int] = {}
        return self

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            label = {"writing": "converting to Parquet", "rewriting": "again: a type changed further down"
                     }.get(stage, stage)
            self.tasks[stage] = self.bar.add_task(label, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        for task in self.bar.tasks:
            if task.total is None or task.completed < (task.total or 0):
                self.bar.update(task.id, total=task.completed)
        self.bar.__exit__(*exc)  # type: ignore[arg-type]


def _print_draft(folder: Path, result, draft, time_zone: str, seconds: float) -> None:  # type: ignore[no-untyped-def]
    table = Table("column", "type", "proposed treatment", "to confirm")
    for column in draft.columns:
        table.add_row(column.name, column.type, column.treatment, ", ".join(column.marked))
    console.print(table)
    for old, new in result.renamed.items():
        console.print(f"renamed {old!r} to {new!r} (queries name columns with letters, digits and _)", highlight=False)
    for column, why in result.set_aside.items():
        console.print(f"not imported: {column}, {why}", highlight=False)
    for note in result.notes + draft.notes:
        console.print(f"note: {note}", highlight=False)
    times = [c.name for c in draft.columns if c.type == "datetime"]
    if times:
        zone = "" if time_zone == "UTC" else f"; times written without an offset were read as {time_zone}"
        console.print(f"times ({', '.join(times)}) are stored in UTC{zone}", highlight=False)
    marked = len(draft.metadata["proposed_from_data"]["fields"])
    console.print(f"wrote {result.rows:,} rows to {result.path} and a draft {folder / 'metadata.json'} in "
                  f"{seconds:.1f} s ({result.rows / max(seconds, 1e-9):,.0f} rows/s)", highlight=False)
    console.print(f"{marked} values in the draft were read off the data (listed under proposed_from_data): keys and "
                  "bounds read off the data are not public knowledge. Check each one, replace it with the public "
                  "value where it is not public, then confirm: "
                  f"civicdp datasets check {folder}; civicdp datasets confirm {folder}; "
                  f"civicdp datasets register {folder}", highlight=False)


def datasets_confirm(
    folder: Annotated[Path, typer.Argument(help="The dataset folder holding metadata.json")],
    field: Annotated[list[str] | None, typer.Option(help="Confirm only this: an entry of proposed_from_data, its "
                                                         "tail (channel.keys), a column or a kind (keys); repeat "
                                                         "for several")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask")] = False,
) -> None:
    """Show the values metadata.json marks as proposed from the data, and remove the marks.

    Confirm a value only if it is public knowledge (a published code list, a legal range,
    the reporting period) or you replaced it with the public one: registration trusts
    every confirmed key and bound as public.
    """
    from civicdp.server.intake.confirm import confirm, marked, select, shown

    try:
        marks = marked(folder)
        chosen = select(marks, field) if field else marks
    except (QueryError, ValueError, OSError) as exc:
        fail(str(exc))
    if not chosen:
        console.print(f"nothing in {folder / 'metadata.json'} is marked as proposed from the data", highlight=False)
        return
    table = Table("marked as proposed from the data", "value now")
    for mark in chosen:
        table.add_row(mark.entry, shown(mark.value))
    console.print(table)
    console.print("These values were read off the data. Keys and bounds read off the data are not public knowledge: "
                  "confirm only values that are public, or that you replaced with the public ones.", highlight=False)
    if not yes and not typer.confirm(f"Confirm these {len(chosen)} values as public?", default=False):
        fail("nothing confirmed")
    left = confirm(folder, chosen)
    console.print(f"confirmed {len(chosen)} value{'s' if len(chosen) != 1 else ''}", highlight=False)
    if left:
        console.print(f"still marked: {', '.join(left)}", highlight=False)
    else:
        console.print(f"nothing is marked any more; check and register with: civicdp datasets check {folder}; "
                      f"civicdp datasets register {folder}", highlight=False)


def attach(group: typer.Typer) -> None:
    """Add ``init`` and ``confirm`` to the ``datasets`` command group."""
    group.command("init")(datasets_init)
    group.command("confirm")(datasets_confirm)
