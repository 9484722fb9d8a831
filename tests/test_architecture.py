"""The dependency direction of DESIGN.md, and noise drawn only in privacy/mechanisms.py.

    server -> (queries, policies, audit, privacy);  queries -> privacy;
    privacy, policies and audit import nothing of the project; nothing imports server;
    only server imports FastAPI.

Checked twice: by import-linter with the contracts in pyproject.toml, and by a plain
AST scan that needs no configuration (and also sees imports inside functions).
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("privacy", "policies", "audit", "queries", "server", "bench")
#: What each package may import of the project (besides itself).
ALLOWED = {
    "privacy": set(),
    "policies": set(),
    "audit": set(),
    "queries": {"privacy"},
    "server": {"queries", "policies", "audit", "privacy", "synthetic"},
    "synthetic": set(),
    # The benchmark drives the engine and may generate demo data with civicdp.synthetic.demo_data
    # (pyproject's "nothing imports server" contract leaves bench out on purpose).
    "bench": {"queries", "privacy", "server", "synthetic", "audit", "policies"},
}
WEB_FRAMEWORKS = {"fastapi", "starlette"}
#: Modules allowed to draw random numbers, and why.
NOISE_MODULE = ROOT / "privacy" / "mechanisms.py"
SAMPLER_ATTRIBUTES = {
    "laplace", "normal", "gumbel", "exponential", "geometric", "poisson", "binomial", "uniform",
    "standard_normal", "default_rng", "RandomState", "Generator", "random", "rand", "randn", "randint",
    "choice", "shuffle", "permutation", "sample",
}
SAMPLER_TEXT = (".laplace(", ".normal(", ".gumbel(", "random.")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def _imports(path: Path) -> set[str]:
    """Top-level names of everything ``path`` imports, anywhere in the file (relative ones resolved)."""
    package = path.relative_to(ROOT).parts[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else (node.module or "").split(".")[0])
    return names


def _code_only(path: Path) -> str:
    """The source without comments and string literals (docstrings may talk about randomness)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    kept = [tok.string for tok in tokens if tok.type not in (tokenize.COMMENT, tokenize.STRING)]
    return "".join(kept)


# -- import-linter -------------------------------------------------------------------------


def test_import_linter_contracts_are_kept(tmp_path: Path) -> None:
    """``lint-imports`` with pyproject.toml's contracts reports every contract kept."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    completed = subprocess.run(
        [str(lint_imports), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    report = completed.stdout + completed.stderr
    assert completed.returncode == 0, report
    assert "0 broken" in report, report


def test_import_linter_config_declares_the_design_contracts() -> None:
    """The contracts cannot silently disappear from pyproject.toml."""
    from importlinter.api import read_configuration

    config = read_configuration(str(ROOT / "pyproject.toml"))
    kinds = sorted(c["type"] for c in config["contracts_options"])
    assert kinds == ["forbidden", "forbidden", "independence", "layers"]
    assert set(config["session_options"]["root_packages"]) >= {"server", "queries", "privacy", "policies", "audit"}


# -- plain AST scan ----------------------------------------------------------------------


@pytest.mark.parametrize("package", PROJECT, ids=PROJECT)
def test_packages_import_only_what_the_design_allows(package: str) -> None:
    """Each package imports, of the project, only itself and the packages below it."""
    offending = {
        str(path.relative_to(ROOT)): sorted(found)
        for path in _modules(package)
        if (found := (_imports(path) & set(PROJECT)) - ALLOWED[package] - {package})
    }
    assert offending == {}


@pytest.mark.parametrize("package", [p for p in PROJECT if p not in ("server", "bench")],
                         ids=[p for p in PROJECT if p not in ("server", "bench")])
def test_nothing_imports_server(package: str) -> None:
    """The engine, policies and audit work without the web server."""
    offending = [str(p.relative_to(ROOT)) for p in _modules(package) if "server" in _imports(p)]
    assert offending == []


@pytest.mark.parametrize("package", [p for p in PROJECT if p != "server"],
                         ids=[p for p in PROJECT if p != "server"])
def test_only_server_imports_fastapi(package: str) -> None:
    """FastAPI and Starlette stay in server/."""
    offending = [str(p.relative_to(ROOT)) for p in _modules(package) if _imports(p) & WEB_FRAMEWORKS]
    assert offending == []


def test_scan_sees_the_packages() -> None:
    """Guard against a vacuous scan: the core packages have modules and real imports."""
    assert _modules("privacy") and _modules("queries")
    assert "privacy" in _imports(ROOT / "queries" / "engine.py")
    assert "opendp" in _imports(NOISE_MODULE)


# -- noise only from OpenDP in privacy/mechanisms.py ---------------------------------------


def _noise_scanned() -> list[Path]:
    return [p for package in ("privacy", "queries") for p in _modules(package) if p != NOISE_MODULE]


@pytest.mark.parametrize("path", _noise_scanned(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_random_sampling_outside_the_mechanisms_module(path: Path) -> None:
    """No numpy/random/Polars sampler is called in privacy/ or queries/ except privacy/mechanisms.py.

    synthetic/demo_data.py is not scanned: synthetic data generation is not privacy noise.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = sorted({
        node.func.attr for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in SAMPLER_ATTRIBUTES
    })
    assert calls == []
    assert not _imports(path) & {"random", "secrets"}
    code = _code_only(path)
    assert [t for t in SAMPLER_TEXT if t in code] == []
    assert "numpy.random" not in code and "np.random" not in code


@pytest.mark.parametrize("package", ["privacy", "queries", "policies", "audit", "server"],
                         ids=["privacy", "queries", "policies", "audit", "server"])
def test_only_the_mechanisms_module_uses_opendp(package: str) -> None:
    """OpenDP measurements are built in one place, so every release goes through its accounting."""
    offending = [str(p.relative_to(ROOT)) for p in _modules(package)
                 if p != NOISE_MODULE and "opendp" in _imports(p)]
    assert offending == []
