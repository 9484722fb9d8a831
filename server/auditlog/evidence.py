"""What reconciliation compares: rows of the database, and what audit entries say about them.

A charge's entry (``query.run``, ``feed.charge``, a monitor's definition) lists each
budget it moved with ``before_micro`` and ``after_micro`` (:func:`charges_of`); a
release's entry (``query.release``, ``feed.release``) names the release and the SHA-256
of its bytes (:func:`release_claim`). A :class:`Disagreement` is state that disagrees
with its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ScopeKey = tuple[str, str, str, str]  # dataset, scope kind, subject, period
#: Entries that record a release and the hash of its bytes (``query.run``: before charge-first).
RELEASE_ACTIONS = ("query.release", "feed.release")
LEGACY_RELEASE_ACTION = "query.run"


# -- what is compared ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetRow:
    id: int
    dataset: str
    scope: str
    subject: str
    period: str
    cap_micro: int
    spent_micro: int

    @property
    def key(self) -> ScopeKey:
        return (self.dataset, self.scope, self.subject, self.period)


@dataclass(frozen=True)
class LedgerRow:
    id: int
    budget_id: int
    amount_micro: int
    before_micro: int
    after_micro: int


@dataclass(frozen=True)
class Charge:
    """One budget moved by one audited charge (one item of an entry's ``ledger``)."""

    seq: int
    before_micro: int
    after_micro: int
    loss_micro: int | None
    key: ScopeKey | None = None  # query entries name the scope ...
    budget_id: int | None = None  # ... feed and monitor entries the budget row
    cap_micro: int | None = None


@dataclass(frozen=True)
class ReleaseClaim:
    """What an audit entry says about a release."""

    seq: int
    release_id: int
    result_hash: str
    dataset: str | None
    dataset_version: str | None
    query_hash: str | None


@dataclass(frozen=True)
class ReleaseRow:
    id: int
    dataset: str
    dataset_version: str
    query_hash: str
    result_json: str
    result_hash: str


@dataclass
class Disagreement:
    """State that disagrees with its evidence.

    ``problem`` is what readiness shows (no amounts, no contents); ``detail`` the full
    explanation (audit entry, server log, ``civicdp audit reconcile``).
    """

    kind: str  # budget | release | log
    problem: str
    detail: str
    key: ScopeKey | None = None
    budget_id: int | None = None
    release_id: int | None = None

    @property
    def info(self) -> dict[str, Any]:
        if self.kind == "budget":
            dataset, scope, subject, period = self.key or ("?", "?", "?", "?")
            return {"budget_id": self.budget_id, "dataset": dataset, "scope": scope, "period": period}
        if self.kind == "release":
            return {"release_id": self.release_id}
        return {}

    def line(self) -> str:
        if self.kind == "budget":
            dataset, scope, subject, period = self.key or ("?", "?", "?", "?")
            return f"budget {scope}/{subject}/{period} of {dataset}: {self.detail}"
        if self.kind == "release":
            return f"release {self.release_id}: {self.detail}"
        return f"audit log: {self.detail}"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def charges_of(seq: int, entry: Any) -> list[Charge]:
    """The budget moves an entry records (an allowed entry with a ``ledger`` list in its detail)."""
    if not isinstance(entry, dict) or entry.get("decision") != "allowed":
        return []
    detail = entry.get("detail")
    if not isinstance(detail, dict) or not isinstance(detail.get("ledger"), list):
        return []
    dataset = detail.get("dataset")
    loss = _int(detail.get("loss_micro"))
    charges = []
    for item in detail["ledger"]:
        if not isinstance(item, dict):
            charges.append(Charge(seq, -1, -1, loss))  # malformed: disagrees with everything
            continue
        before, after = _int(item.get("before_micro")), _int(item.get("after_micro"))
        if before is None or after is None:
            charges.append(Charge(seq, -1, -1, loss))
            continue
        budget_id = _int(item.get("budget_id"))
        key = None
        if budget_id is None:
            key = (str(dataset), str(item.get("scope")), str(item.get("subject")), str(item.get("period")))
        charges.append(Charge(seq, before, after, loss, key, budget_id, _int(item.get("cap_micro"))))
    return charges


def release_claim(seq: int, entry: Any) -> ReleaseClaim | None:
    """What an entry says about a release: ``query.release``/``feed.release``, or a legacy ``query.run``."""
    if not isinstance(entry, dict):
        return None
    action, decision, detail = entry.get("action"), entry.get("decision"), entry.get("detail")
    if not isinstance(detail, dict):
        return None
    if not (action in RELEASE_ACTIONS and decision in ("released", "allowed")
            or action == LEGACY_RELEASE_ACTION and decision == "allowed"):
        return None
    release_id, result_hash = _int(detail.get("release_id")), detail.get("result_hash")
    if release_id is None or not isinstance(result_hash, str):
        return None
    return ReleaseClaim(seq, release_id, result_hash, detail.get("dataset"), detail.get("dataset_version"),
                        detail.get("query_hash"))
