"""Stopping is sticky: a `stop()` that arrives before a part's `run()` has begun is not lost, so `serve`
shut down right after its start returns at once instead of waiting out the stop grace."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from backupmx.clock import SystemClock
from backupmx.config import Config, config_from_dict
from backupmx.delivery.route import RouteResolver
from backupmx.delivery.scheduler import DeliveryEngine
from backupmx.maillog import MailLog
from backupmx.monitor.alerts import AlertManager
from backupmx.monitor.canary import Canary
from backupmx.monitor.drill import DrillRunner
from backupmx.monitor.probe import HealthMonitor
from backupmx.service import Service
from backupmx.spool.sqlite import SqliteSpool

DOMAIN = "example.test"
QUICK = 3.0  # far below the probe/poll/alert intervals below, and below Service's 30 s grace


def make_config(tmp_path: Path) -> Config:
    return config_from_dict(
        {
            "server": {
                "hostname": "backup.test",
                "listen": ["127.0.0.1:0"],
                "data_dir": str(tmp_path),
                "min_free_disk": "1MB",
            },
            "log": {"maillog": str(tmp_path / "mail.log")},
            "domains": [{"name": DOMAIN, "primary": ["127.0.0.1:9"]}],
            "delivery": {"probe_interval": "1h", "lease": "15m", "retry_max": "5m"},
            "canary": [{"domain": DOMAIN, "to": f"canary@{DOMAIN}", "interval": "1h", "deadline": "1m"}],
            "alerts": [{"kind": "webhook", "url": "http://127.0.0.1:9/hook", "interval": "1h"}],
        }
    )


class _Listener:
    bound = [("127.0.0.1", 9)]


async def test_each_part_stopped_before_it_runs_returns_at_once(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    clock = SystemClock()
    spool = SqliteSpool(tmp_path, node=cfg.server.node, clock=clock)
    await spool.open()
    maillog = MailLog(io.StringIO(), node="backup.test")
    resolver = RouteResolver(cfg)
    health = HealthMonitor(cfg, spool, clock, maillog, resolver)
    engine = DeliveryEngine(cfg, spool, clock, maillog, health, resolver)
    canary = Canary(cfg, spool, health, maillog, clock, _Listener(), secret=b"k" * 32)
    drills = DrillRunner(cfg, spool, health, maillog, clock)
    alerts = AlertManager(cfg.alerts, config=cfg, spool=spool, health=health, clock=clock)
    await health.open()
    parts: list[tuple[str, Callable[[], object], Callable[[], Coroutine[Any, Any, None]]]] = [
        ("health monitor", health.stop, health.run),
        ("delivery engine", engine.stop, engine.run),
        ("canary", canary.stop, canary.run),
        ("drills", drills.stop, drills.run),
        ("alerts", alerts.stop, alerts.run),
    ]
    try:
        for name, stop, run in parts:
            task = asyncio.create_task(run())  # not begun yet: nothing has yielded to the loop
            result = stop()
            if asyncio.iscoroutine(result):
                await result
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(task, QUICK)
            except TimeoutError:
                pytest.fail(f"{name}: a stop() before run() began was lost")
            assert time.monotonic() - t0 < QUICK
    finally:
        await spool.close()


async def test_serve_stopped_right_after_start_returns_fast(tmp_path: Path) -> None:
    service = Service(make_config(tmp_path), maillog=MailLog(io.StringIO(), node="backup.test"))
    await service.start()
    t0 = time.monotonic()
    await asyncio.wait_for(service.stop(), 30.0 + 5.0)  # the grace, plus a little: fail rather than hang
    took = time.monotonic() - t0
    assert took < QUICK, f"stop took {took:.1f}s"
