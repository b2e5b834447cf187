"""Scenario 03: finished messages do not pile up. After delivery, a message stays visible for
`spool.keep_finished` (for `queue show` and the dashboard), then `serve` purges it; pending mail is
never purged."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiosmtpd.controller import Controller

from backupmx.model import QueueId
from backupmx.spool.sqlite import SqliteSpool
from tests.scenarios.test_01_serve_durability import make_body, send
from tests.support.serve import ServeProcess, free_port


class Sink:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.received.append(envelope.content)  # type: ignore[attr-defined]
        return "250 2.0.0 Ok"


async def _exists(data_dir: Path, qid: str) -> bool:
    spool = SqliteSpool(data_dir)
    await spool.open()
    try:
        return await spool.get(QueueId(qid)) is not None
    finally:
        await spool.close()


def test_delivered_mail_is_purged_after_keep_finished(tmp_path: Path) -> None:
    primary_port, held_port = free_port(), free_port()
    node = ServeProcess(
        tmp_path / "node",
        domains=[
            {"name": "example.test", "primary": [f"127.0.0.1:{primary_port}"]},
            {"name": "held.test", "primary": [f"127.0.0.1:{held_port}"]},
        ],  # nothing listens: stays
        delivery={"probe_interval": "1s", "retry_min": "1s", "retry_max": "2s"},
        extra={"spool": {"keep_finished": "2s", "purge_interval": "1s"}},
    )
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=primary_port)
    controller.start()
    try:
        with node:
            node.start()
            delivered = send(node.port, make_body(1), ["alice@example.test"])
            pending = send(node.port, make_body(2), ["bob@held.test"])
            deadline = time.monotonic() + 20
            while not sink.received and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(sink.received) == 1
            assert asyncio.run(_exists(node.data_dir, delivered))  # still visible right after delivery
            deadline = time.monotonic() + 20
            while asyncio.run(_exists(node.data_dir, delivered)) and time.monotonic() < deadline:
                time.sleep(0.3)
            assert not asyncio.run(_exists(node.data_dir, delivered)), "finished message never purged"
            assert asyncio.run(_exists(node.data_dir, pending)), "a pending message was purged"
            assert node.queue_count() == 1
    finally:
        controller.stop()
