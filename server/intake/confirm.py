"""The steward's confirmation of values a draft declaration proposed from the data.

``civicdp datasets init`` lists in ``proposed_from_data.fields`` every value it read off
the data (keys, bounds, ...); registration refuses the declaration while any is listed
(``server/state/dataset_checks.py``). :func:`marked` shows each listed value as it now
stands in ``metadata.json`` (the steward may have edited it); :func:`confirm` removes the
marks — all, or those ``names`` select — and ``proposed_from_data`` itself once empty.
The rest of the file is kept as the steward left it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from civicdp.queries.metadata import load_metadata
from civicdp.server.intake.draft import dumps
from civicdp.server.state.dataset_checks import proposal_target

NOT_SET = object()


@dataclass(frozen=True)
class Mark:
    entry: str
    field: str
    table: str | None
    column: str | None
    value: Any  # NOT_SET when the steward removed the field


def marked(folder: Path) -> list[Mark]:
    """Every value still marked as proposed from the data, with its current value."""
    metadata = load_metadata(folder)  # a valid declaration, or an error naming the field
    raw = _raw(folder)
    marks = []
    for entry in metadata.proposed_from_data.fields if metadata.proposed_from_data else ():
        target = proposal_target(metadata, entry)
        if target is None:
            marks.append(Mark(entry, entry, None, None, NOT_SET))
            continue
        field, table, column = target
        holder = raw if table is None else raw["tables"][table]["columns"][column]
        marks.append(Mark(entry, field, table, column, holder.get(field, NOT_SET)))
    return marks


def select(marks: list[Mark], names: list[str]) -> list[Mark]:
    """The marks ``names`` select: a whole entry, its tail (``channel.keys``), a column (``channel``)
    or a field (``keys``)."""
    chosen = []
    for name in names:
        found = [m for m in marks if m.entry == name or m.entry.endswith("." + name) or m.column == name
                 or m.field == name]
        if not found:
            raise ValueError(f"--field {name}: nothing marked matches it; marked: "
                             f"{', '.join(m.entry for m in marks) or 'nothing'}")
        chosen += [m for m in found if m not in chosen]
    return chosen


def confirm(folder: Path, chosen: list[Mark]) -> list[str]:
    """Remove the marks of ``chosen``; the entries still marked afterwards."""
    raw = _raw(folder)
    proposed = raw.get("proposed_from_data") or {}
    drop = {m.entry for m in chosen}
    left = [entry for entry in proposed.get("fields", []) if entry not in drop]
    if left:
        proposed["fields"] = left
    else:
        raw.pop("proposed_from_data", None)
    path = Path(folder) / "metadata.json"
    partial = path.with_name("metadata.json.partial")
    partial.write_text(dumps(raw) + "\n")
    os.replace(partial, path)
    return left


def shown(value: Any, limit: int = 12) -> str:
    """A marked value, short: long key lists show their first values and their count."""
    if value is NOT_SET:
        return "(not set: removed from the declaration)"
    if isinstance(value, list) and len(value) > limit:
        return json.dumps(value[:limit], ensure_ascii=False)[:-1] + f", ... ({len(value):,} values)]"
    return json.dumps(value, ensure_ascii=False)


def _raw(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "metadata.json").read_text())
