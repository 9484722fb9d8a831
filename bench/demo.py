"""The demo dataset a benchmark runs on, generated once into bench/out/."""

from __future__ import annotations

import time
from pathlib import Path


def demo_dataset(workload: str, people: int, seed: int, folder: Path | None = None) -> Path:
    """``folder`` (default ``bench/out/<workload>-<people>-<seed>``), generated if it holds no dataset."""
    data = folder or Path("bench/out") / f"{workload}-{people}-{seed}"
    if not (data / "metadata.json").exists():
        from civicdp.synthetic.demo_data import generate

        started = time.perf_counter()
        summary = generate(people, data, seed=seed)
        print(f"generated {summary.events:,} events for {people:,} people in {time.perf_counter() - started:.1f} s")
    return data
