"""Alerts from the real `backupmx serve`: one outage of the primary gives a webhook exactly one "down"
and, when the primary is back, exactly one "back". Runs once `[[alerts]]` is a field of Config (and the
service wires the AlertManager to the health monitor)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backupmx.config import Config
from tests.support.serve import ServeProcess
from tests.unit.admin.node import until
from tests.unit.admin.test_alerts import receiver
from tests.unit.delivery.fake_primary import Primary

pytestmark = pytest.mark.skipif("alerts" not in Config.model_fields, reason="Config has no [[alerts]] yet")


async def test_one_down_and_one_back_from_the_real_serve(tmp_path: Path) -> None:
    primary = await Primary().start()
    port = primary.port
    async with receiver() as hook:
        node = ServeProcess(
            tmp_path / "node",
            domains=[{"name": "example.test", "primary": [primary.hostport], "recipients": "any"}],
            delivery={"down_after": 2, "probe_interval": "1s"},
            extra={"alerts": [{"kind": "webhook", "url": hook.url, "interval": "1s", "on": ["primary_down"]}]},
        )
        try:
            await asyncio.to_thread(node.start)
            await asyncio.sleep(3)  # probes succeed: nothing to say
            assert hook.posts == []
            await primary.stop()
            await until(lambda: len(hook.posts) == 1, timeout=30, what=f"the down alert\n{node.log()}")
            await asyncio.sleep(3)
            primary = await Primary().start(port)
            await until(lambda: len(hook.posts) == 2, timeout=30, what=f"the back alert\n{node.log()}")
            await asyncio.sleep(3)
            assert [(p["alert"], p["status"], p["domain"]) for p in hook.posts] == [
                ("primary_down", "firing", "example.test"),
                ("primary_down", "resolved", "example.test"),
            ]
            assert await asyncio.to_thread(node.terminate) == 0
        finally:
            node.kill()
            await primary.stop()
