"""``civicdp feeds``: stewards define, list, share and trigger feeds on the server machine; anyone
fetches and verifies releases.

``define``, ``list``, ``share``, ``unshare`` and ``trigger`` act on the state database
directly (``CIVICDP_DATA_DIR`` or ``DATABASE_URL``), as the operator, and record every
change like the API does. A running server sees a feed defined here at once, but a
change of *who may read it* only after it reloads its policy rules (a restart): define
and share through the API (``POST /v1/feeds``) while it runs. ``fetch`` and ``verify``
need no server state: ``verify`` checks a release offline with the public key only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console

from civicdp.audit.release_signature import ReleaseSignatureError, verify_release
from civicdp.audit.signing import KeyError_, VerifierKey
from civicdp.queries.errors import QueryError
from civicdp.server.services.bootstrap import build_state
from civicdp.server.cli.common import fail, read_json
from civicdp.server.services.app_state import AppState
from civicdp.server.state.errors import AccessDenied, Conflict, InvalidRequest, NotFound
from civicdp.server.feeds.schemas import FeedDefinition
from civicdp.server.feeds.outcomes import FeedRefused
from civicdp.server.feeds.service import FeedService
from civicdp.server.state.settings import Settings

console = Console(soft_wrap=True)
feeds = typer.Typer(help="Agency feeds: scheduled, signed releases (define, list, trigger, fetch, verify).",
                    no_args_is_help=True)



@contextmanager
def _service() -> Iterator[FeedService]:
    state: AppState = build_state(Settings())
    try:
        yield FeedService.of(state)
    except (NotFound, Conflict, InvalidRequest, QueryError, ValueError) as exc:
        fail(str(exc))
    except AccessDenied as exc:  # a spec a consumer agency could not ask as a query
        fail(exc.reason)
    finally:
        state.close()


@feeds.command("define")
def define(definition: Annotated[Path, typer.Argument(help="The feed definition, a JSON file")]) -> None:
    """Define a feed: name, dataset, specs, schedule, releases announced, agencies."""
    raw = read_json(definition, "feed definition file")
    try:
        body = FeedDefinition.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    with _service() as service:
        out = service.define(None, body)
    console.print(f"defined feed {out.name}: {out.releases} {out.schedule} releases of {out.dataset} from "
                  f"{out.start:%Y-%m-%d %H:%M} to {out.end:%Y-%m-%d %H:%M} UTC, epsilon "
                  f"{out.loss_micro_per_release / 1e6:g} each ({out.announced_micro / 1e6:g} in total), "
                  f"shared with {', '.join(out.agencies)}")


@feeds.command("list")
def list_feeds() -> None:
    """Every feed with its schedule, spend so far, planned spend, latest refusal and failure (JSON)."""
    with _service() as service:
        console.print_json(json.dumps([f.model_dump(mode="json") for f in service.overview()]))


@feeds.command("trigger")
def trigger(name: str) -> None:
    """Produce the feed's next release now (exit status 1 and the reason if it is refused, or charged and failed)."""
    with _service() as service:
        try:
            view = service.trigger(None, name)
        except FeedRefused as refused:
            fail(refused.reason, code=1)
    state = "produced" if view.fresh else "already existed"
    console.print(f"release {view.number} of feed {name} (period {view.period}) {state}: "
                  f"epsilon {view.loss_micro / 1e6:g}, sha256 {view.sha256}")


@feeds.command("share")
def share(name: str, agency: str) -> None:
    """Let the feed consumers of AGENCY read the feed."""
    with _service() as service:
        agencies = service.share(None, name, agency)
    console.print(f"feed {name} is shared with {', '.join(agencies)}")


@feeds.command("unshare")
def unshare(name: str, agency: str) -> None:
    """Stop sharing the feed with AGENCY (releases already fetched stay with them)."""
    with _service() as service:
        agencies = service.share(None, name, agency, shared=False)
    console.print(f"feed {name} is shared with {', '.join(agencies) or 'no agency'}")


def _public_key(value: str) -> VerifierKey:
    path = Path(value)
    try:
        text = path.read_text() if len(value) < 4096 and path.is_file() else value
    except OSError as exc:
        fail(f"cannot read the public key file {value}: {exc.strerror}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        return VerifierKey.parse(lines[0] if lines else "")
    except KeyError_ as exc:
        fail(f"public key: {exc}")
    raise AssertionError  # unreachable: _fail exits


@feeds.command("verify")
def verify(
    release: Annotated[Path, typer.Argument(help="The release as downloaded (JSON)")],
    public_key: Annotated[str, typer.Option("--public-key", help="The server's public key, or a file holding it "
                                                                 "(civicdp audit public-key)")],
    signature: Annotated[Path | None, typer.Option(help="The signature file (default: RELEASE.sig)")] = None,
) -> None:
    """Check a release's Ed25519 signature offline; exit status 1 if it does not verify."""
    key = _public_key(public_key)
    signature = signature or release.with_name(release.name + ".sig")
    try:
        data = release.read_bytes()
        signature_text = signature.read_text()
    except OSError as exc:
        fail(f"cannot read {exc.filename}: {exc.strerror}")
    try:
        document = verify_release(data, signature_text, key)
    except ReleaseSignatureError as exc:
        fail(f"NOT VERIFIED: {exc}", code=1)
    console.print(f"verified: release {document['number']} of feed {document['feed']} (period "
                  f"{document['period']}, dataset {document['dataset']} version {document['dataset_version']}), "
                  f"signed by {key.name}+{key.id.hex()}", highlight=False)


@feeds.command("fetch")
def fetch(
    name: str,
    api_key: Annotated[str, typer.Option("--api-key", envvar="CIVICDP_API_KEY", help="Your API key")],
    url: Annotated[str, typer.Option(envvar="CIVICDP_URL", help="The server")] = "http://127.0.0.1:8000",
    release: Annotated[str, typer.Option(help="'latest' or a release number")] = "latest",
    out: Annotated[Path, typer.Option(help="Folder to write <feed>-<number>.json and .json.sig into")] = Path("."),
) -> None:
    """Download a release and its signature (then: civicdp feeds verify FILE --public-key KEY)."""
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60) as client:
            answer = client.get(f"/v1/feeds/{name}/releases/{release}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url}: {exc}")
    if answer.status_code != 200:
        try:
            detail = answer.json().get("detail", answer.text)
        except ValueError:
            detail = answer.text
        fail(f"HTTP {answer.status_code}: {detail}", code=1)
    number = json.loads(answer.content)["number"]
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}-{number}.json"
    target.write_bytes(answer.content)
    target.with_name(target.name + ".sig").write_text(answer.headers["Civicdp-Signature"] + "\n")
    console.print(f"wrote {target} and {target.name}.sig", highlight=False)
