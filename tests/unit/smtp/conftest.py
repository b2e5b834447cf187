"""Fixtures for the SMTP server tests: a server on an ephemeral loopback port over the real SqliteSpool
(or a given stand-in), a mail log captured in memory, a self-signed certificate made with openssl."""

from __future__ import annotations

import asyncio
import io
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from backupmx.clock import SystemClock
from backupmx.config import config_from_dict
from backupmx.maillog import MailLog
from backupmx.policy.domains import build_checks
from backupmx.smtp.server import SmtpServer
from backupmx.spool.sqlite import SqliteSpool


class Running:
    def __init__(self, server: SmtpServer, spool: Any, log: io.StringIO, events: list[tuple[str, dict[str, object]]]):
        self.server = server
        self.spool = spool
        self.log = log
        self.events = events

    @property
    def port(self) -> int:
        return self.server.bound[0][1]

    def events_named(self, name: str) -> list[dict[str, object]]:
        return [f for e, f in self.events if e == name]


MakeServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[MakeServer]:
    made: list[Running] = []
    opened: list[SqliteSpool] = []

    async def make(
        *,
        spool: Any = None,
        server: dict[str, Any] | None = None,
        domains: list[dict[str, Any]] | None = None,
        tls_context: ssl.SSLContext | None = None,
        checks: list[Any] | None = None,
    ) -> Running:
        data_dir = tmp_path / f"data{len(made)}"
        cfg = config_from_dict(
            {
                "server": {
                    "hostname": "mx.test",
                    "node_name": "node1",
                    "listen": ["127.0.0.1:0"],
                    "data_dir": str(data_dir),
                    "min_free_disk": 0,
                    **(server or {}),
                },
                "domains": domains
                if domains is not None
                else [{"name": "example.test", "primary": ["127.0.0.1:1"], "recipients": "any"}],
            }
        )
        if spool is None:
            data_dir.mkdir(parents=True, exist_ok=True)
            spool = SqliteSpool(data_dir)
            await spool.open()
            opened.append(spool)
        buf = io.StringIO()
        log = MailLog(buf)
        events: list[tuple[str, dict[str, object]]] = []
        log.subscribe(lambda e, f: events.append((e, dict(f))))
        srv = SmtpServer(
            config=cfg,
            spool=spool,
            checks=build_checks(cfg) if checks is None else checks,
            maillog=log,
            clock=SystemClock(),
            tls_context=tls_context,
        )
        await srv.start()
        r = Running(srv, spool, buf, events)
        made.append(r)
        return r

    yield make
    for r in made:
        await r.server.stop(grace=0)
    for s in opened:
        await s.close()


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "2",
            "-subj",
            "/CN=mx.test",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return crt, key


@pytest.fixture
def server_tls(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


@pytest.fixture
def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test here runs on the stock loop and on uvloop (what `serve` uses when installed)."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
