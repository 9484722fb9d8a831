"""A steward's registration commands: ``civicdp datasets check`` (the folder against its
declaration, before registering), ``datasets register`` (check, register, prepare) and
``datasets findings`` (what the check found in the served version, as stored with it).

The counts they print are data: they are for the steward, never an analyst (analysts see
shares only if the steward registers with ``--publish-accepted-shares``).
``attach`` adds them to the ``datasets`` group of the command line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from civicdp.queries.errors import QueryError
from civicdp.server.cli.admin import _state
from civicdp.server.cli.common import fail
from civicdp.server.services import admin
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import utcnow

console = Console(soft_wrap=True)

AcceptNulls = Annotated[bool, typer.Option(
    help="Accept missing values in a column not declared nullable (dropped after bounding); audited")]
AcceptKeys = Annotated[bool, typer.Option(
    help="Accept rows whose value is not in a column's declared keys (they fall in no group); audited")]


def _accepted(nulls: bool, keys: bool) -> frozenset[str]:
    return frozenset(name for name, on in (("undeclared_nulls", nulls), ("dropped_keys", keys)) if on)


def datasets_register(
        folder: Path, accept_undeclared_nulls: AcceptNulls = False, accept_dropped_keys: AcceptKeys = False,
        publish_accepted_shares: Annotated[bool, typer.Option(
            help="Show analysts, in the public metadata, the share of rows each finding of the check touches "
                 "(rounded to 0.1%). The shares are data: private by default")] = False) -> None:
    """Register (or update) a dataset after checking its folder against its metadata, then prepare it.

    Refused, with nothing replaced, if rows hold values outside a column's declared keys
    (unless --accept-dropped-keys) or a column not declared nullable has missing values
    (unless --accept-undeclared-nulls); clipped values, open cases and linked tables
    without a row limit of their own are warned of. What the check found is stored with
    the version (`civicdp datasets findings NAME`).

    Preparing ranks each table's rows per person into the server's state (CIVICDP_PREPARED_DIR,
    default data_dir/prepared; the folder is only read), with a progress bar, before the
    command returns; the version served before is answered until then. Exit status 1 if
    the preparation fails (the error is stored; the earlier version stays served).
    """
    from civicdp.server.intake.prepare import prepare_now
    from civicdp.server.state import registry, value_checks, version_findings
    from civicdp.server.state.preparations import READY, aware, preparing_registrations

    accept = _accepted(accept_undeclared_nulls, accept_dropped_keys)
    registered_at = utcnow()
    with _state() as state:
        with session_scope(state.db) as session, preparing_registrations(session):
            row = admin.register_dataset(session, state.policies, None, folder, accept, publish_accepted_shares)
            name, version, path = row.name, row.version, row.path
            stored = version_findings.of_version(session, name, version, path)
            found, accepted = (stored.findings, stored.accepted) if stored else ([], [])
            warnings = value_checks.warnings(registry.metadata_of(row), stored.found() if stored else [])
        console.print(f"registered {name} version {version}", highlight=False)
        if found:
            _print_findings(found, accepted)
        for line in warnings:
            console.print(f"warning: {line}", highlight=False)
        if publish_accepted_shares:
            console.print("analysts see these shares (rounded to 0.1%) in the dataset's public metadata",
                          highlight=False)
        with _preparing_progress() as progress:
            prepared = prepare_now(state.db, state.settings, name, version, path, progress)
    if prepared is None or prepared.state == READY:
        finished = aware(prepared.finished_at) if prepared else None
        started = aware(prepared.started_at) if prepared else None
        if finished is not None and finished < registered_at:
            took = " already (its files are unchanged)"
        else:
            took = f" in {(finished - started).total_seconds():.1f} s" if finished and started else ""
        console.print(f"prepared {name} version {version}{took}; queries are answered on it now", highlight=False)
    elif prepared.state == "failed":
        fail(f"{name} version {version} was registered but could not be prepared: {prepared.error}. It is not "
             "served (the version served before, if any, still is); fix the cause and register again", code=1)
    else:
        console.print(f"a newer registration of {name} replaced version {version} before it was prepared",
                      highlight=False)


def _print_findings(found: list[dict[str, object]], accepted: list[str]) -> None:
    from civicdp.server.state.value_checks import KINDS

    table = Table("table", "column", "found", "rows", "share", "accepted")
    for f in found:
        table.add_row(str(f["table"]), str(f["column"] or ""), KINDS.get(str(f["kind"]), str(f["kind"])),
                      f"{f['rows']:,} of {f['total']:,}", f"{float(f['share']):.1%}",  # type: ignore[arg-type]
                      "yes" if f["kind"] in accepted else "")
    console.print(table)


@contextmanager
def _preparing_progress() -> Iterator[Callable[[str, int, int, int, int], None]]:
    """A progress bar over the tables being prepared (each advancing by its steps)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tables]}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("preparing", total=1.0, tables="")

        def update(table: str, done: int, total: int, step: int, steps: int) -> None:
            bar.update(task, completed=(done + step / max(steps, 1)) / max(total, 1),
                       description=f"preparing {table}", tables=f"table {min(done + 1, total)}/{total}")

        yield update
        bar.update(task, completed=1.0, description="prepared")


