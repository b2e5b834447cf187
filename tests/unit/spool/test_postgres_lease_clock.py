"""PostgreSQL leases follow the database's clock (issue 12 item 5): a node whose clock runs an hour ahead
cannot take a lease another node holds and renews, and a renewal extends it on the database's time."""

from __future__ import annotations

import time

from backupmx.errors import LeaseLost
from backupmx.model import Envelope, Recipient
from backupmx.spool import BodyBuffer
from backupmx.spool.postgres import PostgresSpool
from tests.support.postgres import postgres_server_fixture, postgres_url_fixture  # noqa: F401 (fixtures)


async def test_a_node_with_a_clock_ahead_cannot_take_a_live_lease(postgres_url: str) -> None:
    a = PostgresSpool(postgres_url, node="a")
    b = PostgresSpool(postgres_url, node="b")
    assert a.lease_clock == "database"
    await a.open()
    await b.open()
    try:
        qid = await a.put(Envelope("s@sender.test", (Recipient("x@example.test"),)), BodyBuffer.from_bytes(b"x\r\n"))
        now = time.time()
        mine = await a.claim_due(now=now, owner="a", lease_seconds=60, limit=10)
        assert [c.message.id for c in mine] == [qid]
        skewed = now + 3600  # b's clock is an hour ahead: on its own clock, a's lease ran out long ago
        assert await b.claim_due(now=skewed, owner="b", lease_seconds=60, limit=10) == []
        await a.renew(mine, now=now - 3600, lease_seconds=60)  # a's clock behind: still renewed on the DB's
        assert await b.claim_due(now=skewed, owner="b", lease_seconds=60, limit=10) == []
        await a.release(mine)
        theirs = await b.claim_due(now=skewed, owner="b", lease_seconds=60, limit=10)
        assert [c.message.id for c in theirs] == [qid]
        try:
            await a.renew(mine, now=now, lease_seconds=60)
        except LeaseLost:
            pass
        else:
            raise AssertionError("a renewed a lease b holds")
    finally:
        await a.close()
        await b.close()
