"""``civicdp demo --reset`` / ``--remove`` (issue 15): the demo starts from fresh budgets, on its own state only.

The demo marks a state it creates (``demo-state.json`` beside it, naming the state's
secret); ``--reset`` removes that state — database, policy rules, secret, signing key,
monitors' files — after listing it and asking, and then sets up a fresh demo;
``--remove`` only removes it (``make clean``). A state the demo did not create (no
marker, or a marker naming another state), a PostgreSQL state, or a state whose server
is still answering is refused and left untouched. ``make demo`` resets every time and
``make clean`` removes the demo's state.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from civicdp.server.cli.demo import MARKER, ResetRefused, prepare, reset_plan
from civicdp.server.entry import app as cli
from civicdp.server.services.bootstrap import init_state
from civicdp.server.state.settings import Settings
from tests.server.api_fixtures import ANALYST, count_query, make_dataset_folder, running_api

runner = CliRunner()
REPO = Path(__file__).resolve().parents[3]
STATE_FILES = {"civicdp.db", "policies.db", "server.secret", "audit-signing.key"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The settings the command line will read: a state folder in tmp_path, a port nothing listens on."""
    for name in ("DATABASE_URL", "CIVICDP_DATABASE_URL", "CIVICDP_INIT_STATE", "CIVICDP_SECRET_FILE",
                 "CIVICDP_AUDIT_KEY_FILE", "CIVICDP_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CIVICDP_PORT", str(_free_port()))
    monkeypatch.setenv("CIVICDP_FEEDS_SCHEDULER", "false")
    return Settings()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_dataset_folder(tmp_path / "datasets")


def _demo(settings: Settings, folder: Path) -> dict[str, str]:
    return prepare(settings, folder, 1000, Console(file=io.StringIO())).keys


def _names(settings: Settings) -> set[str]:
    return {p.name for p in settings.data_dir.iterdir()} if settings.data_dir.exists() else set()


SPEND = """
import json, sys
from pathlib import Path
from tests.server.api_fixtures import ANALYST, count_query, running_api
data_dir, keys = Path(sys.argv[1]), json.loads(sys.argv[2])
with running_api(data_dir, None, keys=keys, init_state=False, feeds_scheduler=False) as api:
    for epsilon in (0.5, 0.4, 0.1):
        assert api.query(ANALYST, count_query(epsilon=epsilon)).status_code == 200
    assert api.query(ANALYST, count_query(epsilon=0.2)).status_code == 409
    assert api.spent_micro(ANALYST)["analyst"] == 1_000_000
    assert api.get("oversight", "/v1/audit/checkpoint").status_code == 200  # signed, and kept beside the key
"""
KEY_LINE = re.compile(r"^\s+(\S+)\s+\S+\s+agency \S+\s+(cdp_\S+)$", re.MULTILINE)


