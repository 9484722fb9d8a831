"""Start worker processes together and collect their JSON reports (for multi-process races).

Each worker is ``python -c SCRIPT args...``; it touches ``<folder>/<name>.ready`` when set
up and waits for ``<folder>/go`` before it races, then prints one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def race(script: str, folder: Path, runs: dict[str, list[str]], timeout: float = 120) -> list[dict[str, Any]]:
    """Run ``script`` once per name in ``runs`` (with that name's arguments), released at once."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    workers = [subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for args in runs.values()]
    try:
        deadline = time.monotonic() + 60
        while not all((folder / f"{name}.ready").exists() for name in runs):
            assert all(w.poll() is None for w in workers), [w.communicate() for w in workers]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.01)
        (folder / "go").touch()
        reports = []
        for worker in workers:
            out, err = worker.communicate(timeout=timeout)
            assert worker.returncode == 0, err
            reports.append(json.loads(out))
        return reports
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
