"""The analyst's Python client for a civicdp server.

Example::

    from civicdp.queries.client import Client

    client = Client("http://127.0.0.1:8000", api_key="cdp_...")
    client.datasets()                                     # what you may query
    client.estimate({"dataset": "civic-demo", "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1})
    frame = client.run({"dataset": "civic-demo", "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1})
    frame.attrs["epsilon"], frame.attrs["budgets"]        # loss charged, budget left
    plan = client.plan({"dataset": "civic-demo", "parts": [...]})   # a workload within your budget, free
    frames = client.run_plan(plan["id"])                  # one charge, a DataFrame per part

Errors mirror the server's:

    ClientError
    ├── Unauthenticated    401: missing, unknown, expired or revoked key
    ├── AccessDenied       403: a policy refused (``rule`` says which)
    ├── NotFound           404
    ├── BudgetExhausted    409: which scope, how much is left, when it renews
    ├── InvalidQuery       422: which field and how to fix it
    └── ServerUnavailable  503 and other server-side failures
"""

from __future__ import annotations

from typing import Any

import httpx
import pandas as pd


class ClientError(Exception):
    """A request the server refused; ``body`` is the server's error document."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.code = body.get("error", "error")
        super().__init__(body.get("detail") or f"HTTP {status}")


class Unauthenticated(ClientError):
    pass


class AccessDenied(ClientError):
    @property
    def rule(self) -> list[str] | None:
        return self.body.get("rule")


class NotFound(ClientError):
    pass


class BudgetExhausted(ClientError):
    @property
    def remaining(self) -> float | None:
        """Epsilon left in the scope that refused."""
        return self.body.get("remaining_epsilon")

    @property
    def renews_at(self) -> str | None:
        return self.body.get("renews_at")


class InvalidQuery(ClientError):
    @property
    def field(self) -> str | None:
        return self.body.get("field")


class ServerUnavailable(ClientError):
    pass


_ERRORS = {401: Unauthenticated, 403: AccessDenied, 404: NotFound, 409: BudgetExhausted, 422: InvalidQuery}


class Client:
    """A connection to a civicdp server with one API key."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/") + "/v1", timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            self._raise(response)
        return response.json()

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = {"error": "error", "detail": response.text}
        raise _ERRORS.get(response.status_code, ServerUnavailable)(response.status_code, body)

    def datasets(self) -> list[dict[str, Any]]:
        """The datasets you may use, with their public metadata."""
        return self._call("GET", "/datasets")

    def estimate(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Cost and predicted accuracy of ``spec``; free, reads no data."""
        return self._call("POST", "/queries/estimate", json=spec)

    def run(self, spec: dict[str, Any]) -> pd.DataFrame:
        """The private answer as a DataFrame (value, ci_low, ci_high per cell).

        ``.attrs`` holds ``epsilon`` (the release's loss), ``charged`` (what this call
        cost: 0 when the stored answer to an identical question was returned),
        ``cached``, ``contributions``, ``confidence``, ``release_id`` and ``budgets``; for
        analyses answering with several tables, ``tables`` maps each further table's
        name (e.g. ``"bundles"``) to its DataFrame.
        """
        answer = self._call("POST", "/queries", json=spec)
        frame = pd.DataFrame(answer["rows"], columns=answer["columns"])
        frame.attrs.update({
            "tables": {name: pd.DataFrame(t["rows"], columns=t["columns"])
                       for name, t in answer.get("tables", {}).items()},
            "epsilon": answer["loss"]["epsilon"], "delta": answer["loss"]["delta"],
            "charged": answer["charged"]["epsilon"], "cached": answer["cached"],
            "contributions": answer["contributions"], "confidence": answer["confidence"],
            "release_id": answer["release_id"], "budgets": answer["budgets"], "notes": answer["notes"],
        })
        return frame

    def bundles(self, spec: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Bundle discovery: ``(pairs, bundles)`` as DataFrames (``analysis`` defaults to "bundles").

        For ``{"analysis": "bundle_changes", ...}`` the first frame holds the pair changes and
        the second the bundles' changes. Both carry the answer's ``.attrs`` (see :meth:`run`).
        """
        frame = self.run({"analysis": "bundles", **spec})
        bundles = frame.attrs["tables"]["bundles"]
        bundles.attrs.update({k: v for k, v in frame.attrs.items() if k != "tables"})
        return frame, bundles

    def plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Plan a workload and store it (free, reads no data): each part's loss and predicted
        accuracy, the total, whether it fits your budgets (``fit``) and what to loosen if not.
        Run it with :meth:`run_plan` using the returned ``id``."""
        return self._call("POST", "/plans", json=plan)

    def get_plan(self, plan_id: str) -> dict[str, Any]:
        """A stored plan, estimated again on the dataset's version served now."""
        return self._call("GET", f"/plans/{plan_id}")

    def run_plan(self, plan_id: str) -> dict[str, pd.DataFrame]:
        """Run a stored plan: one charge for every part not yet released, then a DataFrame per part.

        Each frame's ``.attrs`` holds ``cached``, ``derived_from``, ``release_id``, ``confidence``
        and ``predicted``; every frame's ``.attrs["plan"]`` holds ``charged`` and ``budgets``.
        """
        answer = self._call("POST", f"/plans/{plan_id}/run")
        frames = {}
        for part in answer["parts"]:
            frame = pd.DataFrame(part["rows"], columns=part["columns"])
            frame.attrs.update({k: part[k] for k in ("cached", "derived_from", "release_id", "confidence", "predicted")})
            frame.attrs["plan"] = {k: answer[k] for k in ("plan_id", "charged", "budgets", "dataset_version")}
            frames[part["name"]] = frame
        return frames

    def budgets(self, dataset: str | None = None) -> list[dict[str, Any]]:
        """Your budgets: spent and remaining per scope."""
        return self._call("GET", "/budgets", params={"dataset": dataset} if dataset else None)

    # -- oversight: the audit log ------------------------------------------------------------

    def audit_entries(self, **filters: Any) -> pd.DataFrame:
        """Audit entries, oldest first. Filters: account, agency, dataset, action, decision,
        since, until (ISO times), after (a seq), limit (≤ 1000 per page; pages are followed)."""
        limit = filters.pop("limit", None)
        rows: list[dict[str, Any]] = []
        params = {k: v for k, v in filters.items() if v is not None}
        while True:
            page = self._call("GET", "/audit/entries", params={**params, "limit": min(limit or 1000, 1000)})
            rows += [{"seq": e["seq"], **e["entry"]} for e in page["entries"]]
            if page["next_after"] is None or (limit is not None and len(rows) >= limit):
                break
            params["after"] = page["next_after"]
        return pd.DataFrame(rows[:limit] if limit else rows)

    def audit_ledger(self, dataset: str | None = None) -> dict[str, pd.DataFrame]:
        """``budgets`` (spent and remaining per scope) and ``history`` (each charge over time)."""
        body = self._call("GET", "/audit/ledger", params={"dataset": dataset} if dataset else None)
        return {"budgets": pd.DataFrame(body["budgets"]), "history": pd.DataFrame(body["history"])}

    def audit_checkpoint(self) -> str:
        """The latest signed checkpoint (C2SP note text): keep it to check the next export against."""
        return self._text("/audit/checkpoint")

    def audit_public_key(self) -> str:
        """The log's verifier key(s), one per line, current first."""
        return self._text("/audit/public-key")

    def audit_inclusion_proof(self, seq: int, size: int | None = None) -> dict[str, Any]:
        return self._call("GET", "/audit/proofs/inclusion",
                          params={"seq": seq, **({"size": size} if size is not None else {})})

    def audit_consistency_proof(self, first: int, second: int) -> dict[str, Any]:
        return self._call("GET", "/audit/proofs/consistency", params={"first": first, "second": second})

    def audit_export(self, path: str) -> str:
        """Download a bundle of the whole log to ``path`` (verify it with ``civicdp audit verify``)."""
        with self._http.stream("GET", "/audit/export") as response:
            if response.status_code >= 400:
                response.read()
                self._raise(response)
            with open(path, "wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return path

    def _text(self, path: str) -> str:
        response = self._http.get(path)
        if response.status_code >= 400:
            self._raise(response)
        return response.text

    # -- feed consumers: scheduled, signed releases -------------------------------------------

    def feeds(self) -> list[dict[str, Any]]:
        """The feeds you may read: schedule, releases produced, the latest one's number."""
        return self._call("GET", "/feeds")

    def feed_index(self, name: str, etag: str | None = None) -> dict[str, Any] | None:
        """The feed's releases (JSON Feed 1.1, newest first); None if unchanged since ``etag``.

        The document's ``etag`` key holds the value to pass next time (polling costs nothing).
        """
        response = self._http.get(f"/feeds/{name}", headers={"If-None-Match": etag} if etag else None)
        if response.status_code == 304:
            return None
        if response.status_code >= 400:
            self._raise(response)
        return {**response.json(), "etag": response.headers.get("ETag")}

    def feed_release(self, name: str, release: str | int = "latest", *, verify: bool = True,
                     public_key: str | None = None) -> list[pd.DataFrame]:
        """One release of a feed: a DataFrame per spec, after checking the server's signature.

        Each frame's ``.attrs`` holds ``query``, ``loss_micro``, ``tables`` (further tables as
        DataFrames), ``release`` (feed, number, period, dataset, dataset_version, released_at,
        sha256) and ``verified``. ``public_key`` is the server's verifier key as obtained out of
        band (``civicdp audit public-key`` on the server); without one the key is fetched from
        the server, which detects altered or corrupted releases but not a server that lies
        about its own key. Raises :class:`civicdp.queries.release_check.SignatureInvalid` if the
        signature does not verify.
        """
        import hashlib
        import json

        from civicdp.queries.release_check import SignatureInvalid, check_release

        response = self._http.get(f"/feeds/{name}/releases/{release}")
        if response.status_code >= 400:
            self._raise(response)
        data = response.content
        if verify:
            keys = [public_key] if public_key else [k for k in self.audit_public_key().splitlines() if k.strip()]
            failures = []
            for key in keys:
                try:
                    check_release(data, response.headers.get("Civicdp-Signature", ""), key)
                    break
                except SignatureInvalid as exc:
                    failures.append(str(exc))
            else:
                raise SignatureInvalid(failures[0] if failures else "no public key to verify the release with")
        document = json.loads(data)
        meta = {k: document[k] for k in ("feed", "number", "period", "dataset", "dataset_version", "released_at")}
        meta["sha256"] = hashlib.sha256(data).hexdigest()
        frames = []
        for result in document["results"]:
            frame = pd.DataFrame(result["rows"], columns=result["columns"])
            frame.attrs.update({
                "query": result["query"], "loss_micro": result["loss_micro"], "release": meta, "verified": verify,
                "contributions": result["contributions"], "confidence": result["confidence"],
                "tables": {n: pd.DataFrame(t["rows"], columns=t["columns"]) for n, t in result["tables"].items()},
            })
            frames.append(frame)
        return frames

    # -- service performance and monitoring ---------------------------------------------

    def performance_report(self, spec: dict[str, Any]) -> pd.DataFrame:
        """The performance report (long table: by, key, metric, value, ci_low, ci_high); wide
        tables per grouping in ``.attrs["tables"]`` (``by_department``, ...)."""
        return self.run({"analysis": "performance_report", **spec})

    def lagged_points(self, spec: dict[str, Any]) -> pd.DataFrame:
        """Flagged services and steps, ranked; all cells in ``.attrs["tables"]`` (services, steps)."""
        return self.run({"analysis": "lagged_points", **spec})

    def department_scores(self, spec: dict[str, Any]) -> pd.DataFrame:
        """Observed / expected duration per department with intervals and rank ranges."""
        return self.run({"analysis": "department_scores", **spec})

    def monitors(self) -> list[dict[str, Any]]:
        """Monitors you may see, with their total losses and progress."""
        return self._call("GET", "/monitors")

    def define_monitor(self, definition: dict[str, Any]) -> dict[str, Any]:
        """Define a monitor (stewards); its total loss for the whole horizon is charged now."""
        return self._call("POST", "/monitors", json=definition)

    def append_batch(self, monitor: str, parquet: bytes, start: str, end: str) -> dict[str, Any]:
        """Append a Parquet batch of events covering ``[start, end)`` (stewards): released steps and alerts."""
        return self._call("POST", f"/monitors/{monitor}/batches", content=parquet, params={"start": start, "end": end},
                          headers={"Content-Type": "application/octet-stream"})

    def monitor_releases(self, monitor: str) -> pd.DataFrame:
        """Released values: one row per step and group (value, running value and their intervals)."""
        rows = [{"step": r["step"], "step_start": r["step_start"], **row}
                for r in self._call("GET", f"/monitors/{monitor}/releases") for row in r["rows"]]
        return pd.DataFrame(rows)

    def subscribe(self, monitor: str, callback_url: str | None = None) -> dict[str, Any]:
        """Follow a monitor of your agency; alerts are POSTed to ``callback_url`` if given."""
        return self._call("POST", f"/monitors/{monitor}/subscriptions", json={"callback_url": callback_url})

    def alerts(self, monitor: str, after: int = 0) -> pd.DataFrame:
        """Alerts raised by the monitor's rules (which rule, which value, its interval)."""
        return pd.DataFrame(self._call("GET", f"/monitors/{monitor}/alerts", params={"after": after}))
