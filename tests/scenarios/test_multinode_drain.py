"""Many nodes, one queue: three `backupmx serve` nodes on loopback share one PostgreSQL spool. Mail is
sent to all three while the primary is down; the primary (an aiosmtpd sink) comes back on its port; one
node is SIGKILLed in the middle of the drain. Every acknowledged message reaches the primary, every
recipient once: a duplicate is allowed only for a message the killed node was handing over when it died
(its 250 arrived in the kill window), and each is counted. The dead node's leases pass to the others
and the queue is empty within a bounded time after they expire (`[delivery] lease = "5s"`)."""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backupmx.model import RecipientState
from backupmx.spool.postgres import PostgresSpool
from tests.support.postgres import postgres_server_fixture, postgres_url_fixture  # noqa: F401 (fixtures)
from tests.support.serve import ServeProcess, free_port

pytestmark = pytest.mark.slow

LEASE = 5.0
NODES = 3
PER_NODE = 60  # messages sent to each node
SINK_DELAY = 0.03  # the primary takes this long per message, so the drain lasts long enough to kill into
TOKEN_RE = re.compile(rb"X-Test-Token: (\S+)")
QUEUED_RE = re.compile(r"queued as ([0-9A-Z]+)")


@dataclass
class Delivery:
    token: str
    rcpt: str
    helo: str  # the node that delivered it (each node has its own hostname)
    at: float


@dataclass
class Sink:
    """An aiosmtpd primary in a thread, recording every (message token, recipient) it is given."""

    port: int
    delay: float
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    controller: Any = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.delay)
        m = TOKEN_RE.search(envelope.content)
        token = m.group(1).decode() if m else "?"
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.deliveries.append(Delivery(token, rcpt, str(session.host_name), time.time()))
        return "250 2.0.0 Ok: delivered"

    def start(self) -> Sink:
        from aiosmtpd.controller import Controller

        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()

    def snapshot(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)


