"""The emergency inbox in the test's event loop: a real SqliteSpool, a hand-set outage source, and a
ContinuityServer on a free loopback port; `sign_in` turns an address into a signed-in aiohttp client.
Browser tests and the unit tests share it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from backupmx.clock import Clock, SystemClock
from backupmx.config import Config, config_from_dict
from backupmx.continuity.inbox import COOKIE, ContinuityServer, Sanitizer
from backupmx.continuity.render import safe_html
from backupmx.model import Envelope, QueueId, Recipient
from backupmx.spool.body import BodyBuffer
from backupmx.spool.sqlite import SqliteSpool

DOMAINS = ("example.test", "other.test")


def continuity_config(tmp: Path, *, domains: Sequence[str] = DOMAINS, **continuity: Any) -> Config:
    raw: dict[str, Any] = {
        "server": {"hostname": "backup.test", "listen": ["127.0.0.1:2525"], "data_dir": str(tmp / "data")},
        "domains": [{"name": d, "primary": ["127.0.0.1:1"]} for d in domains],
        "admin": {"listen": ""},
        "continuity": {"enabled": True, "listen": "127.0.0.1:0", **continuity},
    }
    return config_from_dict(raw, source="test.toml")


class HandOutages:
    """Outages the test declares by hand."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}

    async def outage_since(self, domain: str) -> float | None:
        return self.since.get(domain)


async def put(spool: SqliteSpool, rcpts: Sequence[str], body: bytes, *, sender: str = "bob@else.test") -> QueueId:
    env = Envelope(sender=sender, recipients=tuple(Recipient(a) for a in rcpts))
    return await spool.put(env, BodyBuffer.from_bytes(body))


@dataclass
class Inbox:
    config: Config
    spool: SqliteSpool
    server: ContinuityServer
    outages: HandOutages
    clock: Clock
    clients: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def open(self, domain: str = "example.test", since: float = 1_795_000_000.0) -> None:
        self.outages.since[domain] = since
        self.server.gate._cache.clear()

    def close(self, domain: str = "example.test") -> None:
        self.outages.since.pop(domain, None)
        self.server.gate._cache.clear()

    async def link(self, address: str, *, expires_in: float = 3600, ttl: float = 600) -> str:
        """A grant (if none yet) and a fresh link's token."""
        store = self.server.access
        if await store.grant_for(address) is None:
            await store.grant(address, expires_at=self.clock.now() + expires_in, by="test")
        return (await store.issue_link(address, ttl=ttl)).token

    def client(self, **headers: str) -> aiohttp.ClientSession:
        c = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), headers=headers)
        self.clients.append(c)
        return c

    async def sign_in(self, address: str, **headers: str) -> aiohttp.ClientSession:
        c = self.client(**headers)
        token = await self.link(address)
        async with c.post(self.url + "/signin", data={"t": token}, allow_redirects=False) as r:
            assert r.status == 303, await r.text()
        assert any(m.key == COOKIE for m in c.cookie_jar)
        return c


@asynccontextmanager
async def running_inbox(
    tmp: Path,
    *,
    sanitize: Sanitizer = safe_html,
    clock: Clock | None = None,
    domains: Sequence[str] = DOMAINS,
    **continuity: Any,
) -> AsyncIterator[Inbox]:
    cfg = continuity_config(tmp, domains=domains, **continuity)
    clock = clock or SystemClock()
    spool = SqliteSpool(cfg.server.data_dir, node="backup.test", clock=clock)
    await spool.open()
    outages = HandOutages()
    server = ContinuityServer(cfg, spool, None, clock, outages=outages, sanitize=sanitize)
    await server.start()
    inbox = Inbox(cfg, spool, server, outages, clock)
    try:
        yield inbox
    finally:
        for c in inbox.clients:
            await c.close()
        await server.stop()
        await spool.close()
