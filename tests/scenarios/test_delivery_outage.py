"""Delivery scenarios on the real clock: the engine and the health monitor running as `serve` runs
them, against a real SqliteSpool and loopback primaries that are refused, black holes, slow or back.

Every wait is bounded; probe_interval is 1 s, so recovery must show within 2 s."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from backupmx.clock import SystemClock
from backupmx.model import RecipientState
from backupmx.monitor import DestinationState
from backupmx.spool.sqlite import SqliteSpool
from tests.unit.delivery.fake_primary import BlackHole, Primary, closed_port
from tests.unit.delivery.harness import BODY, Harness, make_config

FAST: dict[str, Any] = {
    "probe_interval": "1s",
    "probe_timeout": "1s",
    "down_after": 2,
    "connect_timeout": "1s",
    "retry_min": "1s",
    "retry_max": "3s",
    "lease": "30s",
}


async def until(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
    """Wait until cond() holds; return the time it took. Fails after `timeout` seconds."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - t0


@asynccontextmanager
async def running(h: Harness) -> AsyncIterator[Harness]:
    monitor = asyncio.create_task(h.monitor.run())
    engine = asyncio.create_task(h.engine.run())
    try:
        yield h
    finally:
        await h.engine.stop()
        h.monitor.stop()
        await asyncio.wait_for(asyncio.gather(engine, monitor), 15)
        await h.close()


async def harness(tmp_path: Path, target: str, **delivery: Any) -> Harness:
    h = Harness(tmp_path, make_config(target, delivery={**FAST, **delivery}), clock=SystemClock())
    return await h.open()


async def states(h: Harness, ids: list[Any]) -> set[RecipientState]:
    return {r.state for r in await recipients(h, ids)}


async def recipients(h: Harness, ids: list[Any]) -> list[Any]:
    out = []
    for q in ids:
        out.extend((await h.get(q)).recipients)
    return out


async def test_refused_primary_down_then_back(tmp_path: Path) -> None:
    port = closed_port()
    h = await harness(tmp_path, f"127.0.0.1:{port}")
    ids = [await h.put("a@example.com", "b@example.com") for _ in range(5)]
    async with running(h):
        await until(lambda: h.monitor.status("example.com").state is DestinationState.DOWN, 8)
        assert await states(h, ids) == {RecipientState.QUEUED}
        assert await h.dsns() == []
        assert (await h.spool.outages("example.com"))[0].ended_at is None
        await asyncio.sleep(0.3)  # what was under way when DOWN was declared settles
        attempts_when_down = sum(r.attempts for r in await recipients(h, ids))
        await asyncio.sleep(2.5)  # DOWN: no attempt is spent per message
        assert sum(r.attempts for r in await recipients(h, ids)) == attempts_when_down

        primary = await Primary().start(port)
        try:
            took = await until(lambda: len(primary.received) > 0, 5)
            assert took < 2 * 1.0, f"first delivery {took:.2f}s after the primary came back"
            await until(lambda: len(primary.received) == 5, 10)
            await asyncio.sleep(0.5)
            assert await states(h, ids) == {RecipientState.DELIVERED}
            assert sorted(r.content for r in primary.received) == [BODY] * 5  # once each
            assert (await h.spool.outages("example.com"))[0].ended_at is not None
            assert h.events.named("primary-back")
            assert await h.dsns() == []
        finally:
            await primary.stop()


async def test_black_hole_primary(tmp_path: Path) -> None:
    hole = BlackHole()
    port = hole.port
    h = await harness(tmp_path, f"127.0.0.1:{port}")
    qid = await h.put("a@example.com")
    primary: Primary | None = None
    try:
        async with running(h):
            await until(lambda: h.monitor.status("example.com").state is DestinationState.DOWN, 10)
            r = (await h.get(qid)).recipients[0]
            assert r.state is RecipientState.QUEUED and r.attempts <= 1  # not counted once DOWN
            assert r.last_reply is None or "timed out" in r.last_reply
            assert await h.dsns() == []
            hole.close()
            primary = await Primary().start(port)
            took = await until(lambda: len(primary.received) == 1, 5)  # type: ignore[union-attr]
            assert took < 2 * 1.0 + 1.0  # one probe interval + the probe timeout at worst
            await until(lambda: h.monitor.status("example.com").state is DestinationState.UP, 5)
            await until(lambda: h.engine.statistics().delivered == 1, 5)
            assert (await h.get(qid)).recipients[0].state is RecipientState.DELIVERED
    finally:
        hole.close()
        if primary is not None:
            await primary.stop()


