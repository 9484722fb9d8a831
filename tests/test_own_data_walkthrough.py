"""Runs docs/own-data.md: every ```sh block, in order, on the real files in ../shared/data.

Skipped only when ../shared/data (beside the repository) is absent; nothing else in the
suite needs it. The blocks run as written, each in its own bash, with the variables the
first block sets (WALK, CIVICDP_DATA_DIR, PORT, SHARED) given by the test: WALK is a
temporary folder, PORT a free port. The block that starts the server runs in the
background until the blocks after it are done.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DOC = REPO / "docs" / "own-data.md"
FILES = [SHARED / "la311" / "myla311_2018-01-01_to_04_sample.csv", SHARED / "wabo_receipt" / "receipt.csv"]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.S | re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server was not ready in time")


def test_doc_has_the_blocks_the_test_relies_on():
    blocks = sh_blocks(DOC.read_text())
    assert sum("civicdp serve" in b for b in blocks) == 1
    assert any("datasets init" in b and "la311" in b for b in blocks)
    assert any("datasets init" in b and "receipt.csv" in b for b in blocks)


@pytest.mark.slow
def test_own_data_walkthrough(tmp_path):
    if not all(f.is_file() for f in FILES):
        pytest.skip(f"the real data files are not in {SHARED} (../shared/data beside the repository)")
    blocks = sh_blocks(DOC.read_text())
    walk, port = tmp_path / "walk", free_port()
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(WALK=str(walk), CIVICDP_DATA_DIR=str(walk / "state"), PORT=str(port), SHARED=str(SHARED),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", COLUMNS="120")
    server = None
    try:
        for block in blocks:
            # the interpreter running the tests stands in for the activated .venv
            script = "\n".join(l for l in block.splitlines() if not l.startswith(". .venv/bin/activate"))
            if "civicdp serve" in block:
                server = subprocess.Popen(["bash", "-e", "-c", script], cwd=REPO, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
                wait_ready(port, server)
                continue
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"block failed ({done.returncode}):\n{block}\n{done.stdout}\n{done.stderr}"
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    assert server is not None, "no block started the server"
    wabo = json.loads((walk / "wabo-answer.json").read_text())
    assert {r["case_channel"] for r in wabo["rows"]} == {"Desk", "Intern", "Internet", "Post", "e-mail"}
    assert all(r["ci_low"] < r["ci_high"] for r in wabo["rows"])
    with open(walk / "la311-answer.csv", newline="") as f:
        la311 = list(csv.DictReader(f))
    assert len(la311) == 12 and {"RequestType", "value", "ci_low", "ci_high"} <= set(la311[0])
