"""One whole backupmx node in the test's event loop, wired like service.py: a real SqliteSpool, the real
SMTP server, HealthMonitor, DeliveryEngine, AdminServer and (optionally) AlertManager, on loopback
ports. For dashboard and admin scenarios that need real delivery but not a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import io
import smtplib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupmx.admin.api import AdminServer
from backupmx.clock import SystemClock
from backupmx.config import Config, config_from_dict
from backupmx.delivery.route import RouteResolver
from backupmx.delivery.scheduler import DeliveryEngine
from backupmx.maillog import MailLog
from backupmx.monitor.alerts import AlertConfig, AlertManager
from backupmx.monitor.probe import HealthMonitor
from backupmx.policy.domains import build_checks
from backupmx.smtp.server import SmtpServer
from backupmx.spool.sqlite import SqliteSpool
from tests.unit.admin.harness import TOKEN


def node_config(
    tmp: Path, primaries: dict[str, str], *, delivery: dict[str, Any] | None = None, hostname: str = "backup.test"
) -> Config:
    token_file = tmp / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    raw: dict[str, Any] = {
        "server": {
            "hostname": hostname,
            "listen": ["127.0.0.1:0"],
            "data_dir": str(tmp / "data"),
            "min_free_disk": "1MB",
        },
        "domains": [{"name": d, "primary": [p]} for d, p in primaries.items()],
        "delivery": {
            "retry_min": "1s",
            "retry_max": "2s",
            "probe_interval": "1s",
            "probe_timeout": "2s",
            "down_after": 2,
            "connect_timeout": "2s",
            "recovery_guard": "1h",
            **(delivery or {}),
        },
        "admin": {"listen": "127.0.0.1:0", "token_file": str(token_file)},
    }
    return config_from_dict(raw, source="node.toml")


@dataclass
class Node:
    config: Config
    spool: SqliteSpool
    smtp: SmtpServer
    monitor: HealthMonitor
    engine: DeliveryEngine
    admin: AdminServer
    alerts: AlertManager | None
    maillog: MailLog
    log: io.StringIO

    @property
    def smtp_port(self) -> int:
        return self.smtp.bound[0][1]

    @property
    def url(self) -> str:
        return self.admin.url

    def send(self, rcpts: Sequence[str], subject: str, sender: str = "alice@sender.test") -> str:
        """One message over SMTP (blocking; call through asyncio.to_thread); returns the queue ID."""
        body = f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\nThis is {subject}.\r\n"
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as c:
            c.ehlo("client.test")
            c.mail(sender)
            for r in rcpts:
                code, msg = c.rcpt(r)
                assert code == 250, msg
            code, msg = c.data(body.encode())
            assert code == 250, msg
            return msg.decode().rsplit(" ", 1)[-1]


@asynccontextmanager
async def running_node(
    tmp: Path,
    primaries: dict[str, str],
    *,
    alerts: Sequence[dict[str, Any]] = (),
    delivery: dict[str, Any] | None = None,
    sample_interval: float = 60.0,
    hostname: str = "backup.test",
) -> AsyncIterator[Node]:
    cfg = node_config(tmp, primaries, delivery=delivery, hostname=hostname)
    clock = SystemClock()
    out = io.StringIO()
    maillog = MailLog(out, node=hostname)
    spool = SqliteSpool(cfg.server.data_dir, node=hostname, clock=clock)
    await spool.open()
    resolver = RouteResolver(cfg)
    monitor = HealthMonitor(cfg, spool, clock, maillog, resolver)
    engine = DeliveryEngine(cfg, spool, clock, maillog, monitor, resolver, owner=hostname)
    smtp = SmtpServer(config=cfg, spool=spool, checks=build_checks(cfg), maillog=maillog, clock=clock)
    smtp.on_queued = lambda _qid, _domains: engine.wake()
    manager: AlertManager | None = None
    test_alerts = tuple(AlertConfig.model_validate(a) for a in alerts)  # [[alerts]] entries
    if test_alerts:
        manager = AlertManager(test_alerts, config=cfg, spool=spool, health=monitor, clock=clock, maillog=maillog)
        monitor.subscribe(manager.on_health_change)
    admin = AdminServer(
        cfg, spool, monitor, engine, smtp, maillog, clock, alerts=manager, sample_interval=sample_interval
    )
    await monitor.open()
    tasks = [asyncio.create_task(monitor.run()), asyncio.create_task(engine.run())]
    await smtp.start()
    await admin.start()
    if manager is not None:
        await manager.start()
    try:
        yield Node(cfg, spool, smtp, monitor, engine, admin, manager, maillog, out)
    finally:
        if manager is not None:
            await manager.stop()
        await admin.stop()
        await smtp.stop(grace=1)
        monitor.stop()
        await engine.stop()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, timeout=10)
        await spool.close()


async def until(cond: Any, timeout: float = 20.0, what: str = "") -> None:
    """Poll `cond()` (sync or async) every 50 ms until true; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        await asyncio.sleep(0.05)
