"""``civicdp audit``: what an oversight body runs.

Offline (no server, no network): ``verify`` an exported bundle with the log's public
key, ``witness`` checkpoints (cosign only what is consistent with what was seen), and
``reconcile`` a verified bundle with the server's database (its log, budgets and stored
answers against the evidence in the log).
Over HTTP with an oversight key (``--url``/``CIVICDP_URL``, ``--api-key``/``CIVICDP_API_KEY``):
``entries``, ``ledger``, ``checkpoint``, ``prove``, ``export``. On the server machine:
``public-key`` and ``rotate-key``.

Exit status: 0 verified, 1 tampering found or refused, 2 bad input.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from civicdp.audit.bundle import TamperDetected, read_entries, verify_bundle
from civicdp.audit.checkpoint import Checkpoint, CheckpointError
from civicdp.audit.signing import KeyError_, SigningKey, VerifierKey
from civicdp.audit.witness import Witness, WitnessRefused
from civicdp.server.cli.common import fail
from civicdp.server.state.settings import Settings

audit = typer.Typer(help="The tamper-evident audit log: verify, witness, inspect, export.", no_args_is_help=True)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

Url = Annotated[str, typer.Option(envvar="CIVICDP_URL", help="Server address")]
ApiKey = Annotated[str, typer.Option(envvar="CIVICDP_API_KEY", help="An oversight API key")]
PublicKeys = Annotated[list[str], typer.Option("--public-key", help="The log's verifier key, or a file holding it "
                                               "(repeat for keys before and after a rotation)")]



def _keys(values: list[str]) -> list[VerifierKey]:
    keys = []
    for value in values:
        path = Path(value)
        if path.is_file():
            texts = path.read_text().split()
        elif "+" in value:
            texts = value.split()  # e.g. "$(curl .../public-key)": one key per line
        else:
            fail(f"--public-key {value!r} is neither a verifier key (name+id+key) nor a file")
        for text in texts:
            try:
                keys.append(VerifierKey.parse(text))
            except KeyError_ as exc:
                fail(f"--public-key: {exc}")
    if not keys:
        fail("give the log's public key with --public-key (civicdp audit public-key prints it)")
    return keys


def _checkpoint_file(path: Path) -> Checkpoint:
    try:
        return Checkpoint.parse(path.read_text())
    except FileNotFoundError:
        fail(f"no checkpoint file at {path}")
    except (CheckpointError, UnicodeDecodeError) as exc:
        fail(f"{path} is not a checkpoint: {exc}")
    raise AssertionError  # unreachable


@audit.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="A bundle from `civicdp audit export`")],
    public_key: PublicKeys,
    trusted_checkpoint: Annotated[Path | None, typer.Option(help="The last checkpoint you hold (from an "
                                                                 "earlier export or witness)")] = None,
) -> None:
    """Verify a bundle offline: entries, tree, signatures, proofs, and your last checkpoint."""
    keys = _keys(public_key)
    trusted = _checkpoint_file(trusted_checkpoint) if trusted_checkpoint else None
    try:
        report = verify_bundle(bundle, keys, trusted)
    except TamperDetected as exc:
        err.print(f"[bold red]TAMPERING DETECTED:[/] {exc}", highlight=False)
        raise typer.Exit(code=1) from None
    for line in report.lines():
        console.print(line, highlight=False)


@audit.command()
def reconcile(
    bundle: Annotated[Path, typer.Argument(help="A bundle from `civicdp audit export`")],
    public_key: PublicKeys,
    database_url: Annotated[str | None, typer.Option(
        help="The server's state database, read only (default: DATABASE_URL, or the SQLite file in "
             "CIVICDP_DATA_DIR)")] = None,
    trusted_checkpoint: Annotated[Path | None, typer.Option(help="The last checkpoint you hold")] = None,
) -> None:
    """Compare a verified export with the database: its log, every budget and every stored answer.

    Every budget's spent amount must be the sum of its ledger entries and the end of its
    audited charges, which follow on from each other; every stored answer must hash to
    the result hash its audit entry records. Exit 1 when anything disagrees.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from civicdp.server.state.db import make_engine
    from civicdp.server.auditlog.offline import reconcile_export

    keys = _keys(public_key)
    trusted = _checkpoint_file(trusted_checkpoint) if trusted_checkpoint else None
    try:
        verify_bundle(bundle, keys, trusted)
    except TamperDetected as exc:
        err.print(f"[bold red]TAMPERING DETECTED in the export:[/] {exc}", highlight=False)
        raise typer.Exit(code=1) from None
    url = database_url or Settings().state_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        fail(f"no database at {url[len('sqlite:///'):]}: give --database-url (or CIVICDP_DATA_DIR)")
    db = make_engine(url)
    try:
        report = reconcile_export(read_entries(bundle), db)
    except SQLAlchemyError as exc:
        fail(f"could not read the database at {db.url.render_as_string(hide_password=True)}: "
             f"{type(exc).__name__}")
    finally:
        db.dispose()
    for line in report.lines():
        console.print(line, highlight=False, markup=False)
    if report.found:
        raise typer.Exit(code=1)


