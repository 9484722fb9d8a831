"""The README, read as a walkthrough (issue 13): what it asks of the demo fits the demo's budgets,
and its code works when pasted.

:func:`walkthrough` reads every question the README puts to the demo server, in order:
``curl -X POST .../v1/queries`` with an inline spec or ``-d @file``, the Python client's
``run``, ``bundles``, ``performance_report``, ``lagged_points`` and ``department_scores``,
feed definitions (``POST /v1/feeds`` of a heredoc written just before) and
``civicdp monitors define``. Each is charged to the account whose key it names (``KEY=cdp_...
# ana-health's key``, ``Client(..., "cdp_...")  # ana-transport's key``). Each question is
planned by the engine against the demo dataset's metadata, as the server plans it: its
charge, and its canonical form (an identical question is answered from its stored
release, free). The sums per budget scope must fit the demo's caps (the settings'
defaults), counting a feed's whole announcement against the lifetime cap and its busiest
month against the monthly one; each analyst question must fit the per-query policy cap.

The local examples (``LocalDataset``, ``civicdp estimate|query data/demo ...``) are run
against a small dataset made by ``civicdp demo-data``, from a folder laid out as the
README assumes.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from civicdp.policies.defaults import DATASET_CAP, PUBLIC_CAP
from civicdp.privacy.loss import MICRO
from civicdp.queries.context import EngineLimits
from civicdp.queries.engine import Engine
from civicdp.queries.metadata import DatasetMetadata, load_metadata
from civicdp.queries.monitoring import parse_monitor, resolve_monitor
from civicdp.queries.request import parse_request
from civicdp.server.cli.demo import DEMO_ACCOUNTS
from civicdp.server.feeds.schedule import parse_schedule
from civicdp.server.state.ledger import CapDefaults
from civicdp.server.state.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
AGENCY = {name: agency for name, agency, _, _ in DEMO_ACCOUNTS}
CLIENT_CALLS = {"run": None, "bundles": "bundles", "performance_report": "performance_report",
                "lagged_points": "lagged_points", "department_scores": "department_scores"}
KEY_COMMENT = re.compile(r"#\s*(?:the\s+)?([\w-]+?)(?:'s)? key\b")


# -- reading the README ----------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks, in order: (language, code)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)]


def shell_commands(code: str) -> tuple[list[str], dict[str, str]]:
    """A shell block's commands (continuation lines joined) and the files its heredocs write."""
    commands: list[str] = []
    files: dict[str, str] = {}
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heredoc = re.match(r"cat > (\S+) <<'?(\w+)'?\s*$", line)
        if heredoc:
            end = lines.index(heredoc.group(2), i + 1)
            files[heredoc.group(1)] = "\n".join(lines[i + 1:end])
            i = end + 1
            continue
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        commands.append(line)
        i += 1
    return commands, files


@dataclass
class Question:
    account: str
    spec: dict[str, Any]
    where: str


@dataclass
class Walkthrough:
    """What the README asks of the demo server, in order."""

    questions: list[Question] = field(default_factory=list)
    feeds: list[tuple[dict[str, Any], int]] = field(default_factory=list)  # definition, releases triggered
    monitors: list[dict[str, Any]] = field(default_factory=list)
    local: list[list[str]] = field(default_factory=list)  # `civicdp estimate|query data/demo FILE` commands


def _curl(tokens: list[str]) -> tuple[str, str, str | None, str | None]:
    """(method, path, the key variable, the body) of a curl command."""
    method, path, key, body = "GET", "", None, None
    for i, token in enumerate(tokens):
        if token == "-X":
            method = tokens[i + 1]
        elif token in ("-d", "--data"):
            body = tokens[i + 1]
        elif token == "-H" and tokens[i + 1].startswith("Authorization: Bearer $"):
            key = tokens[i + 1].split("$", 1)[1]
        elif "://" in token and "/v1/" in token:
            path = "/v1/" + token.split("/v1/", 1)[1].split("?", 1)[0]
    if body is not None and method == "GET":
        method = "POST"
    return method, path, key, body


def _shell(code: str, where: str, walk: Walkthrough, keys: dict[str, str], files: dict[str, str]) -> None:
    commands, written = shell_commands(code)
    files.update(written)
    for command in commands:
        named = re.match(r"^\s*(?:export\s+)?(\w+)=cdp_\S*\s*(#.*)?$", command)
        if named:
            found = KEY_COMMENT.search(named.group(2) or "")
            assert found, f"{where}: say whose key {named.group(1)} is (# <account>'s key): {command}"
            keys[named.group(1)] = found.group(1)
            continue
        tokens = shlex.split(command, comments=True)
        if not tokens:
            continue
        program = Path(tokens[0]).name
        if program == "curl":
            method, path, key, body = _curl(tokens)
            if method != "POST":
                continue
            if body is not None and body.startswith("@"):
                name = body[1:]
                body = files[name] if name in files else (ROOT / name).read_text()
            if path == "/v1/queries":
                assert key in keys, f"{where}: whose key is ${key}? {command}"
                walk.questions.append(Question(keys[key], json.loads(body), where))
            elif path == "/v1/feeds":
                walk.feeds.append((json.loads(body), 0))
            elif re.fullmatch(r"/v1/feeds/[^/]+/releases", path):
                name = path.split("/")[3]
                index = next(i for i, (f, _) in enumerate(walk.feeds) if f["name"] == name)
                walk.feeds[index] = (walk.feeds[index][0], walk.feeds[index][1] + 1)
        elif program == "civicdp":
            if tokens[1:3] == ["monitors", "define"]:
                walk.monitors.append(json.loads((ROOT / tokens[3]).read_text()))
            elif tokens[1] in ("estimate", "query") and tokens[2] == "data/demo":
                walk.local.append(tokens[1:])


