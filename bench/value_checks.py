"""The value checks registration runs (issue 14): rows outside keys, clipped values, open cases.

Usage::

    python -m bench.value_checks [--people 2000000] [--out bench/out/prepare] [--seed 0] [--folder DIR]

Counts, as ``civicdp datasets register`` and ``datasets check`` do
(``civicdp.server.state.value_checks``), every declared column of every table of the demo
dataset of ``--people`` people (generated as ``bench.prepare`` does, or reused), or of
``--folder``, and prints the rows, what was found, the wall time, the CPU seconds of the
process and its peak resident memory. Wall time depends on what else the machine runs;
CPU seconds less so.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

from bench.prepare import demo_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/out/prepare"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, default=None, help="A dataset folder to check instead of the demo")
    args = parser.parse_args()
    from civicdp.queries.metadata import load_metadata
    from civicdp.server.state import value_checks

    folder = args.folder or demo_folder(args.people, args.out, args.seed)
    metadata = load_metadata(folder)
    started, cpu = time.perf_counter(), time.process_time()
    counts = value_checks.count_values(folder, metadata)
    found = value_checks.findings(metadata, counts)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print("rows: " + ", ".join(f"{t.table} {t.rows:,}" for t in counts))
    for f in found:
        print(f"found: {f.kind} {f.table}.{f.column}: {f.rows:,} of {f.total:,} ({f.share:.2%})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    print(f"value checks: {wall:.1f} s wall, {cpu:.1f} CPU-s, peak resident {peak:.2f} GB "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
