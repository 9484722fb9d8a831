"""Shared by the intake tests: running the intake commands and reading exact answers.

``exact_counts`` is what the engine's backend counts for a spec before any noise is added
(the count kind's cells, aligned on every public key), so an import can be checked against
a hand-computed answer without the noise getting in the way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from civicdp import LocalDataset
from civicdp.queries.backend import AggregateRequest
from civicdp.queries.engine import Engine
from civicdp.queries.kinds.base import aligned
from civicdp.queries.polars_backend import PolarsBackend
from civicdp.server.entry import app

runner = CliRunner()


def civicdp(*args: str, input: str | None = None) -> Result:
    return runner.invoke(app, [str(a) for a in args], input=input)


def init(source: Path | str, out: Path, *extra: str, person: str = "person_id") -> Result:
    result = civicdp("datasets", "init", source, "--name", "imported", "--person-column", person, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return result


def exact_counts(folder: Path, group_by: list[str], contributions: int | None = None) -> dict[Any, int]:
    """Rows per key of ``group_by`` (one column) as the backend counts them, before noise."""
    dataset = LocalDataset(folder)
    spec = {"aggregate": "count", "group_by": group_by, "epsilon": 1.0}
    plan = Engine().plan(spec, dataset.metadata, dataset.path)
    ctx = plan.context
    request = AggregateRequest(dataset.path, dataset.metadata, "events",
                               contributions or dataset.metadata.max_contributions, ctx.filters, ctx.group_by,
                               plan.kind.measure(ctx))
    cells = aligned(ctx, PolarsBackend().aggregate(request), ["rows"])
    return dict(cells.select(group_by[0], "rows").iter_rows())
