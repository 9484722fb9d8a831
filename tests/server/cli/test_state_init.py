"""Explicit state (issue 15): ``civicdp init`` creates it once, everything else refuses to run without it.

A state is the database, the key-hashing secret and the signing key; the database records
SHA-256 fingerprints of the secret and of the signing key's public key. Every state
command and ``serve`` refuse a missing state (naming ``CIVICDP_DATA_DIR``,
``DATABASE_URL`` and ``civicdp init``) and create nothing -- the command line used to make
a fresh ``./data`` wherever it ran. A process whose files do not match the database
refuses to start: a second server on the same PostgreSQL database used to make its own
secret and signing key, so every existing key got 401 there and the log gained a second
key. A key replaced by ``civicdp audit rotate-key`` is followed (the rotation is in the
log); a database made before states had an identity is adopted by ``civicdp init``;
``civicdp demo`` does its own init.
"""

from __future__ import annotations

import io
import shutil
import stat
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import create_engine, func, inspect, select, text
from sqlmodel import Session
from typer.testing import CliRunner

from civicdp.audit.signing import SigningKey
from civicdp.server.state import auth
from civicdp.server.services.bootstrap import build_state, check_state
from civicdp.server.entry import app as cli
from civicdp.server.cli.demo import prepare_demo
from civicdp.server.state.identity import StateIdentity, StateMismatch, StateMissing, key_fingerprint
from civicdp.server.http.app import create_app
from civicdp.server.state.models import AuditKey
from civicdp.server.state.settings import Settings
from tests.server.api_fixtures import (
    ANALYST, TestClient, count_query, make_dataset_folder, prepare_state, running_api, settings_for,
)

runner = CliRunner()

STATE_COMMANDS = [
    ["accounts", "list"], ["accounts", "create", "alice", "--agency", "health"], ["keys", "list"],
    ["keys", "create", "alice"], ["roles", "grant", "alice", "analyst", "health"],
    ["roles", "revoke", "alice", "analyst", "health"], ["datasets", "list"], ["budgets", "list"],
    ["budgets", "caps"], ["budgets", "set", "civic-demo", "analyst", "0.5"], ["feeds", "list"],
    ["monitors", "list"], ["audit", "rotate-key"], ["serve"],
]


