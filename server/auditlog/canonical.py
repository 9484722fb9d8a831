"""An audit entry's stored form: canonical JSON without floats, its leaf hash, its filter columns.

Entries are canonical JSON without floats (amounts are integer micro-epsilon, other
numbers become strings), hashed into an RFC 9162 tree (:mod:`civicdp.audit.merkle`).
:func:`checked_leaf` is the check every stored entry read passes: it hashes to its leaf
hash and carries its own number.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from civicdp.audit.merkle import leaf_hash
from civicdp.server.state.caller import Caller

MAX_TEXT = 200


def plain(value: Any) -> Any:
    """JSON values without floats (their text is not canonical across languages)."""
    if isinstance(value, str) or value is None:  # the most frequent first (every entry has dozens)
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, (bool, int)):
        return value
    return str(value)


def canonical_bytes(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


def entry_values(seq: int, now: datetime, *, caller: Caller | None, action: str, target: str, decision: str,
                 rule: list[str] | None = None, roles: list[str] | None = None,
                 request: dict[str, Any] | None = None, detail: dict[str, Any] | None = None,
                 dataset: str | None = None) -> dict[str, Any]:
    """The stored row of entry number ``seq``: its canonical JSON, leaf hash and filter columns."""
    who = None if caller is None else {"account": caller.name, "account_id": caller.account_id,
                                       "agency": caller.agency, "roles": sorted(roles or [])}
    entry = plain({"seq": seq, "time": now, "who": who, "action": action, "target": target,
                   "decision": decision, "rule": rule, "request": request, "detail": detail or {}})
    data = canonical_bytes(entry)
    return {"seq": seq, "created_at": now, "account": caller.name if caller else None,
            "account_id": caller.account_id if caller else None, "agency": caller.agency if caller else None,
            "action": action[:60], "target": _clip(target) or "", "dataset": _clip(dataset),
            "decision": decision[:20], "entry_json": data.decode(), "leaf_hash": leaf_hash(data).hex()}


def _embedded_seq(data: bytes) -> int | None:
    """The number an entry's bytes give themselves (canonical entries: ``...,"seq":N,"target":...``)."""
    at = data.rfind(b',"seq":')
    if at >= 0:
        start = stop = at + 7
        while stop < len(data) and 48 <= data[stop] <= 57:
            stop += 1
        if stop > start and data.startswith(b',"target":', stop):
            return int(data[start:stop])
    try:
        value = json.loads(data)
    except ValueError:
        return None
    seq = value.get("seq") if isinstance(value, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def checked_leaf(seq: int, text: str, hex_hash: str) -> bytes | str:
    """The leaf hash of stored entry ``seq``, or what is wrong with it (a problem text)."""
    data = text.encode()
    leaf = leaf_hash(data)
    if leaf.hex() != hex_hash:
        return f"entry {seq} does not hash to its stored leaf hash: its text was changed in the database"
    embedded = _embedded_seq(data)
    if embedded != seq:
        return (f"row {seq} holds entry number {embedded}: entries were reordered or renumbered in the database")
    return leaf
