"""``civicdp demo``: demo data, demo accounts for every role, fresh keys, examples, then serve."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from sqlmodel import select

from civicdp.policies.actions import Role
from civicdp.server.services import admin
from civicdp.server.services.bootstrap import build_state
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import Account, ApiKey, utcnow
from civicdp.server.state.settings import Settings

DEMO_ACCOUNTS = [  # name, agency, role, role's agency ("*": every agency)
    ("steward", "civic-office", Role.STEWARD, "*"),
    ("ana-health", "health", Role.ANALYST, "health"),
    ("ana-transport", "transport", Role.ANALYST, "transport"),
    ("oversight", "audit-office", Role.OVERSIGHT, "*"),
    ("feed-health", "health", Role.FEED_CONSUMER, "health"),
]


def prepare_demo(settings: Settings, data: Path, people: int, console: Console) -> dict[str, str]:
    """Create what the demo needs (idempotent) and return a fresh API key per demo account.

    The demo makes its own state (as ``civicdp init`` would) if there is none where the
    settings point, and uses the existing one otherwise (its files must match it).
    """
    from civicdp.synthetic.demo_data import generate

    if not (data / "metadata.json").exists():
        console.print(f"generating demo data for {people:,} people in {data} ...")
        generate(people, data, seed=0)
    state = build_state(settings, init=True)
    keys: dict[str, str] = {}
    try:
        with session_scope(state.db) as session:
            admin.register_dataset(session, state.policies, None, data)
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
    finally:
        state.close()
    return keys


def print_welcome(console: Console, settings: Settings, keys: dict[str, str], dataset: str) -> None:
    url = f"http://{settings.host}:{settings.port}"
    console.rule("civicdp demo server")
    console.print("API keys (shown once; new ones at every `make demo`):")
    for name, agency, role, role_agency in DEMO_ACCOUNTS:
        console.print(f"  {name:<14} {role.value:<14} agency {agency:<13} {keys[name]}")
    key = keys["ana-health"]
    console.print("\nAsk a question with curl (as analyst ana-health):")
    console.print(f"""  curl -s -X POST {url}/v1/queries -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"dataset": "{dataset}", "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1}}'""",
                  highlight=False)
    console.print("\nOr from Python (in another terminal: . .venv/bin/activate; python):")
    console.print(f"""  from civicdp.queries.client import Client
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
