"""``civicdp demo``: demo data, demo accounts for every role, fresh keys, examples, then serve.

The demo keeps its state (database, policy rules, key-hashing secret, signing key,
monitors' files) where the settings point, ``CIVICDP_DATA_DIR`` (default ``./data``). When
it creates that state it leaves a marker beside it (:data:`MARKER`), so that
``civicdp demo --reset`` can later remove the demo's state — and with it every budget
spent — and refuse to touch a state the demo did not create.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from sqlmodel import Session, select

from civicdp.policies.actions import Role
from civicdp.server.services import admin
from civicdp.server.services.bootstrap import build_state, init_state
from civicdp.server.state import identity, ledger
from civicdp.server.state.auth import secret_fingerprint
from civicdp.server.state.db import make_engine, session_scope
from civicdp.server.state.models import Account, ApiKey, utcnow
from civicdp.server.state.settings import Settings

DEMO_ACCOUNTS = [  # name, agency, role, role's agency ("*": every agency)
    ("steward", "civic-office", Role.STEWARD, "*"),
    ("ana-health", "health", Role.ANALYST, "health"),
    ("ana-transport", "transport", Role.ANALYST, "transport"),
    ("oversight", "audit-office", Role.OVERSIGHT, "*"),
    ("feed-health", "health", Role.FEED_CONSUMER, "health"),
]

#: Written by the demo into the data folder of a state it created (never beside another).
MARKER = "demo-state.json"
#: The signer's latest checkpoint, kept beside the signing key (server/auditlog); a state file too.
HELD_CHECKPOINT = "audit-latest-checkpoint.txt"
_MADE_BY = "civicdp demo"


class ResetRefused(Exception):
    """``--reset`` will not remove this state; the message says why and what to do instead."""


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare_demo` did: a fresh key per demo account, and what the state had spent before."""

    keys: dict[str, str]
    created: bool  # the demo made a new state (fresh budgets)
    made_by_demo: bool  # the state carries the demo's marker
    spent: dict[str, float]  # epsilon spent on the demo dataset ("month", "lifetime") and "lifetime_cap"


def marker_path(settings: Settings) -> Path:
    return settings.data_dir / MARKER


def prepare_demo(settings: Settings, data: Path, people: int, console: Console) -> dict[str, str]:
    """Create what the demo needs (idempotent) and return a fresh API key per demo account."""
    return prepare(settings, data, people, console).keys


def prepare(settings: Settings, data: Path, people: int, console: Console) -> Prepared:
    """Create what the demo needs (idempotent): data, state, accounts, a fresh key per account.

    The demo makes its own state (as ``civicdp init`` would) if there is none where the
    settings point, marking it as the demo's, and uses the existing one otherwise (its
    files must match it).
    """
    from civicdp.synthetic.demo_data import generate

    if not (data / "metadata.json").exists():
        console.print(f"generating demo data for {people:,} people in {data} ...")
        generate(people, data, seed=0)
    made, status = init_state(settings)
    if status == "created":
        _write_marker(settings, made, data)
    made_by_demo = _marker_matches(settings, made)
    state = build_state(settings, init=False)
    keys: dict[str, str] = {}
    try:
        with session_scope(state.db) as session:
            row = admin.register_dataset(session, state.policies, None, data)
            for name, agency, role, role_agency in DEMO_ACCOUNTS:
                account = session.exec(select(Account).where(Account.name == name)).first()
                if account is None:
                    account = admin.create_account(session, None, name, agency)
                    admin.grant_role(session, state.policies, None, name, role, role_agency)
                # Keys are shown once: each demo start revokes the old demo keys and issues new ones.
                for old in session.exec(select(ApiKey).where(ApiKey.account_id == account.id,
                                                             ApiKey.revoked_at.is_(None))):  # type: ignore[union-attr]
                    old.revoked_at = utcnow()
                    session.add(old)
                _, keys[name] = admin.issue_key(session, None, name, state.secret, expires_in_days=30)
            dataset = row.name
        with Session(state.db) as session:
            month, lifetime = ledger.statuses(session, dataset, [
                ledger.Scope(ledger.DATASET, ledger.ANY, ledger.period_of(datetime.now(timezone.utc))),
                ledger.Scope(ledger.LIFETIME, ledger.ANY, ledger.LIFETIME_PERIOD)], defaults=state.caps)
    finally:
        state.close()
    spent = {"month": month.as_dict()["spent_epsilon"], "lifetime": lifetime.as_dict()["spent_epsilon"],
             "lifetime_cap": lifetime.as_dict()["cap_epsilon"]}
    return Prepared(keys, status == "created", made_by_demo, spent)


