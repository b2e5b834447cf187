"""Single use of a sign-in link where it matters most: two spool objects on one store (two nodes, or
a node and a restart), redeeming the same link at the same moment, on every spool backend (SQLite and,
where a server can run, PostgreSQL)."""

from __future__ import annotations

import asyncio

from backupmx.clock import FakeClock
from backupmx.continuity.grants import AccessStore
from backupmx.continuity.tokens import LinkRefused, Refusal, Signer
from backupmx.spool import Spool
from tests.spool_contract.conftest import Backend

SECRET = bytes(range(32))


async def test_one_link_one_session_across_two_nodes(backend: Backend, spool: Spool, clock: FakeClock) -> None:
    other = await backend.make(clock)
    try:
        a = AccessStore(spool, Signer(SECRET), clock)
        b = AccessStore(other, Signer(SECRET), clock)
        await a.grant("alice@example.test", expires_at=clock.now() + 3600, by="t")
        for _ in range(5):
            link = await a.issue_link("alice@example.test", ttl=600)
            results = await asyncio.gather(
                a.redeem(link.token, session_ttl=60), b.redeem(link.token, session_ttl=60), return_exceptions=True
            )
            sessions = [r for r in results if isinstance(r, tuple)]
            refused = [r for r in results if isinstance(r, LinkRefused)]
            assert len(sessions) == 1 and len(refused) == 1, results
            assert refused[0].reason is Refusal.USED
            _, cookie = sessions[0]
            assert await b.session(cookie) is not None and await a.session(cookie) is not None
        assert await b.revoke("alice@example.test")
        assert await a.session(cookie) is None
    finally:
        await other.close()
