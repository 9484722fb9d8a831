"""Import of a large CSV with ``civicdp datasets init``'s code: rows per second, peak memory, time.

Usage::

    python -m bench.import --rows 10000000 [--out bench/out/import] [--seed 1]

Generates (or reuses) a CSV of ``--rows`` events from the demo generator
(``civicdp.synthetic.demo_data``), its request times written as local Amsterdam time with
their UTC offset (``2025-03-30 03:15:00+02:00``: every row's time is converted back to
UTC), then imports it in a fresh process exactly as ``civicdp datasets init`` does — the
conversion to Parquet with every value checked against the type its first rows suggest
(written again if a value further down changes a type), the draft declaration — and
prints the time of each part, rows per second, the CPU seconds used (wall-clock figures
depend on what else the machine runs: the load average is printed), and the peak memory
of that process: its largest resident set (``ru_maxrss``, which counts pages of the CSV
mapped into memory) and its largest anonymous (heap) memory, sampled every 50 ms.
Finally the imported table is compared with the generator's: same rows, same UTC times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl


def make_csv(rows: int, folder: Path, seed: int) -> tuple[Path, Path]:
    """The demo events (``rows`` of them) as CSV, and as the generator's Parquet for comparison."""
    from civicdp.synthetic.demo_data import generate

    csv, truth = folder / f"demo-{rows}.csv", folder / f"demo-{rows}.parquet"
    if csv.exists() and truth.exists():
        return csv, truth
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    people = math.ceil(rows / 4.5)
    while True:
        generate(people, folder / "demo", seed=seed)
        events = pl.read_parquet(folder / "demo" / "events.parquet")
        if events.height >= rows:
            break
        people = math.ceil(people * 1.1 * rows / events.height)
    events = events.head(rows)
    events.write_parquet(truth)
    local = pl.col("request_time").dt.replace_time_zone("UTC").dt.convert_time_zone("Europe/Amsterdam")
    events.with_columns(local.dt.strftime("%Y-%m-%d %H:%M:%S%:z").alias("request_time")).write_csv(csv)
    print(f"generated {rows:,} rows ({csv.stat().st_size / 1e6:,.0f} MB of CSV) in "
          f"{time.perf_counter() - started:.0f} s")
    return csv, truth


def child(csv: Path, out: Path) -> None:
    """The import itself, in this process: timings as JSON on stdout."""
    from civicdp.server.intake.draft import draft_metadata, write_draft
    from civicdp.server.intake.importer import import_source
    from civicdp.server.intake.sources import open_source

    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    last = [time.perf_counter(), ""]

    def progress(stage: str, done: int, total: int | None) -> None:
        if stage != last[1]:
            now = time.perf_counter()
            if last[1]:
                stages[last[1]] = now - last[0]
            last[:] = [now, stage]

    started = time.perf_counter()
    result = import_source(open_source(str(csv)), out / "events.parquet", time_columns=("request_time",),
                           progress=progress)
    stages[str(last[1])] = time.perf_counter() - float(last[0])
    imported = time.perf_counter()
    draft = draft_metadata(result.path, name="bench-import", person="person_id", types=result.types,
                           time_columns=("request_time",), source_label=csv.name)
    write_draft(out, draft)
    print(json.dumps({"rows": result.rows, "stages": stages, "import_s": imported - started,
                      "draft_s": time.perf_counter() - imported}))


def _anonymous_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"RssAnon:\s+(\d+)", status)
    return int(found.group(1)) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/out/import"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    csv, truth = make_csv(args.rows, args.out, args.seed)
    dataset = args.out / f"imported-{args.rows}"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "bench.import", "--child", str(csv), str(dataset)],
                               stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _anonymous_kb(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if process.returncode:
        sys.exit(f"the import failed (exit status {process.returncode})")
    figures = json.loads(output.strip().splitlines()[-1])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    maxrss_mb, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    rows = figures["rows"]
    print(f"import of {rows:,} CSV rows ({csv.stat().st_size / 1e6:,.0f} MB), as civicdp datasets init does it:")
    for stage, seconds in figures["stages"].items():
        print(f"  {stage:<24} {seconds:7.1f} s  {rows / seconds:>12,.0f} rows/s")
    print(f"  {'import':<24} {figures['import_s']:7.1f} s  {rows / figures['import_s']:>12,.0f} rows/s")
    print(f"  {'draft metadata.json':<24} {figures['draft_s']:7.1f} s")
    print(f"  {'total, fresh process':<24} {wall:7.1f} s  {rows / wall:>12,.0f} rows/s  ({cpu:.0f} CPU seconds; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"  peak memory: {maxrss_mb:,.0f} MB resident (ru_maxrss, with the mapped CSV), "
          f"{peak[0] / 1024:,.0f} MB anonymous (heap)")
    print(f"  Parquet written: {(dataset / 'events.parquet').stat().st_size / 1e6:,.0f} MB")
    imported = pl.scan_parquet(dataset / "events.parquet").select("event_id", "request_time")
    expected = pl.scan_parquet(truth).select("event_id", "request_time")
    mismatched = imported.join(expected, on="event_id", suffix="_truth").filter(
        pl.col("request_time") != pl.col("request_time_truth")).select(pl.len()).collect().item()
    count = imported.select(pl.len()).collect().item()
    print(f"  check: {count:,} rows imported, {mismatched:,} request times differ from the generator's UTC times")


if __name__ == "__main__":
    main()
