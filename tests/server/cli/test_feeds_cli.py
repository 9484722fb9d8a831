"""The feeds commands that talk to a server find it where the other commands do (CIVICDP_URL)."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from civicdp.server.entry import app


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fetch_reads_the_server_address_from_civicdp_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    result = CliRunner().invoke(app, ["feeds", "fetch", "weekly"],
                                env={"CIVICDP_URL": url, "CIVICDP_API_KEY": "cdp_x"})
    assert result.exit_code != 0
    assert f"cannot reach {url}" in " ".join(result.output.split())