def datasets_findings(name: str,
                      as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """What the registration check found in the served version's data: counts, shares, what was accepted."""
    from civicdp.server.state import registry, version_findings

    with _state() as state, session_scope(state.db) as session:
        row = registry.get(session, name)
        version = row.version
        found = version_findings.of_version(session, row.name, version, row.path)
        if found is None:
            fail(f"{name} version {version} was registered before findings were kept; register it again")
        findings, accepted, published = found.findings, found.accepted, found.published
    if as_json:
        console.print_json(json.dumps({"dataset": name, "version": version, "accepted": accepted,
                                       "published": published, "findings": findings}))
        return
    if findings:
        _print_findings(findings, accepted)
    else:
        console.print(f"{name} version {version}: the check found nothing (no dropped keys, nulls, clipped "
                      "values or open cases)", highlight=False)
    console.print("analysts see the shares in the public metadata" if published else
                  "private: analysts do not see these (register with --publish-accepted-shares to show them)",
                  highlight=False)


def datasets_check(folder: Path, accept_undeclared_nulls: AcceptNulls = False, accept_dropped_keys: AcceptKeys = False,
                   as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Check a dataset folder as registration would, and report what its declaration does to the data.

    Counts, per column, missing values, rows outside the declared keys (they fall in no
    group: registration refuses them unless accepted) and values outside the bounds
    (clipped); per table, open cases (a column declared ends_case missing) and rows beyond
    the table's row limit. Reads your files only; registers nothing. The --accept options
    check as registration with them would. Exit status 2 if registration would refuse the
    folder (values still proposed from the data, not yet confirmed, included), 1 if there
    are warnings.
    """
    from dataclasses import asdict

    import polars as pl

    from civicdp.server.intake.report import check_folder
    from civicdp.server.state.dataset_checks import DatasetRefused

    try:
        report = check_folder(folder, _accepted(accept_undeclared_nulls, accept_dropped_keys))
    except (DatasetRefused, QueryError, OSError) as exc:
        fail(f"registration would refuse {folder}: {exc}")
    except pl.exceptions.PolarsError:  # as registration answers it: the files do not read as declared
        fail(f"registration would refuse {folder}: its files cannot be read as Parquet with the declared columns; "
             "check them against metadata.json")
    warnings, refusals = report.warnings(), report.refusals()
    if as_json:
        console.print_json(json.dumps({"dataset": report.metadata.name, "rows": report.rows,
                                       "beyond_contributions": report.beyond_contributions,
                                       "open_cases": report.open_cases,
                                       "columns": [asdict(c) for c in report.columns], "warnings": warnings,
                                       "refusals": refusals, "unconfirmed": report.unconfirmed}))
    else:
        _print_report(folder, report, warnings, refusals)
    if report.unconfirmed or refusals:
        raise typer.Exit(2)
    if warnings:
        raise typer.Exit(1)


def _print_report(folder: Path, report, warnings: list[str], refusals: list[str]) -> None:  # type: ignore[no-untyped-def]
    table = Table("table", "column", "rows", "missing", "outside keys", "below bounds", "above bounds")
    for c in report.columns:
        table.add_row(c.table, c.column, f"{c.rows:,}", f"{c.missing:,}", f"{c.outside_keys:,}",
                      f"{c.below_bounds:,}", f"{c.above_bounds:,}")
    console.print(table)
    for name, dropped in report.beyond_contributions.items():
        opened = report.open_cases.get(name)
        cases = f", {opened:,} open cases" if opened is not None else ""
        console.print(f"{name}: {report.rows[name]:,} rows{cases}, {dropped:,} beyond {report.metadata.row_limit(name)} "
                      f"rows per {report.metadata.privacy_unit}", highlight=False)
    for line in warnings:
        console.print(f"warning: {line}", highlight=False)
    for line in refusals:
        console.print(f"registration would refuse: {line}", highlight=False)
    if report.unconfirmed:
        console.print(f"registration would refuse: {len(report.unconfirmed)} values were read off the data and "
                      f"are not confirmed ({', '.join(report.unconfirmed)}); review them, then: civicdp datasets "
                      f"confirm {folder}", highlight=False)
    elif not refusals:
        console.print(f"registration checks pass; register with: civicdp datasets register {folder}",
                      highlight=False)


def attach(group: typer.Typer) -> None:
    """Add ``check``, ``register`` and ``findings`` to the ``datasets`` command group."""
    group.command("check")(datasets_check)
    group.command("register")(datasets_register)
    group.command("findings")(datasets_findings)
