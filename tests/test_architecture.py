"""The dependency direction of DESIGN.md, no import circle, small modules, and noise drawn
only in privacy/mechanisms.py.

    server -> (queries, policies, audit, privacy);  queries -> privacy;
    privacy, policies and audit import nothing of the project; nothing imports server;
    only server imports FastAPI; inside server, the rooms in the order
    entry > (cli | http) > (feeds | monitors) > services > auditlog > state.

Every import goes through the ``civicdp`` package (the repository's folders install as
its sub-packages). Checked twice: by import-linter with the contracts in pyproject.toml,
and by a plain AST scan that needs no configuration (and also sees imports inside functions).
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The folders installed as civicdp's sub-packages.
INSTALLED = ("privacy", "policies", "audit", "queries", "server", "synthetic")
PROJECT = (*INSTALLED, "bench")
#: What each package may import of the project (besides itself).
ALLOWED = {
    "privacy": set(),
    "policies": set(),
    "audit": set(),
    "queries": {"privacy"},
    "server": {"queries", "policies", "audit", "privacy", "synthetic"},
    "synthetic": set(),
    # The benchmark drives the engine and may generate demo data with synthetic.demo_data
    # (pyproject's "nothing imports server" contract leaves bench out on purpose).
    "bench": {"queries", "privacy", "server", "synthetic", "audit", "policies"},
}
WEB_FRAMEWORKS = {"fastapi", "starlette"}
#: Modules allowed to build OpenDP measurements: the mechanisms, and the zCDP -> (epsilon, delta)
#: conversion, which draws no noise (apart so that privacy/loss.py needs no mechanism).
NOISE_MODULE = ROOT / "privacy" / "mechanisms.py"
OPENDP_MODULES = {NOISE_MODULE, ROOT / "privacy" / "conversion.py"}
#: Longest module (lines) in the installed packages; exceptions name their reason.
MAX_LINES = 400
LONG_MODULES: dict[str, str] = {}
SAMPLER_ATTRIBUTES = {
    "laplace", "normal", "gumbel", "exponential", "geometric", "poisson", "binomial", "uniform",
    "standard_normal", "default_rng", "RandomState", "Generator", "random", "rand", "randn", "randint",
    "choice", "shuffle", "permutation", "sample",
}
SAMPLER_TEXT = (".laplace(", ".normal(", ".gumbel(", "random.")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def _imports(path: Path, text: str | None = None) -> set[str]:
    """The project packages (and other top-level names) ``path`` imports, anywhere in the file.

    ``civicdp.queries.engine`` counts as ``queries``; a relative import as the file's own
    package; an import of a project folder by its bare name (``import server``) as
    ``bare:server`` — it would bypass the civicdp package.
    """
    package = path.relative_to(ROOT).parts[0]
    names: set[str] = set()

    def add(dotted: str) -> None:
        parts = dotted.split(".")
        if parts[0] == "civicdp" and len(parts) > 1:
            names.add(parts[1])
        elif parts[0] in INSTALLED:
            names.add(f"bare:{parts[0]}")
        else:
            names.add(parts[0])

    for node in ast.walk(ast.parse(path.read_text() if text is None else text, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add(package)
            else:
                add(node.module or "")
    return names


def _code_only(path: Path) -> str:
    """The source without comments and string literals (docstrings may talk about randomness)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    kept = [tok.string for tok in tokens if tok.type not in (tokenize.COMMENT, tokenize.STRING)]
    return "".join(kept)


