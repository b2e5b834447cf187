"""Every statement the SQLite spool runs must find its rows by index, never by scanning the queue.

SQLite's planner has no statistics here (we never ANALYZE), and one wrong choice made every put cost
O(queue length) once; so this test records each statement of a workload that touches every method and
checks its EXPLAIN QUERY PLAN: no SCAN of a big table, and statements about one message use the primary key.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import pytest

from backupmx.clock import FakeClock
from backupmx.model import Delivered, Envelope, Recipient, RecipientState
from backupmx.reply import Reply
from backupmx.spool import BodyBuffer, NewMessage, QueueFilter, RecipientUpdate
from backupmx.spool import sqlite as sqlite_spool

T0 = 1_700_000_000.0
SMALL_TABLES = ("msg_counts", "rcpt_counts", "dom_pending", "kv", "outages", "sqlite_")
ALLOWED_SCANS = (
    "SCAN messages USING INDEX messages_corrupt",  # partial index: the corrupt entries only
    "SCAN messages USING INDEX messages_pending",  # the oldest pending message: ORDER BY id LIMIT 1
)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    seen: set[str] = set()
    connect = sqlite_spool.SqliteSpool._connect

    def traced(self: sqlite_spool.SqliteSpool, *, readonly: bool = False) -> sqlite3.Connection:
        conn = connect(self, readonly=readonly)
        conn.set_trace_callback(seen.add)
        return conn

    monkeypatch.setattr(sqlite_spool.SqliteSpool, "_connect", traced)
    return seen


async def _workload(spool: sqlite_spool.SqliteSpool) -> None:
    envs = [
        Envelope("a@x.example", (Recipient(f"u{i}@d{i % 3}.example"), Recipient(f"v{i}@d{(i + 1) % 3}.example")))
        for i in range(300)
    ]
    ids = await asyncio.gather(*[spool.put(e, BodyBuffer.from_bytes(b"x")) for e in envs])
    claims = await spool.claim_due(now=T0 + 1, owner="n", lease_seconds=60, limit=10)
    claims += await spool.claim_due(now=T0 + 1, owner="n", lease_seconds=60, limit=10, domains=["d1.example"])
    claims += await spool.claim_due(
        now=T0 + 1, owner="n", lease_seconds=60, limit=10, domains=["d1.example", "d2.example"]
    )
    claims += await spool.claim_due(now=T0 + 1, owner="n", lease_seconds=60, limit=10, exclude_domains=["d1.example"])
    await spool.renew(claims, now=T0 + 2, lease_seconds=60)
    first = claims[0]
    await spool.record(
        "n",
        [RecipientUpdate(r.message_id, r.index, Delivered(Reply(250, "2.0.0", "ok"))) for r in first.recipients],
        [NewMessage(envs[0], b"dsn")],
        now=T0 + 3,
    )
    await spool.release(claims[1:])
    await spool.read_body(ids[5])
    await spool.get(ids[5])
    await spool.next_due_at()
    await spool.next_due_at(domains=["d1.example", "d2.example"])
    await spool.hold(ids[7])
    await spool.hold(ids[8], domain="d1.example")
    await spool.hold(None, domain="d2.example", reason="drill")
    await spool.hold(None)
    await spool.release_held(ids[7])
    await spool.release_held(ids[8], domain="d1.example", reason="operator")
    await spool.release_held(None, reason="drill")
    await spool.release_held(None, domain="d2.example")
    await spool.release_held(None)
    await spool.flush()
    await spool.flush("d1.example")
    await spool.delete(ids[9])
    await spool.purge(before=T0 + 100)
    for flt in [
        QueueFilter(),
        QueueFilter(domain="d1.example"),
        QueueFilter(recipient="u1"),
        QueueFilter(state=RecipientState.HELD),
        QueueFilter(held_reason="drill"),
        QueueFilter(state=RecipientState.QUEUED),
        QueueFilter(pending_only=False),
        QueueFilter(kind="user", sender="a", domain="d2.example", state=RecipientState.QUEUED),
    ]:
        await spool.list_messages(flt, limit=10, after=ids[3])
    await spool.count_pending()
    await spool.stats()
    await spool.list_corrupt()
    await spool.outage_started("d1.example", T0)
    await spool.outage_ended("d1.example", T0 + 1)
    await spool.outages()
    await spool.outages("d1.example")
    await spool.kv_put("ns", "k", b"v")
    await spool.kv_get("ns", "k")
    await spool.kv_delete("ns", "k")
    await spool.verify(limit=5)


async def test_no_statement_scans_the_queue(tmp_path: Path, statements: set[str]) -> None:
    spool = sqlite_spool.SqliteSpool(tmp_path, clock=FakeClock(T0))
    await spool.open()
    try:
        await _workload(spool)
    finally:
        await spool.close()
    conn = sqlite3.connect(tmp_path / "spool.db")
    problems: list[str] = []
    checked = 0
    for sql in sorted(statements):
        if not re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT)\b", sql, re.IGNORECASE):
            continue  # BEGIN, SAVEPOINT, PRAGMA, DDL of the migration
        if "finished_at = (SELECT max" in sql:
            continue  # the one-time backfill of the v3 migration
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        checked += 1
        for step in plan:
            scan = step.startswith("SCAN") and "CONSTANT ROW" not in step
            if scan and not step.startswith(ALLOWED_SCANS) and not any(t in step for t in SMALL_TABLES):
                problems.append(f"{step}  <-  {sql}")
            if (
                re.search(r"\bmessage_id = '", sql)
                and "recipients" in step
                and "USING" in step
                and "PRIMARY KEY" not in step
                and "rcpt_leased" not in step
            ):
                problems.append(f"one message, not by primary key: {step}  <-  {sql}")
    conn.close()
    assert checked > 60
    assert problems == [], "\n".join(problems)