async def test_slow_start_after_recovery(tmp_path: Path) -> None:
    primary = await Primary().start()
    primary.data_delay = 0.05
    h = await harness(
        tmp_path, primary.hostport, concurrency_initial=2, concurrency_max=6, messages_per_connection=4, window=200
    )
    await h.monitor.force_down("example.com", "outage")
    ids = [await h.put("a@example.com") for _ in range(60)]
    try:
        async with running(h):
            await asyncio.sleep(1.5)
            assert primary.mail_sessions == 0  # DOWN: no delivery tried (probes only)
            await h.monitor.clear_force("example.com")  # back: flushed at once, slow start from 2
            await until(lambda: len(primary.received) == 60, 30)
            await until(lambda: h.engine.statistics().delivered == 60, 5)
            stats = h.engine.statistics().destinations["example.com"]
            assert await states(h, ids) == {RecipientState.DELIVERED}
        assert max(primary.mail_history[:2]) <= 2  # starts small
        assert primary.mail_max > 2  # and grows while the primary answers 250
        assert primary.mail_max <= 6 + 1  # capped (+1: a QUIT may still be closing)
        assert stats.delivered == 60 and stats.concurrency > 2
    finally:
        await primary.stop()


async def test_lease_renewed_while_a_slow_delivery_runs(tmp_path: Path) -> None:
    primary = await Primary().start()
    primary.data_delay = 2.5
    h = await harness(tmp_path, primary.hostport, lease="1s", data_timeout="10s", command_timeout="1s")
    qid = await h.put("a@example.com")
    other = SqliteSpool(tmp_path / "data", node="other", clock=SystemClock())
    await other.open()
    stolen = 0
    try:
        async with running(h):
            await until(lambda: primary.data_started == 1, 5)
            while not primary.received:
                got = await other.claim_due(now=time.time(), owner="other", lease_seconds=30, limit=10)
                stolen += len(got)
                await asyncio.sleep(0.2)
            await until(lambda: h.engine.statistics().delivered == 1, 5)
        assert stolen == 0
        assert len(primary.received) == 1
        rec = await other.get(qid)
        assert rec is not None and rec.recipients[0].state is RecipientState.DELIVERED
    finally:
        await other.close()
        await primary.stop()


class JumpClock(SystemClock):
    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return super().now() + self.offset


async def test_clock_jumping_back_does_not_freeze_retries(tmp_path: Path) -> None:
    primary = await Primary().start()
    primary.rcpt_rule = lambda a: "451 4.3.0 later"
    clock = JumpClock()
    h = Harness(
        tmp_path, make_config(primary.hostport, delivery={**FAST, "retry_min": "2s", "retry_max": "4s"}), clock=clock
    )
    await h.open()
    qid = await h.put("a@example.com")
    try:
        async with running(h):
            await until(lambda: h.engine.statistics().deferred >= 1, 5)
            primary.rcpt_rule = None
            clock.offset = -86400.0  # a day back: the stored due time is now a day ahead
            await until(lambda: len(primary.received) == 1, 10)
            await until(lambda: h.engine.statistics().delivered == 1, 5)
            assert (await h.get(qid)).recipients[0].state is RecipientState.DELIVERED
    finally:
        await primary.stop()


async def test_lease_longer_than_retry_max_is_not_a_clock_jump(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`delivery.lease` (15m by default) may be longer than `retry_max`: a recipient in flight is due
    again only when its lease runs out, and that is no sign of a clock that went backwards."""
    primary = await Primary().start()
    primary.data_delay = 1.5  # in flight over several passes of the engine
    h = await harness(tmp_path, primary.hostport, lease="60s", retry_max="3s", data_timeout="10s")
    flushes: list[str | None] = []
    flush = h.spool.flush

    async def spy(domain: str | None = None, *, now: float | None = None) -> int:
        flushes.append(domain)
        return await flush(domain, now=now)

    h.spool.flush = spy  # type: ignore[method-assign]
    await h.put("a@example.com")
    try:
        with caplog.at_level(logging.WARNING, logger="backupmx.delivery"):
            async with running(h):
                await until(lambda: primary.data_started == 1, 5)
                await until(lambda: h.engine.statistics().delivered == 1, 5)
        assert "clock went backwards" not in caplog.text
        assert flushes == []  # nothing made due again
    finally:
        await primary.stop()


async def test_clock_jumping_back_less_than_the_lease_is_seen(tmp_path: Path) -> None:
    """A lease longer than `retry_max` does not hide a jump: the engine sees its clock read earlier
    than at its last pass, even when the stored due times alone could be a lease running out."""
    primary = await Primary().start()
    primary.rcpt_rule = lambda a: "451 4.3.0 later"
    clock = JumpClock()
    h = Harness(
        tmp_path,
        make_config(primary.hostport, delivery={**FAST, "retry_min": "10s", "retry_max": "10s", "lease": "60s"}),
        clock=clock,
    )
    await h.open()
    qid = await h.put("a@example.com")
    try:
        async with running(h):
            await until(lambda: h.engine.statistics().deferred >= 1, 5)
            primary.rcpt_rule = None
            await asyncio.sleep(0.3)  # a pass or two at the old time
            clock.offset = -40.0  # the retry, ~10 s ahead, now looks ~50 s ahead: within the lease
            await until(lambda: len(primary.received) == 1, 8)
            await until(lambda: h.engine.statistics().delivered == 1, 5)
            assert (await h.get(qid)).recipients[0].state is RecipientState.DELIVERED
    finally:
        await primary.stop()