# -- the marker, and --reset ----------------------------------------------------------------


def _write_marker(settings: Settings, made: identity.StateIdentity, data: Path) -> None:
    document = {"made_by": _MADE_BY, "created_at": made.created_at.isoformat(),
                "secret_sha256": made.secret_sha256, "dataset": str(data.resolve()),
                "note": "This state was created by `civicdp demo`; `civicdp demo --reset` removes it."}
    marker_path(settings).write_text(json.dumps(document, indent=2) + "\n")


def _read_marker(settings: Settings) -> dict | None:
    try:
        document = json.loads(marker_path(settings).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("made_by") != _MADE_BY \
            or not isinstance(document.get("secret_sha256"), str):
        return None
    return document


def _marker_matches(settings: Settings, found: identity.StateIdentity | None) -> bool:
    marker = _read_marker(settings)
    return marker is not None and found is not None and found.secret_sha256 == marker["secret_sha256"]


def state_files(settings: Settings) -> list[Path]:
    """The files of the state the settings point at (SQLite in ``data_dir``) that exist, the marker last."""
    folder = settings.data_dir
    database = identity.sqlite_file(settings.state_url)
    candidates: list[Path] = []
    for sqlite in (p for p in (database, folder / "policies.db") if p is not None):
        candidates += [sqlite, *sorted(sqlite.parent.glob(f"{sqlite.name}-*"))]  # -wal, -shm, -journal, locks
    key = settings.audit_key_path
    held = key.with_name(HELD_CHECKPOINT)
    candidates += [settings.secret_path, key, key.with_name(key.name + ".previous"), held,
                   *sorted(held.parent.glob(f"{held.name}.*.tmp")), folder / "monitors",
                   # the tables ranked for queries (issue 14), when they are kept in the state's folder
                   *([settings.prepared_path] if settings.prepared_path.is_relative_to(folder.resolve()) else []),
                   marker_path(settings)]
    seen: set[Path] = set()
    found = []
    for path in candidates:
        resolved = path.resolve()
        if resolved not in seen and (path.is_file() or path.is_dir()):
            seen.add(resolved)
            found.append(resolved)
    return found


def _server_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port), timeout=0.5):
            return True
    except OSError:
        return False


def reset_plan(settings: Settings) -> list[Path]:
    """What ``civicdp demo --reset`` would remove: the demo's state files ([] if there is none).

    Raises :class:`ResetRefused` unless the state was created by the demo (its marker is
    there and names this state's secret), lives wholly in ``data_dir`` on SQLite, and no
    server answers on the configured port.
    """
    folder = settings.data_dir.resolve()
    if settings.database_url:
        raise ResetRefused("the state is in the database at DATABASE_URL: `civicdp demo --reset` removes only a "
                           "demo's SQLite state in CIVICDP_DATA_DIR, and never drops a database. Unset "
                           "DATABASE_URL to reset the demo's own state")
    for what, path in (("CIVICDP_SECRET_FILE", settings.secret_path), ("CIVICDP_AUDIT_KEY_FILE",
                                                                         settings.audit_key_path)):
        if path.resolve().parent != folder:
            raise ResetRefused(f"{what} points outside the data folder {folder} ({path}): the demo keeps its "
                               "whole state in one folder, so this is not the demo's state. Unset it to reset "
                               "the demo's own state")
    files = state_files(settings)
    if not files:
        return []
    listing = ", ".join(str(p) for p in files)
    marker = _read_marker(settings)
    if marker is None:
        raise ResetRefused(
            f"the state in {folder} was not created by `civicdp demo` (there is no {MARKER} beside it), so "
            f"--reset leaves it alone: {listing}. Point CIVICDP_DATA_DIR at another folder for the demo; if "
            "this really is a demo's state made before civicdp marked them, remove those files yourself")
    database = identity.sqlite_file(settings.state_url)
    if database is not None and database.is_file():
        engine = make_engine(settings.state_url)
        try:
            found = identity.read(engine)
        finally:
            engine.dispose()
        belongs = found is not None and found.secret_sha256 == marker["secret_sha256"]
    else:  # what is left of a demo's state without its database: the secret must be the demo's
        secret = settings.secret_path
        belongs = not secret.is_file() or secret_fingerprint(secret.read_bytes()) == marker["secret_sha256"]
    if not belongs:
        raise ResetRefused(
            f"{marker_path(settings)} names another state than the one in {folder} (its secret's fingerprint "
            "differs): the demo's state was replaced by one the demo did not create, and --reset leaves it "
            "alone. Remove the stale marker if that state is to be kept")
    if _server_answers(settings.host, settings.port):
        raise ResetRefused(f"a server answers on {settings.host}:{settings.port}: stop the demo server (Ctrl-C) "
                           "before removing its state (if it is another program, set CIVICDP_PORT)")
    return files


