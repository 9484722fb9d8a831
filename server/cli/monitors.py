"""``civicdp monitors``: stewards define monitors and append batches on the server machine; list them.

Commands act on the state database directly (``CIVICDP_DATA_DIR`` or ``DATABASE_URL``)
as the operator, and are recorded like the API's requests. A batch is a Parquet file of
events covering a declared time range ``[start, end)``; batches must come in time order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from civicdp.privacy.errors import PrivacyError
from civicdp.queries.errors import QueryError
from civicdp.server.services.bootstrap import build_state
from civicdp.server.state.caller import Caller
from civicdp.server.cli.common import fail, read_json
from civicdp.server.state.errors import Conflict, NotFound
from civicdp.server.state.ledger import BudgetRefused
from civicdp.server.monitors.service import MonitorService, monitor_dict, release_dict
from civicdp.server.state.settings import Settings

console = Console(soft_wrap=True)
monitors = typer.Typer(help="Monitors: continual private releases with alerts (define, batch, list, show).",
                       no_args_is_help=True)
OPERATOR = Caller(account_id=None, name="operator", agency="*")  # type: ignore[arg-type]



@contextmanager
def _service() -> Iterator[MonitorService]:
    settings = Settings()
    state = build_state(settings)
    try:
        yield MonitorService(state.db, settings.data_dir, state.caps)
    except (NotFound, Conflict, QueryError, BudgetRefused, PrivacyError, ValueError) as exc:
        fail(str(exc))
    finally:
        state.close()


@monitors.command("define")
def define(definition: Annotated[Path, typer.Argument(help="The monitor definition, a JSON file")]) -> None:
    """Define a monitor; its total privacy loss for the whole horizon is charged now."""
    body = read_json(definition, "monitor definition file")
    with _service() as service:
        row = monitor_dict(service.define(OPERATOR, body))
    console.print(f"defined monitor {row['name']} on {row['dataset']}: {row['horizon']} steps of "
                  f"{row['step_seconds']} s from {row['start']}, epsilon {row['loss']['epsilon']:g} for the whole horizon")


@monitors.command("batch")
def batch(
    name: Annotated[str, typer.Argument(help="The monitor")],
    parquet: Annotated[Path, typer.Argument(help="A Parquet file of events")],
    start: Annotated[datetime, typer.Option(help="Start of the time range the batch covers (ISO)")],
    end: Annotated[datetime, typer.Option(help="End (excluded) of the time range the batch covers (ISO)")],
) -> None:
    """Append a batch of events; prints the steps it released and the alerts raised."""
    if not parquet.is_file():
        fail(f"no batch file at {parquet}")
    with _service() as service:
        out = service.append(OPERATOR, name, parquet.read_bytes(), start, end)
    console.print(f"batch {out['seq']} of {name}: {out['rows']} rows; released steps {out['released_steps']}")
    for alert in out["alerts"]:
        console.print(f"  ALERT step {alert['step']} ({alert['step_start']}): {alert['rule_text']} — "
                      f"{alert['group']} = {alert['value']:.3g} [{alert['ci_low']:.3g}, {alert['ci_high']:.3g}]")


@monitors.command("list")
def list_monitors() -> None:
    """Every monitor with its total loss and progress (JSON)."""
    with _service() as service:
        console.print_json(json.dumps([monitor_dict(m) for m in service.list()]))


@monitors.command("show")
def show(name: Annotated[str, typer.Argument(help="The monitor")]) -> None:
    """A monitor's released steps and alerts (JSON)."""
    with _service() as service:
        from civicdp.server.monitors.service import alert_dict

        console.print_json(json.dumps({"monitor": monitor_dict(service.get(name)),
                                       "releases": [release_dict(r) for r in service.releases(name)],
                                       "alerts": [alert_dict(a, name) for a in service.alerts(name)]}))
