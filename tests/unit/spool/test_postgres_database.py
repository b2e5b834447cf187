"""The PostgreSQL spool and its database: a versioned schema that backupmx migrates itself (once, even
when nodes start together; never a newer one), and what happens while the server is stopped: every
write and read fails fast with SpoolUnavailable (the SMTP server answers 451), nothing committed is lost,
and the spool works again as soon as the server is back, without a restart."""

from __future__ import annotations

import asyncio
import time

import asyncpg  # type: ignore[import-untyped]
import pytest

from backupmx.clock import FakeClock
from backupmx.errors import SpoolUnavailable
from backupmx.model import Delivered, Envelope, Recipient
from backupmx.reply import Reply
from backupmx.spool import BodyBuffer, RecipientUpdate, pg_schema
from backupmx.spool.pg_schema import SCHEMA_VERSION
from backupmx.spool.postgres import UPLOAD_STALE_SECONDS, PostgresSpool
from tests.support.postgres import (  # noqa: F401 (fixtures)
    PostgresServer,
    postgres_server_fixture,
    postgres_url_fixture,
)

T0 = 1_700_000_000.0


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="s@sender.example", recipients=tuple(Recipient(r) for r in rcpts))


async def raw(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, server_settings={"search_path": "backupmx"})


async def test_the_schema_is_versioned_and_migrated_once(postgres_url: str) -> None:
    spools = [PostgresSpool(postgres_url, node=f"n{i}", clock=FakeClock(T0)) for i in range(4)]
    await asyncio.gather(*(s.open() for s in spools))  # four nodes starting together
    await asyncio.gather(*(s.close() for s in spools))
    conn = await raw(postgres_url)
    try:
        assert await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'") == str(SCHEMA_VERSION)
    finally:
        await conn.close()
    assert await PostgresSpool(postgres_url).migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)


async def test_a_fresh_database_is_migrated_by_the_command(postgres_url: str) -> None:
    assert await PostgresSpool(postgres_url).migrate() == (0, SCHEMA_VERSION)


async def test_a_version_1_spool_is_migrated_with_its_mail(postgres_url: str) -> None:
    """v1 -> v2 (messages.finished_at, backfilled): a queue written under v1 opens under v2 intact."""
    clock = FakeClock(T0)
    spool = PostgresSpool(postgres_url, node="n1", clock=clock)
    await spool.open()
    done = await spool.put(env("a@a.example"), BodyBuffer.from_bytes(b"done"))
    waiting = await spool.put(env("b@a.example"), BodyBuffer.from_bytes(b"waiting"))
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=1)
    await spool.record("n1", [RecipientUpdate(done, 0, Delivered(Reply(250, "2.0.0", "ok")))], now=T0 + 5)
    await spool.close()
    conn = await raw(postgres_url)
    try:  # back to what version 1 left: no finished_at, v1's trigger and index
        await conn.execute("ALTER TABLE messages DROP COLUMN finished_at")
        await conn.execute(pg_schema._MIGRATIONS[1])
        await conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    finally:
        await conn.close()
    assert await PostgresSpool(postgres_url).migrate() == (1, SCHEMA_VERSION)
    spool = PostgresSpool(postgres_url, node="n1", clock=clock)
    await spool.open()
    try:
        assert await spool.purge(before=T0 + 5) == 0  # finished at T0 + 5: not before it
        assert await spool.purge(before=T0 + 6) == 1
        assert await spool.get(done) is None
        assert await spool.read_body(waiting) == b"waiting"
        assert await spool.count_pending() == 1
    finally:
        await spool.close()


async def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    await PostgresSpool(postgres_url).migrate()
    conn = await raw(postgres_url)
    try:
        await conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    finally:
        await conn.close()
    spool = PostgresSpool(postgres_url)
    with pytest.raises(SpoolUnavailable, match="newer"):
        await spool.open()


async def test_an_unreachable_database_at_open_is_spool_unavailable(postgres_server: PostgresServer) -> None:
    spool = PostgresSpool(f"postgresql://postgres@127.0.0.1:{postgres_server.port + 1}/none", connect_timeout=2)
    with pytest.raises(SpoolUnavailable):
        await spool.open()


