"""The web console through TestClient: sessions, CSRF, headers, escaping, who sees what, changes audited."""

from __future__ import annotations

import json
from typing import Any

from tests.server.api_fixtures import ANALYST, DATASET, FEED, OVERSIGHT, STEWARD, Api, api, dataset_folder  # noqa: F401
from tests.server.http.console.console_fixtures import browser_of, csrf_of, sign_in

OVERSIGHT_PAGES = ["/console/oversight", "/console/audit", "/console/audit/0", "/console/verify",
                   "/console/audit-log/entries.jsonl", "/console/audit-log/checkpoints", "/console/export/ledger.csv"]


def test_root_leads_to_the_sign_in_form_and_pages_need_a_session(api: Api) -> None:
    client = browser_of(api)
    assert client.get("/").headers["location"] == "/console/"
    answer = client.get("/console/audit")
    assert answer.status_code == 303 and answer.headers["location"] == "/console/sign-in"
    assert "API key" in client.get("/console/sign-in").text


def test_the_session_cookie_is_httponly_strict_and_never_the_key(api: Api) -> None:
    client = browser_of(api)
    pre = client.get("/console/sign-in").text.split('name="pre" value="')[1].split('"')[0]
    answer = client.post("/console/session", data={"key": api.keys[ANALYST], "pre": pre})
    cookie = next(v for k, v in answer.headers.multi_items() if k == "set-cookie" and v.startswith("civicdp_console="))
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "max-age=" in flags and "path=/console" in flags
    assert "secure" not in flags  # plain http here; over TLS the cookie is Secure
    assert api.keys[ANALYST] not in cookie and api.keys[ANALYST].split("_")[2] not in cookie
    [entry] = api.records("console.sign_in")
    assert json.loads(entry.entry_json)["who"]["roles"] == ["analyst@health"]


def test_a_wrong_key_is_refused_and_recorded(api: Api) -> None:
    client = browser_of(api)
    pre = client.get("/console/sign-in").text.split('name="pre" value="')[1].split('"')[0]
    answer = client.post("/console/session", data={"key": api.keys[ANALYST][:-2] + "xx", "pre": pre})
    assert answer.status_code == 401 and "not accepted" in answer.text
    assert not any(k == "set-cookie" and v.startswith("civicdp_console=") for k, v in answer.headers.multi_items())
    assert api.records("auth.failed")[-1].target == "console"


def test_sign_in_without_the_forms_own_token_is_refused(api: Api) -> None:
    answer = browser_of(api).post("/console/session", data={"key": api.keys[ANALYST], "pre": "forged"})
    assert answer.status_code == 403 and "sign in from there" in answer.text


def test_pages_have_a_csp_without_unsafe_inline(api: Api) -> None:
    client = sign_in(api, OVERSIGHT)
    for path in ["/console/sign-in", "/console/", "/console/oversight", "/console/verify"]:
        policy = client.get(path).headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy, path
        assert "frame-ancestors 'none'" in policy


def test_an_analyst_cannot_reach_oversight_or_steward_pages(api: Api) -> None:
    client = sign_in(api, ANALYST)
    for path in [*OVERSIGHT_PAGES, "/console/steward", "/console/export/audit"]:
        assert client.get(path).status_code == 403, path
    denied = [e for e in api.records() if e.decision == "denied" and e.account == ANALYST]
    assert {e.action for e in denied} >= {"audit.read", "dataset.manage"}


