"""JSON structure, checked on the raw bytes before any parse.

A JSON body may nest arrays and objects at most ``CIVICDP_MAX_JSON_DEPTH`` deep (default
32), hold at most ``CIVICDP_MAX_JSON_ITEMS`` members in any one array or object (default
10,000) and at most :data:`MAX_CONTAINERS` arrays and objects in all. This is checked on
the raw bytes with regular expressions (no parsing, no Python object per member); a body
over a limit is described by a :class:`JsonProblem` naming the field (``filters.0.values``),
the limit and the fix, which :mod:`civicdp.server.http.limits` answers with a 422.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

#: Arrays and objects in one JSON body, in all: bounds the objects a parse can make.
MAX_CONTAINERS = 10_000


@dataclass(frozen=True)
class JsonLimits:
    depth: int = 32
    items: int = 10_000
    containers: int = MAX_CONTAINERS


@dataclass(frozen=True)
class JsonProblem:
    field: str
    problem: str
    fix: str


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SKELETON_DELETE = bytes(b for b in range(256) if b not in b"[]{},")
_INNERMOST = re.compile(rb"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")
#: Tokens for naming the place: a run of values and commas counts as one (only its commas matter).
_TOKEN = re.compile(rb'(?:(?:"[^"\\]*(?:\\.[^"\\]*)*"|[^"\[\]{}:,])*,)+|"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:]', re.S)


@functools.lru_cache(maxsize=8)
def _too_long(items: int) -> re.Pattern[bytes]:
    """An innermost array or object (only commas left inside) with more than ``items`` members."""
    return re.compile(rb"[\[{],{%d,}[\]}]" % items)


def json_problem(body: bytes, limits: JsonLimits) -> JsonProblem | None:
    """Whether a JSON text exceeds ``limits``, judged from its bytes alone.

    Strings are blanked out, everything but brackets and commas is dropped, and the
    innermost arrays and objects are removed one level per pass: after ``depth`` passes
    nothing may be left, and no innermost container may hold more than ``items - 1``
    commas. Every step is a regular expression or a byte operation over at most
    ``max_request_bytes``. Text that is not JSON is left to the JSON parser to refuse.
    """
    stripped = _STRING.sub(b"0", body)
    if stripped.count(b"[") + stripped.count(b"{") > limits.containers:
        return JsonProblem("body", f"holds more than {limits.containers} arrays and objects",
                           "Send a smaller document")
    skeleton = stripped.translate(None, _SKELETON_DELETE)
    too_long = _too_long(limits.items)
    for _ in range(limits.depth):
        if too_long.search(skeleton):
            return _locate(body, limits)
        reduced = _INNERMOST.sub(b"", skeleton)
        if reduced == skeleton:
            return None  # nothing left (or not JSON: the parser will say so)
        skeleton = reduced
    if _INNERMOST.search(skeleton):
        return _locate(body, limits)
    return None


@dataclass
class _Frame:
    kind: str           # "array" or "object"
    name: str | None    # its key or index in the parent (None at the top)
    commas: int = 0
    key: str | None = None  # an object's current member name


def _path(frames: list[_Frame]) -> str:
    path = ".".join(frame.name for frame in frames if frame.name is not None) or "body"
    return path if len(path) <= 120 else path[:117] + "..."


def _locate(body: bytes, limits: JsonLimits) -> JsonProblem:
    """The first place where ``body`` exceeds a limit, as a dotted path (run only on a refusal)."""
    frames: list[_Frame] = []
    text: str | None = None  # the last string seen: an object's key once ':' follows
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token[:1] == b'"' and token[-1:] == b'"' and len(token) > 1:
            text = token[1:-1].decode("utf-8", "replace")[:60]
        elif token in (b"[", b"{"):
            name = None
            if frames:
                parent = frames[-1]
                name = parent.key if parent.kind == "object" else str(parent.commas)
            frames.append(_Frame("array" if token == b"[" else "object", name))
            if len(frames) > limits.depth:
                return JsonProblem(_path(frames[:-1]), f"nests arrays and objects more than {limits.depth} "
                                   "levels deep", f"Send a document at most {limits.depth} levels deep")
        elif token in (b"]", b"}"):
            if frames:
                frames.pop()
        elif token == b":":
            if frames:
                frames[-1].key = text
        elif frames:  # values and commas
            frames[-1].commas += token.count(b",")
            if frames[-1].key is not None and frames[-1].kind == "object":
                frames[-1].key = None
            if frames[-1].commas >= limits.items:
                kind = "list" if frames[-1].kind == "array" else "object"
                return JsonProblem(_path(frames), f"this {kind} has more than {limits.items} members",
                                   f"Send at most {limits.items}")
    return JsonProblem("body", "exceeds the server's limits on nesting or list length", "Send a smaller document")
