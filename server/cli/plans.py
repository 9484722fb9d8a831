"""``civicdp plan FILE.json``: plan a workload and print each part's loss and predicted accuracy (free).

With ``--data DIR`` the plan is made against that dataset folder; otherwise against the
version of the plan's dataset registered in the server's state (``CIVICDP_DATA_DIR`` or
``DATABASE_URL``). Either way no data is read and nothing is charged: running a plan is
the API's (``POST /v1/plans``, then ``POST /v1/plans/{id}/run``), under the analyst's budgets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from civicdp.privacy.errors import PrivacyError
from civicdp.queries.context import EngineLimits
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import load_metadata
from civicdp.queries.plans import report
from civicdp.queries.plans.planner import plan_workload
from civicdp.server.cli.common import fail, read_json
from civicdp.server.state.settings import Settings

console = Console(soft_wrap=True)


def _planned(raw: Any, data: Path | None) -> dict[str, Any]:
    settings = Settings()
    limits = EngineLimits(max_epsilon=settings.max_epsilon, auto_fraction=settings.auto_fraction)
    if data is not None:
        return report.describe(plan_workload(raw, load_metadata(data), data, limits))
    from sqlmodel import Session  # noqa: PLC0415 - only when the state is used

    from civicdp.server.services.bootstrap import build_state  # noqa: PLC0415
    from civicdp.server.state import registry  # noqa: PLC0415

    name = raw.get("dataset") if isinstance(raw, dict) else None
    if not isinstance(name, str):
        fail('the plan names no dataset: add "dataset": "<name>", or give --data DIR')
    state = build_state(settings)
    try:
        with Session(state.db) as session:
            row = registry.served(session, name)
        return report.describe(plan_workload(raw, registry.metadata_of(row), Path(row.path), limits))
    finally:
        state.close()


def plan(
    file: Annotated[Path, typer.Argument(help="The plan, a JSON file (docs/metadata.md, 'Plans')")],
    data: Annotated[Path | None, typer.Option(help="Plan against this dataset folder instead of the registered one")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole plan as JSON")] = False,
) -> None:
    """Plan a workload: each part's loss and predicted accuracy, and the total. Free; reads no data."""
    raw = read_json(file, "plan file")
    try:
        planned = _planned(raw, data)
    except (QueryError, PrivacyError) as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the registry's own refusals (unknown dataset, not prepared)
        fail(str(exc))
    if as_json:
        console.print_json(json.dumps(planned))
        return
    table = Table("part", "aggregate", "target", "epsilon", "predicted", "shared / derived")
    for part in planned["parts"]:
        target = part["target"] or {"weight": part["weight"]}
        wanted = " ".join(f"{k}={v:g}" for k, v in target.items() if v is not None and k != "confidence")
        predicted = part["predicted"]
        shown = predicted.get("half_width", predicted.get("rank_half_width"))
        shown = (" ".join(f"q{k}:{v:.4g}" for k, v in shown.items()) if isinstance(shown, dict)
                 else "" if shown is None else f"±{shown:.4g}")
        loss = "free" if part["loss"] is None else f"{part['loss']['epsilon']:.4g}"
        shared = f"from {part['derived_from']}" if part["derived_from"] else ", ".join(predicted.get("shares_with", []))
        table.add_row(part["name"], part["aggregate"], wanted, loss, shown, shared)
    console.print(table)
    total = planned["total"]
    rho = f", rho {total['rho']:.6g}" if "rho" in total else ""
    console.print(f"total: epsilon {total['epsilon']:.6g}{rho} over {len(planned['groups'])} queries "
                  f"({planned['accounting']['mode']} accounting, {planned['contributions']} rows per person)",
                  highlight=False)