def _env(monkeypatch: pytest.MonkeyPatch, data_dir: Path | None, database_url: str | None = None) -> None:
    for name in ("CIVICDP_DATA_DIR", "DATABASE_URL", "CIVICDP_DATABASE_URL", "CIVICDP_INIT_STATE",
                 "CIVICDP_SECRET_FILE", "CIVICDP_AUDIT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    if data_dir is not None:
        monkeypatch.setenv("CIVICDP_DATA_DIR", str(data_dir))
    if database_url is not None:
        monkeypatch.setenv("DATABASE_URL", database_url)


def _refused(result: object, *words: str) -> None:
    output = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 2, output  # type: ignore[attr-defined]
    assert "Traceback" not in output
    flat = " ".join(output.split())
    for word in ("CIVICDP_DATA_DIR", "DATABASE_URL", "civicdp init", *words):
        assert word in flat, output


@pytest.mark.parametrize("command", STATE_COMMANDS, ids=[" ".join(c[:2]) for c in STATE_COMMANDS])
def test_state_commands_refuse_a_missing_state_and_create_nothing(
        command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _env(monkeypatch, None)  # the default: ./data of wherever the command runs
    _refused(runner.invoke(cli, command), "no civicdp state")
    assert list(tmp_path.iterdir()) == []  # no ./data made on the side


@pytest.mark.postgres
def test_state_commands_refuse_a_database_without_a_state(pg_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, tmp_path / "data", pg_url)
    for command in (["accounts", "list"], ["serve"], ["roles", "grant", "alice", "analyst", "health"]):
        _refused(runner.invoke(cli, command), "the database has no civicdp state yet")
    engine = create_engine(pg_url)
    try:
        assert inspect(engine).get_table_names() == []  # nothing was created in the database either
    finally:
        engine.dispose()
    assert not (tmp_path / "data").exists()


def test_a_server_refuses_to_start_on_a_missing_state(tmp_path: Path) -> None:
    with pytest.raises(StateMissing, match="civicdp init"):
        with TestClient(create_app(Settings(data_dir=tmp_path / "nothing", database_url=None))):
            pass
    assert not (tmp_path / "nothing").exists()


def test_init_creates_the_state_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, None)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "state"
    created = runner.invoke(cli, ["init", "--data-dir", str(target)])
    assert created.exit_code == 0, created.output
    assert "created the civicdp state" in created.output and f"CIVICDP_DATA_DIR={target}" in created.output
    secret, key = target / "server.secret", target / "audit-signing.key"
    for path in (secret, key, target / "civicdp.db", target / "policies.db"):
        assert path.is_file(), path
    for path in (secret, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = (secret.read_bytes(), key.read_bytes())
    settings = Settings(data_dir=target, database_url=None)
    identity = check_state(settings)
    assert identity.secret_sha256 == auth.secret_fingerprint(secret.read_bytes())
    assert identity.signing_key_sha256 == key_fingerprint(SigningKey.load(key).verifier)
    assert identity.signing_key == SigningKey.load(key).verifier.encode()

    again = runner.invoke(cli, ["init", "--data-dir", str(target)])
    assert again.exit_code == 0 and "exists already" in again.output and "nothing was changed" in again.output
    assert (secret.read_bytes(), key.read_bytes()) == before
    _env(monkeypatch, target)
    assert runner.invoke(cli, ["accounts", "create", "alice", "--agency", "health"]).exit_code == 0
    listed = runner.invoke(cli, ["accounts", "list"])
    assert listed.exit_code == 0 and "alice" in listed.output
    state = build_state(settings)
    try:
        assert len(state.policies.rules()) > 0  # the default rules came with the state
    finally:
        state.close()


@pytest.mark.postgres
def test_init_on_postgresql_keeps_its_files_in_the_data_dir(pg_url: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, tmp_path / "files", pg_url)
    created = runner.invoke(cli, ["init"])
    assert created.exit_code == 0, created.output
    assert "(DATABASE_URL)" in " ".join(created.output.split())
    assert {p.name for p in (tmp_path / "files").iterdir()} >= {"server.secret", "audit-signing.key"}
    assert not (tmp_path / "files" / "civicdp.db").exists()
    assert runner.invoke(cli, ["accounts", "list"]).exit_code == 0


def _copy(settings: Settings, to: Path) -> Settings:
    shutil.copytree(settings.data_dir, to)
    return settings.model_copy(update={"data_dir": to, "init_state": False})


def test_a_server_with_a_foreign_secret_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path / "state", feeds_scheduler=False)
    prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    other = _copy(settings, tmp_path / "copy")
    other.secret_path.unlink()
    auth.load_or_create_server_secret(other.secret_path)  # a secret of its own, as the second server made
    with pytest.raises(StateMismatch, match="key-hashing secret .* is not the one the state .* was initialised"):
        with TestClient(create_app(other)):
            pass
    with pytest.raises(StateMismatch, match="every API key would be refused"):
        build_state(other.model_copy(update={"init_state": True}))  # init never replaces a recorded secret
    _env(monkeypatch, other.data_dir)
    result = runner.invoke(cli, ["serve"])
    assert result.exit_code == 2 and "is not the one the state" in result.output
    other.secret_path.unlink()
    missing = runner.invoke(cli, ["accounts", "list"])
    assert missing.exit_code == 2 and "there is no secret file" in " ".join(missing.output.split())
    assert not other.secret_path.exists()  # refused, not made


def test_a_server_with_a_foreign_signing_key_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path / "state", feeds_scheduler=False)
    prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    other = _copy(settings, tmp_path / "copy")
    SigningKey.generate(settings.audit_origin).save(other.audit_key_path)
    with pytest.raises(StateMismatch, match="records no rotation to it"):
        with TestClient(create_app(other)):
            pass
    other.audit_key_path.unlink()
    with pytest.raises(StateMismatch, match="no signing key file"):
        build_state(other.model_copy(update={"init_state": True}))
    assert not other.audit_key_path.exists()
    engine = create_engine(settings.state_url)
    try:
        with Session(engine) as session:  # no second key reached the log
            assert session.execute(select(func.count()).select_from(AuditKey)).scalar_one() == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_second_server_on_the_same_database_needs_the_first_ones_files(pg_url: str, tmp_path: Path) -> None:
    first = settings_for(tmp_path / "first", pg_url, feeds_scheduler=False)
    keys = prepare_state(first, make_dataset_folder(tmp_path / "datasets"))
    second = settings_for(tmp_path / "second", pg_url, feeds_scheduler=False)  # init_state: as lenient as it gets
    with pytest.raises(StateMismatch, match="no secret file"):
        build_state(second)
    (tmp_path / "second").mkdir(exist_ok=True)
    shutil.copy2(first.secret_path, second.secret_path)
    with pytest.raises(StateMismatch, match="no signing key file"):
        build_state(second)
    assert not second.audit_key_path.exists()
    shutil.copy2(first.audit_key_path, second.audit_key_path)
    with running_api(second.data_dir, None, database_url=pg_url, keys=keys, feeds_scheduler=False) as api:
        assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 200  # the first server's keys work
        with Session(api.state.db) as session:
            assert session.execute(select(func.count()).select_from(AuditKey)).scalar_one() == 1