@pytest.fixture(scope="module")
def link_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where ``civicdp`` holds its sub-packages, as in the wheel.

    import-linter (grimp) walks a package's folder; in the repository civicdp's
    sub-packages live in other folders (pyproject's package-dir mapping), so the graph is
    built over links that put them together.
    """
    tree = tmp_path_factory.mktemp("tree")
    (tree / "civicdp").mkdir()
    shutil.copy(ROOT / "civicdp" / "__init__.py", tree / "civicdp" / "__init__.py")
    for package in INSTALLED:
        (tree / "civicdp" / package).symlink_to(ROOT / package, target_is_directory=True)
    return tree


def _in_tree(tree: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(list(command), cwd=tree, env=env, capture_output=True, text=True, timeout=300)


# -- import-linter -------------------------------------------------------------------------


def test_import_linter_contracts_are_kept(link_tree: Path) -> None:
    """``lint-imports`` with pyproject.toml's contracts reports every contract kept."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    completed = _in_tree(link_tree, str(lint_imports), "--no-cache", "--config", str(ROOT / "pyproject.toml"))
    report = completed.stdout + completed.stderr
    assert completed.returncode == 0, report
    assert "0 broken" in report, report
    assert "Analyzed 1" in report or "Analyzed " in report, report


def test_import_linter_config_declares_the_design_contracts() -> None:
    """The contracts cannot silently disappear from pyproject.toml."""
    from importlinter.api import read_configuration

    config = read_configuration(str(ROOT / "pyproject.toml"))
    kinds = sorted(c["type"] for c in config["contracts_options"])
    assert kinds == ["forbidden", "forbidden", "independence", "layers", "layers"]
    assert config["session_options"]["root_packages"] == ["civicdp"]
    rooms = next(c for c in config["contracts_options"] if c.get("containers") == ["civicdp.server"])
    assert rooms["layers"] == ["entry", "cli | http", "feeds | monitors | intake", "services", "auditlog", "state"]


#: Strongly connected components of a package's import graph (Tarjan), run by grimp in a
#: subprocess on the link tree; imports under ``if TYPE_CHECKING`` are not run and not counted.
CYCLES = textwrap.dedent("""
    import json, sys
    import grimp
    sys.setrecursionlimit(10_000)
    root = sys.argv[1]
    graph = grimp.build_graph(root, exclude_type_checking_imports=True)
    edges = {m: [x for x in graph.find_modules_directly_imported_by(m) if x != m] for m in graph.modules}
    index, low, stack, on, found = {}, {}, [], set(), []
    def visit(v):
        index[v] = low[v] = len(index); stack.append(v); on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop(); on.discard(w); component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    print(json.dumps(found))
""")


def _cycles(tree: Path, root: str) -> list[list[str]]:
    completed = _in_tree(tree, sys.executable, "-c", CYCLES, root)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)  # type: ignore[no-any-return]


def test_no_import_circle(link_tree: Path) -> None:
    """No two modules of civicdp import each other, directly or through others (also inside functions)."""
    assert _cycles(link_tree, "civicdp") == []


def test_the_circle_check_sees_a_circle(tmp_path: Path) -> None:
    """Guard against a vacuous check: a planted a -> b -> a circle (one import inside a function) is found."""
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circle import b\n")
    (package / "b.py").write_text("def later():\n    from circle import a\n")
    (package / "c.py").write_text("from circle import a\n")
    assert _cycles(tmp_path, "circle") == [["circle.a", "circle.b"]]


def test_modules_stay_small() -> None:
    """Every module of the installed packages is at most MAX_LINES lines (exceptions say why)."""
    long = {str(p.relative_to(ROOT)): n for package in (*INSTALLED, "civicdp") for p in _modules(package)
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in LONG_MODULES}
    assert long == {}


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


@pytest.mark.parametrize("package", [*PROJECT, "tests"], ids=[*PROJECT, "tests"])
def test_every_import_goes_through_civicdp(package: str) -> None:
    """``import server`` (a bare folder name) would load a second copy that the wheel does not have."""
    offending = {str(p.relative_to(ROOT)): sorted(n for n in found if n.startswith("bare:"))
                 for p in sorted((ROOT / package).rglob("*.py")) if (found := _imports(p))
                 and any(n.startswith("bare:") for n in found)}
    assert offending == {}


def test_scan_sees_the_packages() -> None:
    """Guard against a vacuous scan: the core packages have modules and real imports."""
    assert _modules("privacy") and _modules("queries")
    assert "privacy" in set().union(*(_imports(p) for p in _modules("queries")))
    assert "opendp" in _imports(NOISE_MODULE)
    probe = ROOT / "queries" / "probe.py"
    assert _imports(probe, "import server.http\nfrom civicdp.privacy import loss\n") == {"bare:server", "privacy"}


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
                 if p not in OPENDP_MODULES and "opendp" in _imports(p)]
    assert offending == []
