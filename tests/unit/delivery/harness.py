"""A delivery engine wired to a real SqliteSpool, a HealthMonitor and test primaries, for tests."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backupmx.clock import Clock, FakeClock
from backupmx.config import Config, config_from_dict
from backupmx.delivery.route import RouteResolver
from backupmx.delivery.scheduler import DeliveryEngine
from backupmx.maillog import MailLog
from backupmx.model import Envelope, MessageRecord, QueueId, Recipient, RecipientRecord
from backupmx.monitor.probe import HealthMonitor
from backupmx.spool import BodyBuffer
from backupmx.spool.sqlite import SqliteSpool

T0 = 1_700_000_000.0
BODY = (
    b"Received: from client.test by backup.test; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Bob <bob@sender.test>\r\nTo: alice@example.com\r\nSubject: test\r\n\r\n"
    b"Hello.\r\n.leading dot\r\n..two\r\nBye.\r\n"
)


def make_config(
    primary: str | Sequence[str], *, delivery: dict[str, Any] | None = None, domain: dict[str, Any] | None = None
) -> Config:
    d: dict[str, Any] = {
        "retry_min": "1m",
        "retry_max": "1h",
        "connect_timeout": "2s",
        "command_timeout": "3s",
        "data_timeout": "10s",
        "probe_interval": "1s",
        "probe_timeout": "2s",
        "down_after": 2,
        "lease": "60s",
        "window": 100,
    }
    d.update(delivery or {})
    dom: dict[str, Any] = {"name": "example.com", "primary": [primary] if isinstance(primary, str) else list(primary)}
    dom.update(domain or {})
    return config_from_dict(
        {
            "server": {"hostname": "backup.test", "listen": ["127.0.0.1:2999"]},
            "domains": [dom],
            "delivery": d,
        }
    )


@dataclass
class Events:
    items: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def __call__(self, event: str, fields: dict[str, object]) -> None:
        self.items.append((event, dict(fields)))

    def named(self, name: str) -> list[dict[str, object]]:
        return [f for e, f in self.items if e == name]


class Harness:
    def __init__(self, tmp: Path, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or FakeClock(T0)
        self.spool = SqliteSpool(tmp / "data", node="test", clock=self.clock)
        self.events = Events()
        self.maillog = MailLog(io.StringIO(), node="test")
        self.maillog.subscribe(self.events)
        self.resolver = RouteResolver(config)
        self.monitor = HealthMonitor(config, self.spool, self.clock, self.maillog, self.resolver)
        self.engine = DeliveryEngine(
            config, self.spool, self.clock, self.maillog, self.monitor, self.resolver, owner="test"
        )

    async def open(self) -> Harness:
        await self.spool.open()
        await self.monitor.open()
        return self

    async def close(self) -> None:
        await self.spool.close()

    @property
    def fake(self) -> FakeClock:
        assert isinstance(self.clock, FakeClock)
        return self.clock

    async def put(
        self, *rcpts: str | Recipient, sender: str = "bob@sender.test", body: bytes = BODY, **env: Any
    ) -> QueueId:
        recipients = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in rcpts)
        envelope = Envelope(sender=sender, recipients=recipients, **env)
        return await self.spool.put(envelope, BodyBuffer.from_bytes(body), now=self.clock.now())

    async def get(self, qid: QueueId) -> MessageRecord:
        rec = await self.spool.get(qid)
        assert rec is not None
        return rec

    async def rcpt(self, qid: QueueId, index: int = 0) -> RecipientRecord:
        return (await self.get(qid)).recipients[index]

    async def dsns(self) -> list[MessageRecord]:
        from backupmx.spool import QueueFilter

        return await self.spool.list_messages(QueueFilter(kind="dsn", pending_only=False), limit=1000)
