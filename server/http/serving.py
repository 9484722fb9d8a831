"""Running the HTTP server: one process, or several workers on one listening socket.

``civicdp serve --workers N`` starts N uvicorn worker processes, each building the app
from the same settings (``civicdp.server.http.app:create_app`` as a factory) over the same state
database: budgets, the audit log (numbered by one counter row, its Merkle tree stored
as tiles), checkpoints (one signer at a time under the log's lock) and feed claims are
all decided in the database, so it does not matter which worker answers.

The listening socket is made here, with its protocol named (``IPPROTO_TCP``). uvicorn's
own multi-worker path binds it with protocol 0, and asyncio turns Nagle's algorithm off
(``TCP_NODELAY``) only on accepted sockets that say ``IPPROTO_TCP``: every keep-alive
request after the first then waits ~40 ms for the client's delayed ACK (uvicorn issue
3149). Accepted connections inherit the listener's protocol, so naming it is the whole
fix; :class:`NoDelayMixin` also sets the option on each connection, in case a socket
comes from elsewhere.
"""

from __future__ import annotations

import gc
import socket
from typing import Any

#: The application factory every worker imports.
APP = "civicdp.server.http.serving:served_app"


def served_app() -> Any:
    """The app as a server process runs it: after start-up, what it built is frozen out of the GC's scans.

    A process's start-up objects (policies, database engines, metadata, plans) live as long as it
    does; left to the cyclic collector, every full collection walks them all and pauses every
    request in flight: cached answers' p99 was 60-90 ms at a p50 of 5-7 ms, 13-15 ms frozen.
    (Only here, not in ``create_app``: tests build many apps in one process.)
    """
    from contextlib import asynccontextmanager

    from civicdp.server.http.app import create_app

    app = create_app()
    started = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(instance: Any) -> Any:
        async with started(instance) as state:
            gc.collect()
            gc.freeze()
            yield state

    app.router.lifespan_context = lifespan
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket whose accepted connections asyncio sets TCP_NODELAY on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def set_nodelay(transport: Any) -> None:
    """Turn Nagle's algorithm off on one connection (small responses go out at once)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _http_base() -> type:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # httptools not installed: the pure-Python parser
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


class NoDelayProtocol(_http_base()):  # type: ignore[misc]
    """uvicorn's HTTP/1.1 protocol (httptools if installed, else h11) with TCP_NODELAY set per connection."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(transport)


def run(host: str, port: int, workers: int = 1, log_level: str = "info") -> None:
    """Serve the app on ``host:port`` with ``workers`` processes until stopped."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(APP, factory=True, host=host, port=port, workers=workers, log_level=log_level,
                            http="civicdp.server.http.serving:NoDelayProtocol", lifespan="on", timeout_graceful_shutdown=30)
    sock = listening_socket(host, port)
    try:
        if workers > 1:
            Multiprocess(config, sockets=[sock]).run()
        else:
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
