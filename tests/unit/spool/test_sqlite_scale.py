"""A big queue: the answers the dashboard and the CLI need stay fast and small in memory.

Builds BACKUPMX_SCALE_N messages (default 200,000; 1,000,000 was measured by hand: count_pending 0.1 ms,
first page 11 ms, stats 0.7 ms) with the spool's own insert code in large transactions, then checks the
reads with generous bounds (they answer in milliseconds; the bound is there to catch O(queue) mistakes).
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from backupmx.clock import FakeClock
from backupmx.model import Envelope, Recipient, new_queue_id
from backupmx.spool import QueueFilter
from backupmx.spool.sqlite import SqliteSpool, _insert_message

T = TypeVar("T")
T0 = 1_700_000_000.0
N = int(os.environ.get("BACKUPMX_SCALE_N", "200000"))
BOUND = 1.0  # seconds; each read below answers in milliseconds at 1M


def _build(spool: SqliteSpool, n: int) -> None:
    conn = spool._connect()
    try:
        conn.execute("PRAGMA synchronous = OFF")  # building the fixture only
        body = b"x" * 500
        for start in range(0, n, 20_000):
            conn.execute("BEGIN")
            for i in range(start, min(n, start + 20_000)):
                domain = "rare.example" if i % 1000 == 0 else f"d{i % 4}.example"
                env = Envelope(f"s{i}@sender.example", (Recipient(f"u{i}@{domain}"),))
                t = T0 + i * 0.001
                _insert_message(conn, new_queue_id(t), env, len(body), (body,), t)
            conn.execute("COMMIT")
    finally:
        conn.close()


async def _timed(what: str, aw: Awaitable[T], times: dict[str, float]) -> T:
    t = time.perf_counter()
    result = await aw
    times[what] = time.perf_counter() - t
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_a_big_queue_answers_fast_in_bounded_memory(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path, clock=FakeClock(T0 + N))
    await spool.open()
    try:
        _build(spool, N)
        times: dict[str, float] = {}
        tracemalloc.start()
        assert await _timed("count_pending", spool.count_pending(), times) == N
        page = await _timed("first page", spool.list_messages(limit=100), times)
        assert len(page) == 100
        await _timed("next page", spool.list_messages(limit=100, after=page[-1].id), times)
        rare = await _timed(
            "rare domain page", spool.list_messages(QueueFilter(domain="rare.example"), limit=50), times
        )
        assert len(rare) == 50
        stats = await _timed("stats", spool.stats(), times)
        assert stats.messages_pending == N
        await _timed("next_due_at", spool.next_due_at(), times)
        claims = await _timed("claim 100", spool.claim_due(now=T0 + N, owner="n", lease_seconds=60, limit=100), times)
        assert len(claims) == 100
        await _timed(
            "claim 100 of one domain",
            spool.claim_due(now=T0 + N, owner="n", lease_seconds=60, limit=100, domains=["d1.example"]),
            times,
        )
        await _timed(
            "claim 100 excluding three domains",
            spool.claim_due(
                now=T0 + N,
                owner="n",
                lease_seconds=60,
                limit=100,
                exclude_domains=["d1.example", "d2.example", "d3.example"],
            ),
            times,
        )
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print({k: f"{v * 1000:.1f} ms" for k, v in times.items()}, f"python heap peak {peak / 1e6:.1f} MB")
        slow = {k: v for k, v in times.items() if v > BOUND}
        assert slow == {}, slow
        assert peak < 20e6  # pages and claims, never the queue
    finally:
        await spool.close()