def _python(code: str, where: str, walk: Walkthrough) -> None:
    tree = ast.parse(code)
    lines = code.splitlines()
    clients: dict[str, str] = {}
    values: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "Client":
                found = KEY_COMMENT.search(lines[node.lineno - 1])
                assert found, f"{where}: say whose key the client has (# <account>'s key)"
                clients[target] = found.group(1)
            elif isinstance(value, ast.Dict):
                values[target] = ast.literal_eval(value)
    calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr in CLIENT_CALLS and isinstance(n.func.value, ast.Name)),
                   key=lambda n: (n.lineno, n.col_offset))
    for call in calls:
        owner = call.func.value.id  # type: ignore[attr-defined]
        if owner not in clients:
            continue  # a LocalDataset's run: local, no budget
        (argument,) = call.args
        spec = values[argument.id] if isinstance(argument, ast.Name) else ast.literal_eval(argument)
        analysis = CLIENT_CALLS[call.func.attr]  # type: ignore[attr-defined]
        walk.questions.append(Question(clients[owner], {"analysis": analysis, **spec} if analysis else spec,
                                       where))


def walkthrough(text: str) -> Walkthrough:
    walk = Walkthrough()
    keys: dict[str, str] = {}
    files: dict[str, str] = {}
    heading = ""
    position = 0
    for language, code in code_blocks(text):
        start = text.index(code, position)
        position = start + len(code)
        headings = re.findall(r"^#+ (.+)$", text[:start], re.MULTILINE)
        heading = headings[-1] if headings else heading
        if language == "sh":
            _shell(code, heading, walk, keys, files)
        elif language == "python":
            _python(code, heading, walk)
    return walk


# -- what it costs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset, as `civicdp demo-data` writes it, in a folder laid out as the README assumes."""
    from typer.testing import CliRunner

    from civicdp.server.entry import app

    root = tmp_path_factory.mktemp("readme")
    result = CliRunner().invoke(app, ["demo-data", "--people", "2000", "--out", str(root / "data" / "demo")])
    assert result.exit_code == 0, result.output
    (root / "examples").symlink_to(ROOT / "examples")
    return root


def _defaults() -> Settings:
    return Settings.model_construct()  # the demo's settings without the environment: every default


def _charge(engine: Engine, metadata: DatasetMetadata, folder: Path, spec: dict[str, Any]) -> tuple[str, int, float]:
    """(canonical question, charge in micro-epsilon, epsilon) as the server plans it."""
    request = parse_request(spec)
    plan = engine.plan(request, metadata, folder)
    return request.canonical(), metadata.accounting.rule.charge_of(plan.loss), plan.loss.as_dict()["epsilon"]


