"""The built wheel installs one package, ``civicdp``, whose public API imports on its own.

The repository's folders (server/, queries/, privacy/, policies/, audit/, synthetic/) are
installed as civicdp's sub-packages; bench/ and tests/ are developer tools, not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = ("audit", "policies", "privacy", "queries", "server", "synthetic")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # A copy of the sources, so the build leaves nothing (build/, *.egg-info) in the repository.
    subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (build / name).parent.mkdir(parents=True, exist_ok=True)
            (build / name).write_bytes(source.read_bytes())
    completed = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                                "--quiet", "-w", str(out), str(build)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    (built,) = out.glob("civicdp-*.whl")
    return built


def test_the_wheel_holds_only_civicdp(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"civicdp"}
    assert not any(name.startswith(("civicdp/bench/", "civicdp/tests/", "bench/", "tests/")) for name in names)


def test_the_wheel_holds_every_module_and_the_policy_model(wheel: Path) -> None:
    """pyproject's package list is complete: every module of the installed folders is in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"civicdp/{p.relative_to(ROOT).as_posix()}" for package in INSTALLED
                for p in (ROOT / package).rglob("*.py")}
    assert expected - names == set()
    assert "civicdp/__init__.py" in names and "civicdp/policies/model.conf" in names


def test_the_console_script_is_civicdp(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        entry = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        text = archive.read(entry).decode()
    assert "civicdp = civicdp.server.entry:app" in text


def test_installed_wheel_imports_without_the_repository(wheel: Path, tmp_path: Path) -> None:
    """Installed alone (dependencies from this environment), ``from civicdp import Client`` works
    and only civicdp lands in site-packages."""
    target = tmp_path / "site"
    completed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                                str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert installed == {"civicdp"}
    dependencies = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "httpx").is_dir())
    # The base interpreter, not this venv: its editable install of the repository must not be found.
    python = getattr(sys, "_base_executable", sys.executable)
    probe = ("import civicdp, civicdp.server.entry, civicdp.queries.engine; from civicdp import Client, "
             "LocalDataset, QueryError, BudgetExhausted; print(civicdp.__file__); "
             "print(civicdp.server.entry.__file__)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = f"{target}{os.pathsep}{dependencies}"
    completed = subprocess.run([python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    first, second = completed.stdout.split()
    assert first.startswith(str(target)) and second.startswith(str(target))