def _civicdp(*args: str) -> str:
    """``civicdp *args`` in a process of its own, as a person runs it; its output."""
    done = subprocess.run([str(Path(sys.executable).parent / "civicdp"), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_reset_removes_the_demo_state_and_budgets_start_fresh(env: Settings, folder: Path) -> None:
    """An earlier demo (other processes) spent a budget; `demo --reset` then starts afresh, as `make demo` does.

    The earlier runs are processes of their own, as they are for a person: a process keeps
    what it learnt of a database's audit log (per database URL), which a state made anew
    at the same path within that process would inherit.
    """
    keys = dict(KEY_LINE.findall(_civicdp("demo", "--no-serve", "--data", str(folder))))
    assert set(keys) == {"steward", "ana-health", "ana-transport", "oversight", "feed-health"}
    assert STATE_FILES | {MARKER} <= _names(env)
    assert json.loads((env.data_dir / MARKER).read_text())["made_by"] == "civicdp demo"
    subprocess.run([sys.executable, "-c", SPEND, str(env.data_dir), json.dumps(keys)], cwd=REPO, check=True)
    (env.data_dir / "monitors").mkdir(exist_ok=True)  # as a monitor's batches leave it
    kept = _civicdp("demo", "--no-serve", "--data", str(folder))  # no reset: says what was spent, and how to reset
    assert "has spent epsilon 1 " in kept and "civicdp demo --reset" in kept

    left = _names(env)  # everything a demo run left in the state folder
    assert STATE_FILES | {MARKER, "monitors", "audit-latest-checkpoint.txt"} <= left
    result = runner.invoke(cli, ["demo", "--reset", "--yes", "--no-serve", "--data", str(folder)])
    assert result.exit_code == 0, result.output
    for name in sorted(left):
        assert f"/{name}" in result.output  # listed before removal, and removed
    assert "removed the demo's state" in result.output and "fresh budgets" in result.output
    assert (folder / "metadata.json").is_file()  # the dataset is not state
    fresh = dict(KEY_LINE.findall(result.output))
    assert set(fresh) == set(keys) and not set(fresh.values()) & set(keys.values())

    with running_api(env.data_dir, None, keys={**fresh, "old": keys[ANALYST]}, init_state=False,
                     feeds_scheduler=False) as api:
        assert api.spent_micro(ANALYST) == {"analyst": 0, "agency": 0, "dataset": 0, "lifetime": 0}
        assert api.query("old", count_query()).status_code == 401  # the old state's keys are gone with it
        assert api.query(ANALYST, count_query(epsilon=0.5)).status_code == 200
        assert api.spent_micro(ANALYST)["analyst"] == 500_000
        assert len(api.records("query.run")) == 1  # a new audit log: nothing of the old one


def test_remove_only_removes_and_asks_first(env: Settings, folder: Path) -> None:
    _demo(env, folder)
    before = _names(env)
    declined = runner.invoke(cli, ["demo", "--remove"], input="n\n")
    assert declined.exit_code != 0 and "Remove these?" in declined.output
    assert _names(env) == before
    removed = runner.invoke(cli, ["demo", "--remove"], input="y\n")
    assert removed.exit_code == 0, removed.output
    assert _names(env) == set()  # nothing set up again
    again = runner.invoke(cli, ["demo", "--remove", "--yes"])
    assert again.exit_code == 0 and "nothing to remove" in again.output


def test_reset_refuses_a_state_the_demo_did_not_create(env: Settings, folder: Path, tmp_path: Path) -> None:
    init_state(env)  # `civicdp init`: no marker
    before = {p.name: p.read_bytes() for p in env.data_dir.iterdir() if p.is_file()}
    for flags in (["--reset", "--yes", "--no-serve"], ["--remove", "--yes"]):
        result = runner.invoke(cli, ["demo", *flags, "--data", str(folder)])
        assert result.exit_code == 2, result.output
        assert "not created by `civicdp demo`" in result.output
    assert {p.name: p.read_bytes() for p in env.data_dir.iterdir() if p.is_file()} == before

    # A marker copied from a demo's state does not make another state the demo's.
    demo_settings = Settings(data_dir=tmp_path / "demo-state", port=env.port)
    _demo(demo_settings, folder)
    shutil.copy(demo_settings.data_dir / MARKER, env.data_dir / MARKER)
    with pytest.raises(ResetRefused, match="names another state"):
        reset_plan(env)
    assert STATE_FILES <= _names(env)


def test_reset_refuses_a_database_elsewhere_or_a_running_server(env: Settings, folder: Path) -> None:
    _demo(env, folder)
    before = _names(env)
    elsewhere = Settings(data_dir=env.data_dir, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(ResetRefused, match="DATABASE_URL"):
        reset_plan(elsewhere)
    with pytest.raises(ResetRefused, match="CIVICDP_SECRET_FILE"):
        reset_plan(Settings(data_dir=env.data_dir, secret_file=env.data_dir.parent / "other.secret"))
    with socket.socket() as server:  # something answers on the demo's port
        server.bind(("127.0.0.1", env.port))
        server.listen()
        result = runner.invoke(cli, ["demo", "--reset", "--yes", "--no-serve", "--data", str(folder)])
    assert result.exit_code == 2 and "stop the demo server" in result.output
    assert _names(env) == before


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_resets_and_make_clean_removes_the_demo_state(env: Settings, folder: Path,
                                                                 tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):  # what `make demo` depends on
        shutil.copy2(REPO / name, checkout / name)
    (checkout / ".venv").symlink_to(REPO / ".venv")  # `rm -rf .venv` removes the link only
    dry = subprocess.run(["make", "-n", "demo"], cwd=checkout, capture_output=True, text=True, check=True)
    assert "civicdp demo --reset --yes" in dry.stdout
    _demo(env, folder)
    clean = subprocess.run(["make", "clean"], cwd=checkout, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert _names(env) == set() and not (checkout / ".venv").exists()
    assert (REPO / ".venv" / "bin" / "python").exists()
