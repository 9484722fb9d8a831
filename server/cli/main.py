"""The ``civicdp`` command line: the state (``init``), demo data, local queries and estimates, the tour.

Every command reports bad input as a one-line error and exit status 2, never a
stack trace. Commands on the server's state (and ``serve``) need a state made once by
``civicdp init``; on a missing or mismatched state they refuse, naming
``CIVICDP_DATA_DIR``, ``DATABASE_URL`` and ``civicdp init``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from civicdp.privacy.errors import PrivacyError
from civicdp.queries.context import EngineLimits
from civicdp.queries.engine import Engine, LocalDataset
from civicdp.queries.errors import QueryError
from civicdp.server.cli.admin import accounts, budgets, datasets, keys, roles
from civicdp.server.cli.audit import audit
from civicdp.server.cli.datasets import attach as attach_intake_commands
from civicdp.server.cli.registration import attach as attach_registration_commands
from civicdp.server.cli.common import fail, read_json
from civicdp.server.cli.output import console, print_result, result_json
from civicdp.server.cli.feeds import feeds
from civicdp.server.cli.monitors import monitors
from civicdp.server.cli.plans import plan as plan_command
from civicdp.server.state.identity import StateError
from civicdp.server.state.settings import Settings


class _StateCheckedGroup(TyperGroup):
    """Every command: a state that is missing or does not match its files is one clear error, exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StateError as exc:
            fail(str(exc))


app = typer.Typer(help="civicdp: differentially private statistics on public-service use.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_StateCheckedGroup)
app.add_typer(accounts, name="accounts")
app.add_typer(keys, name="keys")
app.add_typer(roles, name="roles")
attach_intake_commands(datasets)  # datasets init, datasets confirm
attach_registration_commands(datasets)  # datasets check, datasets register, datasets findings
app.add_typer(datasets, name="datasets")
app.add_typer(budgets, name="budgets")
app.add_typer(audit, name="audit")
app.add_typer(feeds, name="feeds")
app.add_typer(monitors, name="monitors")
app.command("plan")(plan_command)



def _engine() -> Engine:
    settings = Settings()
    return Engine(limits=EngineLimits(max_epsilon=settings.max_epsilon, auto_fraction=settings.auto_fraction))


def _load(dataset: Path, spec_path: Path) -> tuple[LocalDataset, Any]:
    spec = read_json(spec_path, "query spec file")
    return LocalDataset(dataset, _engine()), spec


@app.command("demo-data")
def demo_data(
    people: Annotated[int, typer.Option(min=1, max=50_000_000, help="How many people to simulate")] = 200_000,
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into")] = Path("data/demo"),
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data)")] = 0,
    profile: Annotated[str, typer.Option(help="Shape of the data: 'demo'; 'other' (continuous waits with "
                                              "zeros, durations near the top of their bounds, a heavier tail "
                                              "of requests, other column names); or 'continuous' (skewed "
                                              "waits and durations, not whole seconds, the demo's names)")] = "demo",
) -> None:
    """Write a realistic synthetic dataset (events, catalogue, steps, planted bundles, metadata)."""
    from civicdp.synthetic.demo_data import PROFILES, generate

    if profile not in PROFILES:
        fail(f"unknown profile '{profile}': use one of {', '.join(sorted(PROFILES))}")
    summary = generate(people, out, seed=seed, profile=profile)
    console.print(f"wrote {summary.events:,} events of {summary.people:,} people and {summary.steps:,} "
                  f"processing steps to {out} in {summary.seconds:.1f} s")


@app.command()
def query(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder holding metadata.json")],
    spec: Annotated[Path, typer.Argument(help="Query spec, a JSON file")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON")] = False,
) -> None:
    """Run one query locally and print the private answer with its intervals."""
    try:
        local, raw = _load(dataset, spec)
        result = local.run(raw)
    except (QueryError, PrivacyError) as exc:
        fail(str(exc))
    if as_json:
        console.print_json(json.dumps(result_json(result)))
    else:
        print_result(result)


@app.command()
def estimate(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder holding metadata.json")],
    spec: Annotated[Path, typer.Argument(help="Query spec, a JSON file")],
) -> None:
    """Print a query's privacy cost and predicted accuracy without reading any data."""
    try:
        local, raw = _load(dataset, spec)
        console.print_json(json.dumps(local.estimate(raw).as_dict()))
    except (QueryError, PrivacyError) as exc:
        fail(str(exc))


@app.command()
def tour(
    data: Annotated[Path, typer.Option(help="Demo dataset folder (created if missing)")] = Path("data/demo"),
    people: Annotated[int, typer.Option(min=1000, help="People to simulate if the dataset is missing")] = 200_000,
) -> None:
    """Ask the four W1 questions of the demo data and show each private answer."""
    from civicdp.server.cli.tour import run_tour

    run_tour(data, people, _engine(), console)


@app.command("init")
def init(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Folder for the state's files (default: CIVICDP_DATA_DIR, else ./data); the database "
                           "is SQLite in it, or PostgreSQL at DATABASE_URL")] = None,
) -> None:
    """Create the server's state once: database, policy rules, key-hashing secret, signing key.

    Records the fingerprints of the secret and of the signing key's public key in the
    database, so a process given other files refuses to start. On an existing state it
    only checks that the files match (nothing is created or replaced).
    """
    from civicdp.server.services.bootstrap import init_state

    settings = _settings_for_init(data_dir)
    try:
        identity, status = init_state(settings)
    except StateError as exc:
        fail(str(exc))
    where = _state_location(settings)
    if status == "existing":
        console.print(f"the state at {where} exists already (initialised {identity.created_at:%Y-%m-%d}); its "
                      "secret and signing key match it, nothing was changed", highlight=False)
        return
    console.print(f"created the civicdp state at {where}" if status == "created" else
                  f"recorded the secret and signing key of the existing state at {where} (made by an earlier "
                  "civicdp)", highlight=False)
    console.print(f"  key-hashing secret  {settings.secret_path.resolve()}  (SHA-256 {identity.secret_sha256[:16]}…)",
                  highlight=False)
    console.print(f"  signing key         {settings.audit_key_path.resolve()}  public key {identity.signing_key}",
                  highlight=False)
    console.print("Back up the data folder (and the database), keep both files private (mode 0600), and give every "
                  "server process of this state the same files. Publish the public key to oversight "
                  "(civicdp audit public-key).", highlight=False)
    if data_dir is not None:
        console.print(f"Use it with: export CIVICDP_DATA_DIR={settings.data_dir}", highlight=False)


def _settings_for_init(data_dir: Path | None) -> Settings:
    """The settings, with ``--data-dir`` in place of CIVICDP_DATA_DIR when given."""
    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


def _state_location(settings: Settings) -> str:
    from civicdp.server.state.identity import location

    return location(settings)


def require_state(settings: Settings) -> None:
    """Refuse (exit status 2) unless the settings point at an existing state whose files match it."""
    from civicdp.server.services.bootstrap import check_state

    try:
        check_state(settings)
    except StateError as exc:
        fail(str(exc))

