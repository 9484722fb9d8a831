"""Preparation at registration, and the first query of a fresh server process (issue 14).

Usage::

    python -m bench.prepare [--people 2000000] [--out bench/out/prepare] [--seed 0]

Generates (or reuses) the demo dataset of ``--people`` people (``civicdp.synthetic.demo_data``;
2 M people are ~10 M events and ~29 M processing steps), creates a fresh state, and
registers two folders with ``civicdp datasets register``, each in a fresh process:

- ``events``: the events table alone (its files hard-linked from the demo folder, a
  metadata.json declaring only ``events``): the figure the issue sets (<= 15 s, <= 3 GB);
- ``demo``: the whole demo dataset (events and steps, whose person comes through events).

For each it prints the command's wall time, the preparation time the state recorded, the
CPU seconds and the peak resident memory of the command and its children (their sum,
sampled every 50 ms; the largest single process is printed too), and the load average
(wall-clock figures depend on what else the machine runs; CPU seconds less so). Then it
starts ``civicdp serve`` on the state, and times its first query (a count by service of
the whole events table, then a sum of waiting times by channel), and the time from
the process start to that first answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


#: ``civicdp`` in a fresh process (the console script's entry point).
CIVICDP = [sys.executable, "-c", "from civicdp.server.entry import main; main()"]


def demo_folder(people: int, out: Path, seed: int) -> Path:
    from civicdp.synthetic.demo_data import generate

    folder = out / f"demo-{people}-{seed}"
    if not (folder / "metadata.json").exists():
        started = time.perf_counter()
        summary = generate(people, folder, seed=seed)
        print(f"generated {summary.events:,} events and {summary.steps:,} steps of {people:,} people in "
              f"{time.perf_counter() - started:.0f} s")
    return folder


def events_only(demo: Path, out: Path) -> Path:
    """The demo's events table as a dataset of its own (its files hard-linked, or copied)."""
    folder = out / f"{demo.name}-events"
    metadata = json.loads((demo / "metadata.json").read_text())
    metadata.update(name="civic-demo-events", tables={"events": metadata["tables"]["events"]})
    folder.mkdir(parents=True, exist_ok=True)
    for name in ["events.parquet", *[v for v in (metadata.get("catalogue") or {}).values() if isinstance(v, str)]]:
        if not (folder / name).exists():
            try:
                os.link(demo / name, folder / name)
            except OSError:
                shutil.copy2(demo / name, folder / name)
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=1))
    return folder


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as handle:
                    pids.extend(int(p) for p in handle.read().split())
        except OSError:
            pass
        i += 1
    return pids


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return int(re.search(r"VmRSS:\s+(\d+)", handle.read()).group(1))  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return 0


def measured(command: list[str], env: dict[str, str]) -> dict[str, float | str]:
    """Run ``command``; wall time, CPU seconds and peak memory of it and its children."""
    peak = {"sum": 0, "one": 0}
    started = time.perf_counter()
    before = os.times()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample() -> None:
        while process.poll() is None:
            sizes = [_rss_kb(p) for p in _tree(process.pid)]
            peak["sum"], peak["one"] = max(peak["sum"], sum(sizes)), max(peak["one"], max(sizes, default=0))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    after = os.times()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{output}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": time.perf_counter() - started, "cpu_s": cpu, "peak_rss_gb": peak["sum"] / 1024 ** 2,
            "largest_process_gb": peak["one"] / 1024 ** 2, "output": output}


def civicdp(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*CIVICDP, *args], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"civicdp {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def recorded_seconds(output: str) -> float | None:
    found = re.search(r"version \S+ in ([0-9.]+) s", output)
    return float(found.group(1)) if found else None


def first_queries(env: dict[str, str], key: str, dataset: str) -> dict[str, float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    server = subprocess.Popen([*CIVICDP, "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 60:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        serving = time.perf_counter() - started
        times = {}
        for label, spec in (("count by service", {"aggregate": "count", "group_by": ["service_id"]}),
                            ("mean wait by channel", {"aggregate": "mean", "column": "waiting_minutes",
                                                      "group_by": ["channel"]})):
            asked = time.perf_counter()
            answer = httpx.post(f"{url}/v1/queries", headers=headers, timeout=120,
                                json={"dataset": dataset, "epsilon": 0.1, **spec})
            if answer.status_code != 200:
                raise SystemExit(f"query failed: {answer.status_code} {answer.text}")
            times[label] = time.perf_counter() - asked
        return {"serving_after_s": serving, **{f"{k}_s": v for k, v in times.items()},
                "start_to_first_answer_s": serving + times["count by service"]}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/out/prepare"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out.resolve()
    demo = demo_folder(args.people, out, args.seed)
    folders = {"events": events_only(demo, out), "demo": demo}
    state = out / f"state-{os.getpid()}"
    env = {**os.environ, "CIVICDP_DATA_DIR": str(state), "CIVICDP_PREPARED_KEEP_SECONDS": "0"}
    for name in ("DATABASE_URL", "CIVICDP_DATABASE_URL", "CIVICDP_PREPARED_DIR", "CIVICDP_INIT_STATE"):
        env.pop(name, None)
    civicdp(env, "init")
    civicdp(env, "accounts", "create", "analyst", "--agency", "health")
    civicdp(env, "roles", "grant", "analyst", "analyst", "health")
    key = re.search(r"cdp_\S+", civicdp(env, "keys", "create", "analyst")).group(0)  # type: ignore[union-attr]
    results: dict[str, object] = {"people": args.people, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    for label, folder in folders.items():
        run = measured([*CIVICDP, "datasets", "register", str(folder)], env)
        output = str(run.pop("output"))
        run["prepared_s"] = recorded_seconds(output)
        results[f"register {label}"] = run
        print(f"register {label}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()})}")
    events = json.loads((demo / "metadata.json").read_text())["name"]
    results["first queries (fresh server)"] = first_queries(env, key, events)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=1, default=lambda v: round(v, 2) if isinstance(v, float) else str(v)))
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
