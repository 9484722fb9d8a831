"""``civicdp tour``, bundle discovery: the private top pairs and bundles beside the planted truth."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from civicdp.privacy.loss import PrivacyLoss
from civicdp.queries.engine import LocalDataset

SPEC = {"analysis": "bundles", "window_days": 30, "top_k": 50, "epsilon": 0.5}
SHOWN_PAIRS = 25


def _planted(data: Path) -> list[frozenset[str]]:
    path = data / "bundles.json"
    if not path.exists():
        return []
    return [frozenset(b["services"]) for b in json.loads(path.read_text())]


def show_bundles(data: Path, dataset: LocalDataset, console: Console) -> PrivacyLoss:
    """Ask the ``bundles`` analysis of the demo data and compare with the planted bundles; its loss."""
    console.rule("Bundles: which services do the same people use within 30 days?")
    estimate = dataset.estimate(SPEC)
    console.print(f"estimate (free, reads no data): {estimate.loss}; pair counts within "
                  f"±{estimate.accuracy['pair_half_width']:,.0f} people at 95% confidence for 10 pairs per person")
    result = dataset.run(SPEC)
    planted = _planted(data)
    planted_pairs = {frozenset((a, b)) for bundle in planted for a in bundle for b in bundle if a < b}

    pairs = Table(title=f"top {SHOWN_PAIRS} of {result.table.height} pairs (people, 95% interval)",
                  title_justify="left")
    for name in ("rank", "pair", "people", "interval", "conf a→b", "conf b→a", "lift", "linked", "planted"):
        pairs.add_column(name, justify="left" if name in ("pair", "interval") else "right")
    for row in result.table.head(SHOWN_PAIRS).iter_rows(named=True):
        a, b = row["service_id_a"], row["service_id_b"]
        pairs.add_row(str(row["rank"]), f"{a} + {b}", f"{row['value']:,}",
                      f"[{row['ci_low']:,.0f}, {row['ci_high']:,.0f}]", _num(row["confidence_ab"]),
                      _num(row["confidence_ba"]), _num(row["lift"]), "yes" if row["linked"] else "no",
                      "yes" if frozenset((a, b)) in planted_pairs else "-")
    console.print(pairs)

    found = {frozenset(m.split(" + ")): row for m, row in
             zip(result.tables["bundles"]["members"], result.tables["bundles"].iter_rows(named=True))}
    side = Table(title="bundles found (private) beside the planted ground truth", title_justify="left")
    for name in ("found", "people (weakest pair)", "planted bundle", "verdict"):
        side.add_column(name)
    for members, row in found.items():
        match = members in planted
        side.add_row(row["members"], f"{row['value']:,} [{row['ci_low']:,.0f}, {row['ci_high']:,.0f}]",
                     " + ".join(sorted(members)) if match else "-", "planted" if match else "not planted")
    for bundle in planted:
        if bundle not in found:
            side.add_row("-", "-", " + ".join(sorted(bundle)), "missed")
    console.print(side)
    recovered = sum(1 for bundle in planted if bundle in found)
    top = {frozenset((a, b)) for a, b in zip(result.table["service_id_a"], result.table["service_id_b"])}
    console.print(f"planted bundles recovered exactly: {recovered} of {len(planted)}; planted pairs in the top "
                  f"{result.table.height}: {len(top & planted_pairs)} of {len(planted_pairs)}; "
                  f"privacy loss {result.loss}, at most {result.contributions} pairs per person (chosen privately)")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print("compare two periods with examples/bundle_changes.json: "
                  "civicdp query data/demo examples/bundle_changes.json")
    return result.loss


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"
