"""What the lean path remembers per process: planned questions, API keys and checked releases.

Each is something that cannot change, or is checked again every time it is used
(:mod:`civicdp.server.http.lean_writer` re-reads the key's row and the release's bytes inside
the transaction that writes the entry):

- for each request body, the planned question — dataset, the version it was planned at,
  canonical query and hash, the objects and epsilon that authorisation judges (planning
  is a pure function of the spec and the metadata of one version);
- for each API key prefix, its key and account ids, name, agency and secret hash (none
  of which ever changes);
- for each release, its answer as sent, once its bytes were checked against its audit
  entry by the full path (:func:`civicdp.server.auditlog.answers.check_stored_answer`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select
from sqlmodel import Session

from civicdp.server.state import ledger
from civicdp.server.state.db import reader
from civicdp.server.state.models import Account, ApiKey
from civicdp.server.services.query_service import CachedQuestion, QueryService, sha256_text

REMEMBERED = 4096  # bodies, keys and releases remembered per process (each an LRU)


class Lru(OrderedDict):  # type: ignore[type-arg]
    """At most ``size`` entries; the least recently remembered is forgotten first."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass(frozen=True)
class KeyFacts:
    """What never changes about an API key: its ids, its secret's hash, its account's name and agency."""

    key_id: int
    secret_hash: str
    account_id: int
    name: str
    agency: str


@dataclass
class CachedRelease:
    """A release's checked bytes and its answer as sent, but for the budgets."""

    release_id: int
    result_json: str
    result_hash: str
    vouched: tuple[str, str, str, str]
    head: bytes  # the response up to the budgets' list
    accounting: Any  # the dataset's accounting at the release's version (how its budgets are shown)


class Keys(Lru):
    """Each API key prefix's :class:`KeyFacts`."""

    def learn(self, db: Any, prefixes: list[str]) -> None:
        """Key facts of prefixes not seen yet (a read outside the transaction; re-checked inside it)."""
        if not prefixes:
            return
        with Session(reader(db)) as session:
            for row in session.execute(_KEYS, {"prefixes": sorted(set(prefixes))}):
                self.remember(row.prefix, KeyFacts(row.key_id, row.secret_hash, row.account_id, row.name,
                                                   row.agency))


class Releases(Lru):
    """Each release's answer as sent (:class:`CachedRelease`), by release id, once checked."""

    def checked(self, row: Any, alarms: Any) -> CachedRelease | None:
        """The release as sent, if its bytes are the ones the full path checked against the log."""
        if row.id in alarms.releases:
            return None
        cached = self.get(row.id)
        vouched = (sha256_text(row.result_json), row.dataset, row.dataset_version, row.query_hash) \
            if cached is None or cached.result_json != row.result_json else cached.vouched
        if vouched[0] != row.result_hash or alarms.verified.get(row.id) != vouched:
            return None  # not checked by this process yet, or changed: the full path checks (and alarms)
        if (cached is not None and cached.result_json == row.result_json and cached.result_hash == row.result_hash
                and cached.vouched == vouched):
            return cached
        answer = QueryService._answer(row.id, row.dataset, row.dataset_version, json.loads(row.result_json),
                                      cached=True, charged={"epsilon": 0.0, "delta": 0.0}, budgets=[])
        document = answer.model_dump_json().encode()
        if not document.endswith(b'"budgets":[]}'):
            return None
        cached = CachedRelease(row.id, row.result_json, row.result_hash, vouched, document[:-3],
                               ledger.accounting_in(row.metadata_json))
        self.remember(row.id, cached)
        return cached


def release_key(question: CachedQuestion) -> str:
    return f"{question.dataset}\0{question.version}\0{question.query_hash}"


def plan_body(state: Any, body: bytes) -> CachedQuestion | None:
    """Plan a body once (in a thread): None if it is not a valid question (the full path explains)."""
    try:
        raw = json.loads(body)
        if not isinstance(raw, dict) or "analysis" in raw and not isinstance(raw.get("analysis"), str):
            return None
        return state.queries.question(raw)  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - any refusal is the full path's to answer and audit
        return None


KEY_COLUMNS = (ApiKey.prefix, ApiKey.id.label("key_id"), ApiKey.secret_hash,  # type: ignore[union-attr]
               Account.id.label("account_id"), Account.name, Account.agency)  # type: ignore[union-attr]
# Statements built once (building a statement costs more than running it), their values bound per batch.
_KEYS = (select(*KEY_COLUMNS).join(Account, Account.id == ApiKey.account_id)  # type: ignore[arg-type]
         .where(ApiKey.prefix.in_(bindparam("prefixes", expanding=True))))  # type: ignore[attr-defined]