def test_the_readme_walkthrough_fits_the_demo_budgets(demo_folder: Path) -> None:
    settings = _defaults()
    caps = CapDefaults.from_settings(settings)
    folder = demo_folder / "data" / "demo"
    metadata = load_metadata(folder)
    engine = Engine(limits=EngineLimits(max_epsilon=settings.max_epsilon, auto_fraction=settings.auto_fraction))
    walk = walkthrough(README.read_text())
    # What the README asks (so a change to how it is written cannot make this test vacuous).
    assert {q.account for q in walk.questions} == {"ana-health", "ana-transport"}
    assert len(walk.questions) >= 5 and len(walk.feeds) == 1 and len(walk.monitors) == 1

    analyst: dict[str, int] = defaultdict(int)
    agency: dict[str, int] = defaultdict(int)
    spent = 0  # by analysts' questions, on the dataset's month and lifetime
    answered: set[str] = set()
    lines = []
    for question in walk.questions:
        canonical, amount, epsilon = _charge(engine, metadata, folder, question.spec)
        assert epsilon <= float(DATASET_CAP) and epsilon <= float(PUBLIC_CAP), (
            f"{question.where}: epsilon {epsilon} is above the per-query cap on the demo's public columns")
        if canonical in answered:
            amount = 0  # the stored release of the identical question, free
        answered.add(canonical)
        analyst[question.account] += amount
        agency[AGENCY[question.account]] += amount
        spent += amount
        lines.append(f"{question.where}: {question.account} {amount / MICRO:g}")

    now = datetime.now(timezone.utc)
    feeds_total = feeds_month = 0
    for definition, triggered in walk.feeds:
        loss = sum(_charge(engine, metadata, folder, {**spec, "dataset": definition["dataset"]})[1]
                   for spec in definition["specs"])
        schedule = parse_schedule(definition["schedule"], now, definition["releases"])
        assert triggered <= definition["releases"]
        feeds_total += loss * definition["releases"]  # its whole announcement, which its allocation holds
        feeds_month += loss * schedule.most_in_one_month()
        lines.append(f"feed {definition['name']}: {loss / MICRO:g} x {definition['releases']}")
    monitors = 0
    for raw in walk.monitors:
        monitor = resolve_monitor(parse_monitor(raw), metadata)
        monitors += metadata.accounting.rule.charge_of(monitor.loss)
        lines.append(f"monitor {raw['name']}: {monitor.loss.as_dict()['epsilon']:g}")

    report = "\n".join(lines)
    for account, amount in analyst.items():
        assert amount <= caps.analyst_month_micro, f"{account} spends {amount / MICRO:g}:\n{report}"
    for name, amount in agency.items():
        assert amount <= caps.agency_month_micro, f"agency {name} spends {amount / MICRO:g}:\n{report}"
    month = spent + feeds_month + monitors
    lifetime = spent + feeds_total + monitors
    assert month <= caps.dataset_month_micro, f"the dataset's month: {month / MICRO:g}:\n{report}"
    assert lifetime <= caps.lifetime_micro, f"the dataset's lifetime: {lifetime / MICRO:g}:\n{report}"
    # The figures the README states ("0.4 of ana-health's 1", "0.9 of ana-transport's 1").
    assert dict(analyst) == {"ana-health": 400_000, "ana-transport": 900_000}, report


def test_the_walkthrough_reader_sees_every_kind_of_question() -> None:
    """The reader finds the server's questions wherever the README puts them (a check of the reader)."""
    text = """
```sh
KEY=cdp_...   # ana-health's key
curl -s -X POST http://h/v1/queries/estimate -H "Authorization: Bearer $KEY" -d '{"epsilon": 9}'
curl -s -X POST http://h/v1/queries -H "Authorization: Bearer $KEY" \\
     -H 'Content-Type: application/json' -d '{"epsilon": 0.1}'
cat > f.json <<'JSON'
{"name": "f", "specs": []}
JSON
curl -s -X POST http://h/v1/feeds -H "Authorization: Bearer $S" -d @f.json
curl -s -X POST http://h/v1/feeds/f/releases -H "Authorization: Bearer $S"
civicdp query data/demo examples/bundles.json   # local
```

```python
from civicdp import Client, LocalDataset
c = Client("u", "cdp_...")  # ana-transport's key
spec = {"epsilon": 0.2}
c.estimate(spec)
c.run(spec)
c.bundles({"epsilon": 0.3})
LocalDataset("data/demo").run({"epsilon": 5})
```
"""
    walk = walkthrough(text)
    assert [(q.account, q.spec) for q in walk.questions] == [
        ("ana-health", {"epsilon": 0.1}), ("ana-transport", {"epsilon": 0.2}),
        ("ana-transport", {"analysis": "bundles", "epsilon": 0.3})]
    assert walk.feeds == [({"name": "f", "specs": []}, 1)]
    assert walk.local == [["query", "data/demo", "examples/bundles.json"]]


# -- the local examples, pasted -------------------------------------------------------------------


def test_the_local_python_examples_run(demo_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python block that needs no server runs as written, from a folder with data/demo."""
    monkeypatch.chdir(demo_folder)
    local = [code for language, code in code_blocks(README.read_text())
             if language == "python" and "Client(" not in code]
    assert local and any("LocalDataset" in code for code in local)
    for code in local:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - the README's own code


def test_the_readme_imports_the_public_api() -> None:
    """Analysts import from `civicdp`, the one public path, and every name they import exists there."""
    import civicdp

    imports = 0
    for language, code in code_blocks(README.read_text()):
        for node in ast.walk(ast.parse(code)) if language == "python" else ():
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("civicdp"):
                imports += 1
                assert node.module == "civicdp", f"import from the public path, not {node.module}"
                for alias in node.names:
                    assert hasattr(civicdp, alias.name), alias.name
    assert imports >= 4


@pytest.mark.slow
def test_the_local_command_line_examples_run(demo_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `civicdp estimate|query data/demo ...` line of the README works when pasted."""
    from typer.testing import CliRunner

    from civicdp.server.entry import app

    monkeypatch.chdir(demo_folder)
    commands = walkthrough(README.read_text()).local
    assert len(commands) >= 8
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(app, command)
        assert result.exit_code == 0, f"civicdp {' '.join(command)}:\n{result.output}"