def test_a_feed_consumer_cannot_query(api: Api) -> None:
    client = sign_in(api, FEED)
    assert client.get("/console/query").status_code == 403
    csrf = csrf_of(client)
    spec = json.dumps({"dataset": DATASET, "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1})
    assert client.post("/console/query/run", data={"csrf": csrf, "spec": spec}).status_code == 403
    assert api.count(__import__("civicdp.server.state.models", fromlist=["Release"]).Release) == 0


def test_every_page_view_is_an_audit_entry_of_its_account(api: Api) -> None:
    client = sign_in(api, OVERSIGHT)
    before = len(api.records())
    assert client.get("/console/audit").status_code == 200
    entry = api.records()[before]
    assert (entry.account, entry.action, entry.decision) == (OVERSIGHT, "audit.read", "allowed")
    assert json.loads(entry.entry_json)["request"]["path"] == "/console/audit"


def _cap_form(csrf: str | None, epsilon: str = "7.5") -> dict[str, Any]:
    form = {"dataset": DATASET, "scope": "agency", "subject": "health", "epsilon": epsilon}
    return form if csrf is None else {**form, "csrf": csrf}


def test_a_change_without_the_csrf_token_is_refused(api: Api) -> None:
    client = sign_in(api, STEWARD)
    for form in (_cap_form(None), _cap_form("not-the-token")):
        answer = client.post("/console/steward/cap", data=form)
        assert answer.status_code == 403 and "security token" in answer.text
    assert api.records("budget.set_cap") == []


def test_a_post_from_another_origin_is_refused_even_with_the_token(api: Api) -> None:
    client = sign_in(api, STEWARD)
    answer = client.post("/console/steward/cap", data=_cap_form(csrf_of(client)),
                         headers={"Origin": "https://evil.example"})
    assert answer.status_code == 403
    assert api.records("budget.set_cap") == []


def test_a_steward_sets_a_cap_and_oversight_sees_it_in_the_log(api: Api) -> None:
    steward = sign_in(api, STEWARD)
    answer = steward.post("/console/steward/cap", data=_cap_form(csrf_of(steward, "/console/steward")))
    assert answer.status_code == 303
    assert "Cap set" in steward.get(answer.headers["location"]).text
    [entry] = api.records("budget.set_cap")
    assert entry.account == STEWARD and json.loads(entry.entry_json)["detail"]["cap_micro"] == 7_500_000
    log = sign_in(api, OVERSIGHT).get("/console/audit?action=budget.set_cap")
    assert f'/console/audit/{entry.seq}"' in log.text


def test_a_bad_cap_is_a_clear_422_page(api: Api) -> None:
    client = sign_in(api, STEWARD)
    answer = client.post("/console/steward/cap", data=_cap_form(csrf_of(client), epsilon="lots"))
    assert answer.status_code == 422 and "epsilon" in answer.text


def test_revoking_the_sessions_key_ends_the_session(api: Api) -> None:
    analyst = sign_in(api, ANALYST)
    assert analyst.get("/console/analyst").status_code == 200
    steward = sign_in(api, STEWARD)
    prefix = api.keys[ANALYST].split("_")[1]
    answer = steward.post("/console/steward/keys/revoke", data={"csrf": csrf_of(steward), "prefix": prefix})
    assert answer.status_code == 303
    assert analyst.get("/console/analyst").headers["location"] == "/console/sign-in"


def test_sign_out_ends_the_session_on_the_server(api: Api) -> None:
    client = sign_in(api, ANALYST)
    cookie = client.cookies.get("civicdp_console")
    assert client.post("/console/sign-out", data={"csrf": csrf_of(client)}).status_code == 303
    replay = browser_of(api)
    replay.cookies.set("civicdp_console", cookie, path="/console")
    assert replay.get("/console/analyst").status_code == 303  # a copied cookie is dead too
    assert api.records("console.sign_out")[-1].account == ANALYST


def test_an_analyst_estimates_then_runs_and_gets_intervals(api: Api) -> None:
    client = sign_in(api, ANALYST)
    csrf = csrf_of(client, "/console/query")
    spec = json.dumps({"dataset": DATASET, "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1})
    estimate = client.post("/console/query/estimate", data={"csrf": csrf, "spec": spec})
    assert estimate.status_code == 200 and "epsilon 0.1" in estimate.text and 'id="run-form"' in estimate.text
    assert api.count(__import__("civicdp.server.state.models", fromlist=["Release"]).Release) == 0  # free
    result = client.post("/console/query/run", data={"csrf": csrf, "spec": spec})
    assert result.status_code == 200 and "interval-chart" in result.text
    data = json.loads(result.text.split('id="chart-data">')[1].split("</script>")[0])
    points = data["intervals"]["points"]
    assert points and all(p["yMin"] <= p["y"] <= p["yMax"] for p in points)
    assert api.records("query.run")[-1].account == ANALYST
    assert "Your past releases" in client.get("/console/analyst").text


def test_analyst_written_text_renders_as_text(api: Api) -> None:
    client = sign_in(api, ANALYST)
    assert client.get("/console/feeds/<script>alert(1)</script>").status_code in (403, 404, 422)
    [entry] = [e for e in api.records() if "<script>" in e.entry_json]  # the path is in the log as written
    oversight = sign_in(api, OVERSIGHT)
    pages = oversight.get(f"/console/audit?after={entry.seq - 1}").text + oversight.get(f"/console/audit/{entry.seq}").text
    assert "<script>alert(1)</script>" not in pages
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages


def test_expired_sessions_are_refused_and_dropped_at_the_next_sign_in(api: Api) -> None:
    from datetime import datetime, timedelta, timezone

    from sqlmodel import Session, select

    from civicdp.server.state.console_models import ConsoleSession

    client = sign_in(api, ANALYST)
    with Session(api.state.db) as session:
        [row] = session.exec(select(ConsoleSession)).all()
        analyst_id = row.account_id
        row.expires_at = datetime.now(timezone.utc) - timedelta(seconds=1)
        session.add(row)
        session.commit()
    assert client.get("/console/analyst").headers["location"] == "/console/sign-in"
    sign_in(api, OVERSIGHT)
    with Session(api.state.db) as session:
        rows = session.exec(select(ConsoleSession)).all()
        assert len(rows) == 1 and rows[0].account_id != analyst_id  # the expired one is gone