async def test_while_the_database_is_stopped_writes_fail_fast_and_nothing_is_lost(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    spool = PostgresSpool(postgres_url, node="n1", connect_timeout=3)
    await spool.open()
    try:
        before = [await spool.put(env(f"u{i}@a.example"), BodyBuffer.from_bytes(b"x%d" % i)) for i in range(20)]
        postgres_server.stop("fast")
        try:
            for attempt in range(3):
                t = time.monotonic()
                with pytest.raises(SpoolUnavailable):
                    await spool.put(env("late@a.example"), BodyBuffer.from_bytes(b"late"))
                assert time.monotonic() - t < 5, f"attempt {attempt}: a 451 must not wait long"
            with pytest.raises(SpoolUnavailable):
                await spool.count_pending()
            with pytest.raises(SpoolUnavailable):
                await spool.claim_due(now=time.time(), owner="n1", lease_seconds=60, limit=10)
        finally:
            postgres_server.start()
        # Back without a restart of the node (the first write after a failed connect may still see the
        # one-second back-off: bounded retry).
        deadline = time.monotonic() + 15
        while True:
            try:
                after = await spool.put(env("back@a.example"), BodyBuffer.from_bytes(b"back"))
                break
            except SpoolUnavailable:
                assert time.monotonic() < deadline, "the spool did not come back"
                await asyncio.sleep(0.2)
        assert await spool.count_pending() == 21
        for i, qid in enumerate(before):
            assert await spool.read_body(qid) == b"x%d" % i
        assert await spool.read_body(after) == b"back"
    finally:
        await spool.close()


async def test_connections_killed_while_idle_are_replaced_without_an_error(postgres_url: str) -> None:
    """A failover, a server restart or a firewall ends idle sessions: the next put, large put and read
    run on new connections, and the caller never sees it."""
    spool = PostgresSpool(postgres_url, node="idle")
    await spool.open()
    try:
        await spool.put(env("a@a.example"), BodyBuffer.from_bytes(b"one"))
        await spool.read_body(await spool.put(env("a@a.example"), BodyBuffer.from_bytes(b"two")))
        conn = await raw(postgres_url)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'backupmx idle'"
            )
        finally:
            await conn.close()
        assert killed >= 2  # the writer and a pooled reader
        await asyncio.sleep(0.2)
        await spool.put(env("b@a.example"), BodyBuffer.from_bytes(b"three"))
        await spool.put(env("c@a.example"), BodyBuffer.from_bytes(b"f" * 2_000_000))
        assert await spool.count_pending() == 4
    finally:
        await spool.close()


async def test_the_database_crashing_mid_group_fails_the_group_and_keeps_what_committed(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    spool = PostgresSpool(postgres_url, node="n1", connect_timeout=3)
    await spool.open()
    try:
        kept = await spool.put(env("a@a.example"), BodyBuffer.from_bytes(b"kept"))
        puts = [
            asyncio.ensure_future(spool.put(env(f"u{i}@a.example"), BodyBuffer.from_bytes(b"y" * 5000)))
            for i in range(200)
        ]
        await asyncio.sleep(0)
        postgres_server.stop("immediate")  # like a crash of the database server
        results = await asyncio.gather(*puts, return_exceptions=True)
        postgres_server.start()
        acked = [r for r in results if isinstance(r, str)]
        assert all(isinstance(r, str | SpoolUnavailable) for r in results), results
        for _ in range(50):
            try:
                await spool.count_pending()
                break
            except SpoolUnavailable:
                await asyncio.sleep(0.2)
        for qid in [kept, *acked]:  # every acknowledged put survived the crash
            assert await spool.get(qid) is not None
    finally:
        await spool.close()


async def test_a_group_where_many_operations_fail_commits_all_the_others(postgres_url: str) -> None:
    spool = PostgresSpool(postgres_url, node="n1")
    await spool.open()
    try:
        bodies = [BodyBuffer.from_bytes(b"body %d" % i) for i in range(256)]
        for b in bodies[1::2]:
            b.close()  # reading it fails inside the group's transaction, after the others wrote
        before = spool.statistics()
        results = await asyncio.gather(
            *(spool.put(env(f"u{i}@a.example"), b) for i, b in enumerate(bodies)), return_exceptions=True
        )
        good = list(results[::2])
        assert all(isinstance(r, str) for r in good) and all(isinstance(r, Exception) for r in results[1::2])
        assert spool.statistics().puts - before.puts == 128
        for i, qid in enumerate(good):
            assert await spool.read_body(qid) == b"body %d" % (2 * i)
        assert await spool.count_pending() == 128
    finally:
        await spool.close()


async def test_an_upload_left_by_a_dead_node_is_removed(postgres_url: str) -> None:
    clock = FakeClock(T0)
    spool = PostgresSpool(postgres_url, node="n1", clock=clock)
    await spool.open()
    try:
        qid = await spool.put(env("a@a.example"), BodyBuffer.from_bytes(b"z" * 3_000_000))
        conn = await raw(postgres_url)
        try:
            # A node that died between its upload and its commit: chunks and an upload row, no message.
            await conn.execute("INSERT INTO body_uploads VALUES ('ORPHAN00000000', 'dead', $1)", T0)
            await conn.execute("INSERT INTO body_chunks VALUES ('ORPHAN00000000', 0, 'abc')")
            await spool.purge(before=T0)
            assert await conn.fetchval("SELECT count(*) FROM body_chunks WHERE message_id = 'ORPHAN00000000'") == 1
            clock.advance(UPLOAD_STALE_SECONDS + 1)
            await spool.purge(before=T0)
            assert await conn.fetchval("SELECT count(*) FROM body_chunks WHERE message_id = 'ORPHAN00000000'") == 0
            assert await conn.fetchval("SELECT count(*) FROM body_uploads") == 0
        finally:
            await conn.close()
        assert await spool.read_body(qid) == b"z" * 3_000_000
    finally:
        await spool.close()