def remove_state(files: list[Path]) -> None:
    """Remove what :func:`reset_plan` listed (the marker last, so an interrupted reset can be run again)."""
    for path in files:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# -- what the demo prints ---------------------------------------------------------------------


def print_state_note(console: Console, settings: Settings, prepared: Prepared) -> None:
    """Where the state is, and, when the demo continues an earlier one, what it spent and how to start fresh."""
    where = settings.data_dir
    if prepared.created:
        console.print(f"demo state created in {where} (fresh budgets); remove it with `civicdp demo --reset`",
                      highlight=False)
        return
    spent = prepared.spent
    if not prepared.made_by_demo:
        console.print(f"note: the state in {where} was not created by the demo; the demo uses it as it is, and "
                      "`civicdp demo --reset` will not remove it", highlight=False)
    elif spent["lifetime"] > 0:
        console.print(f"note: this demo state, kept from an earlier run, has spent epsilon {spent['lifetime']:g} "
                      f"of the demo dataset's lifetime cap of {spent['lifetime_cap']:g} ({spent['month']:g} this "
                      "month). Start from fresh budgets with `civicdp demo --reset` (or `make demo`)",
                      highlight=False)
    else:
        console.print(f"demo state in {where}, kept from an earlier run (nothing spent yet)", highlight=False)


def print_welcome(console: Console, settings: Settings, keys: dict[str, str], dataset: str) -> None:
    url = f"http://{settings.host}:{settings.port}"
    console.rule("civicdp demo server")
    console.print("API keys (shown once; new ones at every start of the demo):")
    for name, agency, role, role_agency in DEMO_ACCOUNTS:
        console.print(f"  {name:<14} {role.value:<14} agency {agency:<13} {keys[name]}")
    key = keys["ana-health"]
    console.print("\nAsk a question with curl (as analyst ana-health):")
    console.print(f"""  curl -s -X POST {url}/v1/queries -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"dataset": "{dataset}", "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1}}'""",
                  highlight=False)
    console.print("\nOr from Python (in another terminal: . .venv/bin/activate; python):")
    console.print(f"""  from civicdp import Client
  client = Client("{url}", "{key}")
  print(client.datasets()[0]["name"])
  print(client.estimate({{"dataset": "{dataset}", "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1}}))
  frame = client.run({{"dataset": "{dataset}", "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1}})
  print(frame, frame.attrs["charged"], frame.attrs["budgets"])""", highlight=False)
    console.print("\nAudit as oversight (in another terminal, from this folder):")
    console.print(f"""  export CIVICDP_URL={url} CIVICDP_API_KEY={keys["oversight"]}
  .venv/bin/civicdp audit entries --limit 5
  .venv/bin/civicdp audit checkpoint --out held.txt
  .venv/bin/civicdp audit export audit.zip
  .venv/bin/civicdp audit verify audit.zip --public-key "$(curl -s {url}/v1/audit/public-key)" \\
      --trusted-checkpoint held.txt""", highlight=False)
    console.print(f"\nAPI documentation: {url}/docs   (stop the server with Ctrl-C)")
    console.rule()