def message(token: str, rcpts: list[str], size: int) -> bytes:
    head = (
        f"From: sender@sender.test\r\nTo: {', '.join(rcpts)}\r\nSubject: {token}\r\n"
        f"X-Test-Token: {token}\r\nMessage-ID: <{token}@sender.test>\r\n\r\n"
    ).encode()
    return head + (b"x" * 70 + b"\r\n") * max(1, size // 72)


def send_all(node: ServeProcess, prefix: str, n: int) -> dict[str, list[str]]:
    """Send n messages over one session; returns token -> recipients of those that got a 250."""
    acked: dict[str, list[str]] = {}
    with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as c:
        c.ehlo("client.test")
        for i in range(n):
            token = f"{prefix}-{i}"
            rcpts = [f"u{i}@example.test"] + ([f"v{i}@example.test"] if i % 3 == 0 else [])
            c.mail("sender@sender.test")
            for r in rcpts:
                code, _ = c.rcpt(r)
                assert code == 250
            code, msg = c.data(message(token, rcpts, 800 + 37 * i))
            if code == 250:
                assert QUEUED_RE.search(msg.decode())
                acked[token] = rcpts
    return acked


async def final_state(url: str) -> tuple[int, Counter[str], int]:
    spool = PostgresSpool(url, node="test-reader")
    await spool.open()
    try:
        st = await spool.stats()
        outages = await spool.outages("example.test")
        return await spool.count_pending(), Counter(st.recipients_by_state), len(outages)
    finally:
        await spool.close()


def test_three_nodes_one_database_primary_back_node_killed_mid_drain(postgres_url: str, tmp_path: Path) -> None:
    primary_port = free_port()
    domains = [{"name": "example.test", "primary": [f"127.0.0.1:{primary_port}"], "recipients": "any"}]
    delivery = {
        "lease": f"{int(LEASE)}s",
        "probe_interval": "1s",
        "probe_timeout": "1s",
        "down_after": 1,
        "retry_min": "1s",
        "retry_max": "2s",
        "connect_timeout": "2s",
        "window": 10,
        "concurrency_initial": 2,
        "concurrency_max": 4,
    }
    nodes = [
        ServeProcess(
            tmp_path / f"n{i}",
            domains=domains,
            delivery=delivery,
            server={"hostname": f"n{i}.backup.test", "node_name": f"n{i}"},
            extra={"spool": {"url": postgres_url}},
        )
        for i in range(1, NODES + 1)
    ]
    sink = Sink(primary_port, SINK_DELAY)
    try:
        for node in nodes:
            node.start()
        # 1. The primary is down: mail to every node is acknowledged and held in the one queue.
        ledger: dict[str, list[str]] = {}
        for node in nodes:
            ledger.update(send_all(node, node.workdir.name, PER_NODE))
        assert len(ledger) == NODES * PER_NODE
        assert nodes[0].queue_count() == len(ledger)  # any node sees the whole queue
        wanted = {(t, r) for t, rcpts in ledger.items() for r in rcpts}

        # 2. The primary comes back; 3. one node dies in the middle of the drain.
        sink.start()
        deadline = time.monotonic() + 60
        while len(sink.snapshot()) < len(wanted) // 3:
            assert time.monotonic() < deadline, f"the drain did not start: {len(sink.snapshot())} delivered"
            time.sleep(0.02)
        # The victim: the node busiest right now (most deliveries in the last half second).
        recent = Counter(d.helo for d in sink.snapshot() if d.at > time.time() - 0.5)
        victim_helo = (recent or Counter(d.helo for d in sink.snapshot())).most_common(1)[0][0]
        victim = next(n for i, n in enumerate(nodes, 1) if victim_helo == f"n{i}.backup.test")
        by_victim_before = sum(1 for d in sink.snapshot() if d.helo == victim_helo)
        victim.kill()
        killed_at = time.time()

        # 4. Everything arrives, within a bound after the dead node's leases expire.
        bound = LEASE + 15.0
        while {(d.token, d.rcpt) for d in sink.snapshot()} != wanted:
            assert time.time() < killed_at + bound, (
                f"not drained {bound:.0f}s after the kill: {len(wanted - {(d.token, d.rcpt) for d in sink.snapshot()})}"
                f" recipients missing"
            )
            time.sleep(0.05)
        drained_at = time.time()
        time.sleep(1.0)  # late duplicates would show now
        got = sink.snapshot()

        counts = Counter((d.token, d.rcpt) for d in got)
        dups = {k: n for k, n in counts.items() if n > 1}
        for key, n in dups.items():
            first, *later = sorted((d for d in got if (d.token, d.rcpt) == key), key=lambda d: d.at)
            assert n == 2, f"{key} delivered {n} times"
            # Allowed only in the kill window: the dead node handed it over just before it died and
            # another node delivered it again after the lease ran out.
            assert first.helo == victim_helo and first.at <= killed_at + 0.5, (key, first, later)
            assert later[0].helo != victim_helo and later[0].at >= killed_at, (key, later)
        # At most what the killed node had in flight (its connections x recipients per message).
        assert len(dups) <= delivery["concurrency_max"] * 2, dups
        per_node = Counter(d.helo for d in got)
        after_kill = Counter(d.helo for d in got if d.at > killed_at + 0.5)
        assert by_victim_before and victim_helo not in after_kill, (victim_helo, per_node)

        pending, by_state, outages = asyncio.run(final_state(postgres_url))
        assert pending == 0 and by_state == {RecipientState.DELIVERED.value: len(wanted)}, by_state
        assert outages == 1  # declared once for all nodes
        print(
            f"\n{NODES} nodes, {len(ledger)} messages / {len(wanted)} recipients:"
            f" drained {drained_at - killed_at:.1f}s after the kill (lease {LEASE:.0f}s);"
            f" duplicates in the kill window: {len(dups)};"
            f" delivered by node: {dict(sorted(per_node.items()))}, killed {victim_helo}"
        )
    finally:
        sink.stop()
        for node in nodes:
            node.kill()
        logs = "\n".join(f"--- {n.workdir.name}\n{n.log()[-3000:]}" for n in nodes)
        if os.environ.get("BACKUPMX_SHOW_LOGS"):
            print(logs)
