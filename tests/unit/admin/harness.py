"""Shared pieces for the admin tests: a config, a real SqliteSpool with messages in it, a fake health view
and a fake delivery engine (recording what the admin side asked of it), and an AdminServer on a free
loopback port with an aiohttp client. Scenario tests import these too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from backupmx.admin.api import AdminServer
from backupmx.clock import Clock, SystemClock
from backupmx.config import Config, config_from_dict
from backupmx.maillog import MailLog
from backupmx.model import Deferred, Envelope, QueueId, Recipient
from backupmx.monitor import DestinationState, DestinationStatus
from backupmx.reply import Reply
from backupmx.spool import RecipientUpdate
from backupmx.spool.body import BodyBuffer
from backupmx.spool.sqlite import SqliteSpool

TOKEN = "test-token-0123456789abcdef"
DOMAINS = ("example.test", "other.test")


def admin_config(
    data_dir: Path,
    *,
    domains: Sequence[str] = DOMAINS,
    listen: str = "127.0.0.1:0",
    token_file: Path | None = None,
    smtp_listen: str = "127.0.0.1:2525",
    **extra: Any,
) -> Config:
    if token_file is None:
        token_file = data_dir.parent / "admin-token"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
    raw: dict[str, Any] = {
        "server": {"hostname": "backup.test", "listen": [smtp_listen], "data_dir": str(data_dir)},
        "domains": [{"name": d, "primary": ["127.0.0.1:1"]} for d in domains],
        "admin": {"listen": listen, "token_file": str(token_file)},
        **extra,
    }
    return config_from_dict(raw, source="test.toml")


class FakeHealth:
    """A health view the test sets by hand."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.statuses: dict[str, DestinationStatus] = {}

    def set(
        self,
        domain: str,
        state: DestinationState,
        *,
        since: float | None = None,
        outage_since: float | None = None,
        error: str | None = None,
    ) -> None:
        now = self.clock.now()
        self.statuses[domain] = DestinationStatus(
            domain=domain,
            state=state,
            since=since if since is not None else now,
            outage_since=outage_since if state is DestinationState.DOWN else None,
            recovered_at=None,
            last_probe_at=now,
            last_error=error,
            consecutive_failures=3 if state is DestinationState.DOWN else 0,
            target="127.0.0.1:1",
        )

    def snapshot(self) -> dict[str, DestinationStatus]:
        return dict(self.statuses)


@dataclass
class EngineStats:
    destinations: dict[str, Any] = field(default_factory=dict)


@dataclass
class DestStats:
    concurrency: int


class FakeEngine:
    """Records wake and set_reroute calls, as the real DeliveryEngine would receive them."""

    def __init__(self) -> None:
        self.wakes: list[str | None] = []
        self.reroutes: dict[str, list[tuple[str, int]] | None] = {}
        self.concurrency: dict[str, int] = {}

    def wake(self, domain: str | None = None) -> None:
        self.wakes.append(domain)

    def set_reroute(self, domain: str, hosts: list[tuple[str, int]] | None) -> None:
        self.reroutes[domain] = hosts

    def statistics(self) -> EngineStats:
        return EngineStats({d: DestStats(n) for d, n in self.concurrency.items()})


@dataclass
class SmtpStats:
    sessions_open: int = 0


class FakeSmtp:
    def __init__(self) -> None:
        self.sessions_open = 0

    def statistics(self) -> SmtpStats:
        return SmtpStats(self.sessions_open)


def body_for(subject: str, size: int = 400) -> bytes:
    head = f"From: s@sender.test\r\nTo: a@example.test\r\nSubject: {subject}\r\n\r\n".encode()
    return head + b"x" * max(0, size - len(head) - 2) + b"\r\n"


async def put(
    spool: SqliteSpool,
    rcpts: Sequence[str],
    *,
    sender: str = "s@sender.test",
    subject: str = "hello",
    now: float | None = None,
    body: bytes | None = None,
) -> QueueId:
    env = Envelope(
        sender=sender, recipients=tuple(Recipient(r) for r in rcpts), client_ip="192.0.2.1", client_helo="client.test"
    )
    with BodyBuffer.from_bytes(body or body_for(subject)) as buf:
        return await spool.put(env, buf, now=now)


UNKNOWN_USER = Reply(550, "5.1.1", "<a@example.test>: unknown user")


async def guard_hold(spool: SqliteSpool, queue_id: QueueId, *, now: float, reply: Reply = UNKNOWN_USER) -> None:
    """Make the message's queued recipients HELD by the recovery guard, as delivery would."""
    claims = await spool.claim_due(now=now + 1, owner="test", lease_seconds=60, limit=100)
    updates = [
        RecipientUpdate(r.message_id, r.index, Deferred(reply, guard_hold=True))
        for c in claims
        if c.message.id == queue_id
        for r in c.recipients
    ]
    await spool.release([c for c in claims if c.message.id != queue_id])
    await spool.record("test", updates, now=now + 1)


@dataclass
class Harness:
    config: Config
    spool: SqliteSpool
    health: FakeHealth
    engine: FakeEngine
    smtp: FakeSmtp
    maillog: MailLog
    server: AdminServer
    http: aiohttp.ClientSession  # sends the token
    anon: aiohttp.ClientSession  # sends nothing

    @property
    def url(self) -> str:
        return self.server.url

    async def get_json(self, path: str, **kw: Any) -> Any:
        async with self.http.get(self.url + path, **kw) as r:
            assert r.status == 200, (r.status, await r.text())
            return await r.json()

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        async with self.http.request(method, self.url + path, **kw) as r:
            assert r.status == 200, (r.status, await r.text())
            return await r.json()


@asynccontextmanager
async def running_admin(
    tmp_path: Path,
    *,
    clock: Clock | None = None,
    with_engine: bool = True,
    config: Config | None = None,
    maillog: MailLog | None = None,
    sample_interval: float = 60.0,
) -> AsyncIterator[Harness]:
    clock = clock or SystemClock()
    cfg = config or admin_config(tmp_path / "data")
    spool = SqliteSpool(cfg.server.data_dir, node="test", clock=clock)
    await spool.open()
    health = FakeHealth(clock)
    engine = FakeEngine()
    smtp = FakeSmtp()
    log = maillog or MailLog(open("/dev/null", "w"))  # noqa: SIM115
    server = AdminServer(
        cfg, spool, health, engine if with_engine else None, smtp, log, clock, sample_interval=sample_interval
    )
    await server.start()
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
    anon = aiohttp.ClientSession()
    try:
        yield Harness(cfg, spool, health, engine, smtp, log, server, http, anon)
    finally:
        await http.close()
        await anon.close()
        await server.stop()
        await spool.close()
        await asyncio.sleep(0)