@audit.command()
def witness(
    source: Annotated[Path, typer.Argument(help="A checkpoint file, or a bundle whose head to cosign")],
    public_key: PublicKeys,
    state: Annotated[Path, typer.Option(help="The witness's folder: its key and every checkpoint it saw")],
    proof: Annotated[Path | None, typer.Option(help="Consistency proof JSON (civicdp audit prove) from the "
                                                    "witness's last size to the new one")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the cosigned checkpoint here (default: print)")] = None,
) -> None:
    """Cosign a checkpoint only if it is consistent with every checkpoint witnessed before."""
    keys = _keys(public_key)
    bundle = None
    if zipfile.is_zipfile(source):
        bundle = source
        with zipfile.ZipFile(source) as archive:
            heads = sorted(n for n in archive.namelist() if n.startswith("checkpoints/"))
            if not heads:
                fail(f"{source} holds no checkpoint")
            try:
                checkpoint = Checkpoint.parse(archive.read(heads[-1]).decode())
            except (CheckpointError, UnicodeDecodeError) as exc:
                fail(f"the bundle's head checkpoint is not valid: {exc}")
    else:
        checkpoint = _checkpoint_file(source)
    path_bytes = None
    if proof is not None:
        try:
            body = json.loads(proof.read_text())
            path_bytes = [bytes.fromhex(h) for h in body["path"]]
        except (OSError, ValueError, KeyError, TypeError):
            fail(f"{proof} is not a consistency proof (JSON with a 'path' of hex hashes)")
    try:
        cosigned = Witness(state).cosign(checkpoint, keys, proof=path_bytes, bundle=bundle)
    except WitnessRefused as exc:
        err.print(f"[bold red]REFUSED:[/] {exc}", highlight=False)
        raise typer.Exit(code=1) from None
    if out:
        out.write_text(cosigned.text())
        console.print(f"cosigned the checkpoint of size {cosigned.size:,}; written to {out}")
    else:
        console.print(cosigned.text(), end="", highlight=False, markup=False)


@audit.command("public-key")
def public_key_command(
    url: Annotated[str | None, typer.Option(help="Ask a running server instead of reading the key file")] = None,
) -> None:
    """Print the log's verifier key (publish it out of band to oversight bodies)."""
    if url:
        import httpx

        try:
            response = httpx.get(url.rstrip("/") + "/v1/audit/public-key", timeout=30)
        except httpx.HTTPError as exc:
            fail(f"could not reach {url}: {exc}")
        console.print(response.text, end="", highlight=False, markup=False)
        return
    settings = Settings()
    path = settings.audit_key_path
    if not path.exists():
        fail(f"no signing key at {path}: start the server once (it creates the key), or give --url")
    try:
        console.print(SigningKey.load(path).verifier.encode(), highlight=False, markup=False)
    except (KeyError_, PermissionError) as exc:
        fail(str(exc))


@audit.command("rotate-key")
def rotate_key() -> None:
    """Replace the signing key; the change is logged and the next checkpoint is signed by both keys."""
    from civicdp.server.auditlog.append import record
    from civicdp.server.services.bootstrap import build_state
    from civicdp.server.state.db import session_scope

    settings = Settings()
    state = build_state(settings)
    try:
        old = state.audit.key
        new = SigningKey.generate(settings.audit_origin)
        with session_scope(state.db) as session:
            record(session, None, "audit.key_rotate", "audit", old_key=old.verifier.encode(),
                   new_key=new.verifier.encode())
        backup = settings.audit_key_path.with_name(settings.audit_key_path.name + ".previous")
        old.save(backup)
        new.save(settings.audit_key_path)
        head = state.audit.checkpoint(extra_keys=[old])
    finally:
        state.close()
    console.print(f"new key: {new.verifier.encode()}", highlight=False, markup=False)
    console.print(f"old key: {old.verifier.encode()} (kept in {backup}; destroy it once oversight has the "
                  "new key)", highlight=False, markup=False)
    console.print(f"checkpoint of size {head.size:,} signed by both keys: the old key vouches for the new one")


# -- over HTTP, with an oversight key -----------------------------------------------------


def _client(url: str, api_key: str):  # type: ignore[no-untyped-def]
    from civicdp.queries.client import Client

    return Client(url, api_key)


def _http(call):  # type: ignore[no-untyped-def]
    from civicdp.queries.client import ClientError

    import httpx

    try:
        return call()
    except ClientError as exc:
        fail(f"the server refused: {exc}")
    except httpx.HTTPError as exc:
        fail(f"could not reach the server: {exc}")


@audit.command()
def entries(
    url: Url = "http://127.0.0.1:8000", api_key: ApiKey = "",
    account: Annotated[str | None, typer.Option()] = None, agency: Annotated[str | None, typer.Option()] = None,
    dataset: Annotated[str | None, typer.Option()] = None, action: Annotated[str | None, typer.Option()] = None,
    decision: Annotated[str | None, typer.Option()] = None,
    since: Annotated[str | None, typer.Option(help="ISO time")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many entries (a note on stderr says if more "
                                                   "match)")] = 50,
    after: Annotated[int | None, typer.Option(min=-1, help="Only entries after this seq (to continue a listing)")
                     ] = None,
) -> None:
    """List audit entries (JSON lines), oldest first, filtered."""
    with _client(url, api_key) as client:
        frame = _http(lambda: client.audit_entries(account=account, agency=agency, dataset=dataset, action=action,
                                                   decision=decision, since=since, until=until, after=after,
                                                   limit=limit + 1))
    rows = frame.to_dict(orient="records")
    for row in rows[:limit]:
        # Fields an entry does not have are NaN in the frame: leave them out (NaN is not JSON).
        shown = {k: v for k, v in row.items() if not (isinstance(v, float) and v != v)}
        console.print(json.dumps(shown, default=str), highlight=False, markup=False)
    if len(rows) > limit:
        err.print(f"{limit} entries shown; more match: continue with --after {rows[limit - 1]['seq']}, or raise "
                  "--limit", highlight=False)


@audit.command()
def ledger(url: Url = "http://127.0.0.1:8000", api_key: ApiKey = "",
           dataset: Annotated[str | None, typer.Option()] = None) -> None:
    """Every budget (spent and remaining per scope) and each charge over time."""
    with _client(url, api_key) as client:
        tables = _http(lambda: client.audit_ledger(dataset))
    budgets = tables["budgets"]
    if "renews_at" in budgets:  # the lifetime scope never renews (null in JSON, NaN in a frame)
        budgets = budgets.astype({"renews_at": object}).fillna({"renews_at": "never"})
    console.print(budgets.to_string(index=False) if len(budgets) else "no budgets yet")
    console.print(tables["history"].astype(object).fillna("-").to_string(index=False) if len(tables["history"])
                  else "no charges yet")


@audit.command()
def checkpoint(url: Url = "http://127.0.0.1:8000", api_key: ApiKey = "",
               out: Annotated[Path | None, typer.Option(help="Also save it here")] = None) -> None:
    """The latest signed checkpoint (keep it: pass it to verify next time)."""
    with _client(url, api_key) as client:
        text = _http(client.audit_checkpoint)
    if out:
        out.write_text(text)
    console.print(text, end="", highlight=False, markup=False)


@audit.command()
def prove(url: Url = "http://127.0.0.1:8000", api_key: ApiKey = "",
          seq: Annotated[int | None, typer.Option(help="Inclusion proof of this entry")] = None,
          size: Annotated[int | None, typer.Option(help="... in the log of this size (default: all)")] = None,
          first: Annotated[int | None, typer.Option(help="Consistency proof from this size")] = None,
          second: Annotated[int | None, typer.Option(help="... to this size")] = None) -> None:
    """An inclusion proof (--seq) or a consistency proof (--first, --second), as JSON."""
    with _client(url, api_key) as client:
        if seq is not None:
            body = _http(lambda: client.audit_inclusion_proof(seq, size))
        elif first is not None and second is not None:
            body = _http(lambda: client.audit_consistency_proof(first, second))
        else:
            fail("give --seq (inclusion) or --first and --second (consistency)")
    console.print(json.dumps(body, indent=1), highlight=False, markup=False)


@audit.command()
def export(out: Annotated[Path, typer.Argument(help="Where to write the bundle (.zip)")],
           url: Url = "http://127.0.0.1:8000", api_key: ApiKey = "") -> None:
    """Download the whole log as a bundle to verify offline."""
    with _client(url, api_key) as client:
        _http(lambda: client.audit_export(str(out)))
    console.print(f"wrote {out}; verify it with: civicdp audit verify {out} --public-key KEY")
