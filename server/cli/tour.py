"""``civicdp tour``: the four W1 questions, bundle discovery and service performance, asked
of the demo data through the engine."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from civicdp.queries.engine import Engine, LocalDataset

W1 = [
    ("Q1: how many requests did each service receive?",
     {"aggregate": "count", "group_by": ["service_id"], "epsilon": 0.3, "contributions": "auto"}),
    ("Q2: how long does each department take on average (hours, clipped to [0, 720])?",
     {"aggregate": "mean", "column": "duration_hours", "bounds": [0, 720], "group_by": ["department"],
      "epsilon": 0.45, "contributions": 10}),
    ("Q3: median and 90th percentile of waiting minutes per channel",
     {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5, 0.9],
      "candidates": {"start": 0, "stop": 240, "step": 0.05}, "group_by": ["channel"],
      "filters": [{"column": "channel", "op": "in", "values": ["counter", "kiosk"]}],
      "epsilon": 0.15, "contributions": 3}),
    ("Q4: requests per channel and hour of day",
     {"aggregate": "count", "group_by": ["channel", "request_time:hour"], "epsilon": 0.1,
      "contributions": "auto"}),
]


def _accuracy(accuracy: dict) -> str:
    confidence = "at 95% confidence"
    if "half_width" in accuracy:
        return f"each value within ±{accuracy['half_width']:,.1f} {accuracy['unit']} {confidence}"
    if "sum_half_width" in accuracy:
        return (f"sums within ±{accuracy['sum_half_width']:,.0f} and counts within "
                f"±{accuracy['count_half_width']:,.0f} {confidence}")
    ranks = ", ".join(f"p{float(level) * 100:g} ±{rows:,.0f}" for level, rows in accuracy["rank_error"].items())
    return f"rank error in rows {confidence}: {ranks}"


def run_tour(data: Path, people: int, engine: Engine, console: Console) -> None:
    from civicdp.server.cli.output import print_result
    from civicdp.server.cli.tour_bundles import show_bundles
    from civicdp.server.cli.tour_performance import show_performance
    from civicdp.synthetic.demo_data import generate

    if not (data / "metadata.json").exists():
        console.print(f"generating demo data for {people:,} people in {data} ...")
        summary = generate(people, data, seed=0)
        console.print(f"  {summary.events:,} events in {summary.seconds:.1f} s")
    dataset = LocalDataset(data, engine)
    total = None
    for title, spec in W1:
        estimate = dataset.estimate(spec)
        console.rule(title)
        console.print(f"estimate (free, reads no data): {estimate.loss}; {_accuracy(estimate.accuracy)}")
        for note in estimate.notes:
            console.print(f"  ({note})")
        result = dataset.run(spec)
        if spec["aggregate"] == "count" and len(spec["group_by"]) == 1:
            result.table = result.table.sort("value", descending=True)  # post-processing: free
        print_result(result, limit=12)
        total = result.loss if total is None else total + result.loss
    total = total + show_bundles(data, dataset, console) + show_performance(data, dataset, console)  # type: ignore[operator]
    console.rule()
    console.print(f"total privacy loss of the tour: {total} (pure differential privacy, per person; the losses "
                  "of separate questions add up)")