def test_a_rotated_signing_key_is_accepted_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path / "state", feeds_scheduler=False)
    prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    old = check_state(settings)
    _env(monkeypatch, settings.data_dir)
    rotated = runner.invoke(cli, ["audit", "rotate-key"])
    assert rotated.exit_code == 0, rotated.output
    new_key = SigningKey.load(settings.audit_key_path).verifier
    assert new_key.encode() != old.signing_key
    identity = check_state(settings.model_copy(update={"init_state": False}))
    assert identity.signing_key == new_key.encode() and identity.signing_key_sha256 == key_fingerprint(new_key)
    # The old key back in place is not the state's key any more.
    shutil.copy2(settings.audit_key_path.with_name(settings.audit_key_path.name + ".previous"),
                 settings.audit_key_path)
    with pytest.raises(StateMismatch, match="records no rotation to it"):
        check_state(settings)


def test_a_state_made_before_states_had_an_identity_is_adopted_by_init(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path / "state", feeds_scheduler=False)
    keys = prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    engine = create_engine(settings.state_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"DELETE FROM {StateIdentity.__tablename__}"))
    finally:
        engine.dispose()
    _env(monkeypatch, settings.data_dir)
    _refused(runner.invoke(cli, ["accounts", "list"]), "the database has no civicdp state yet")
    moved = tmp_path / "moved.key"
    settings.audit_key_path.rename(moved)
    refused = runner.invoke(cli, ["init"])  # its log was signed: a new key would be a second one
    assert refused.exit_code == 2 and "no signing key" in refused.output
    assert not settings.audit_key_path.exists()
    moved.rename(settings.audit_key_path)
    adopted = runner.invoke(cli, ["init"])
    assert adopted.exit_code == 0 and "recorded the secret and signing key of the existing state" in adopted.output
    with running_api(settings.data_dir, None, keys=keys, feeds_scheduler=False, init_state=False) as api:
        assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 200


def test_the_demo_makes_its_own_state(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "state", database_url=None)
    folder = make_dataset_folder(tmp_path / "datasets")
    quiet = Console(file=io.StringIO())
    keys = prepare_demo(settings, folder, 1000, quiet)
    assert set(keys) >= {"steward", ANALYST}
    again = prepare_demo(settings, folder, 1000, quiet)
    assert again[ANALYST] != keys[ANALYST]  # fresh keys, same state
    assert check_state(settings).secret_sha256 == auth.secret_fingerprint(settings.secret_path.read_bytes())
