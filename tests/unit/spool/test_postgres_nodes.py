"""The PostgreSQL spool as several nodes see it: two PostgresSpool objects (two writer connections, as
two `serve` processes would have) on one database. Claims never overlap, a dead node's lease passes to
another and its late outcome is refused, counters stay exact when nodes finish one message together,
outages and shared state are one for all."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from backupmx.clock import FakeClock
from backupmx.errors import LeaseLost
from backupmx.model import Deferred, Delivered, Envelope, Outcome, QueueId, Recipient
from backupmx.reply import Reply
from backupmx.spool import BodyBuffer, Claim, RecipientUpdate
from backupmx.spool.postgres import PostgresSpool
from tests.support.postgres import postgres_server_fixture, postgres_url_fixture  # noqa: F401 (fixtures)

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.3.0", "later")


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="s@sender.example", recipients=tuple(Recipient(r) for r in rcpts))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def nodes(postgres_url: str, clock: FakeClock) -> AsyncIterator[list[PostgresSpool]]:
    made = [PostgresSpool(postgres_url, node=name, clock=clock) for name in ("n1", "n2", "n3")]
    await asyncio.gather(*(s.open() for s in made))  # three nodes starting at once migrate once
    try:
        yield made
    finally:
        await asyncio.gather(*(s.close() for s in made))


async def put(spool: PostgresSpool, *rcpts: str, at: float = T0) -> QueueId:
    return await spool.put(env(*rcpts), BodyBuffer.from_bytes(b"Subject: x\r\n\r\nbody\r\n"), now=at)


def keys(claims: list[Claim]) -> list[tuple[str, int]]:
    return [(r.message_id, r.index) for c in claims for r in c.recipients]


async def recount(url: str) -> dict[str, object]:
    """The counters the triggers keep, against a full recount."""
    conn = await asyncpg.connect(url, server_settings={"search_path": "backupmx"})
    try:
        kept = {
            "msg": {
                r["kind"]: r["n"]
                for r in await conn.fetch("SELECT kind, sum(n) AS n FROM msg_counts GROUP BY kind HAVING sum(n) <> 0")
            },
            "rcpt": {
                (r["domain"], r["state"]): r["n"]
                for r in await conn.fetch(
                    "SELECT domain, state, sum(n) AS n FROM rcpt_counts GROUP BY 1, 2 HAVING sum(n) <> 0"
                )
            },
            "dom": {
                r["domain"]: r["n"]
                for r in await conn.fetch(
                    "SELECT domain, sum(n) AS n FROM dom_pending GROUP BY domain HAVING sum(n) <> 0"
                )
            },
            "pending_rcpts": await conn.fetchval(
                "SELECT count(*) FROM messages m WHERE pending_rcpts <> (SELECT count(*) FROM recipients r"
                " WHERE r.message_id = m.id AND r.state IN ('queued', 'held'))"
            ),
        }
        real = {
            "msg": {
                r["kind"]: r["n"]
                for r in await conn.fetch(
                    "SELECT kind, count(*) AS n FROM messages m WHERE corrupt_reason IS NULL AND EXISTS (SELECT 1"
                    " FROM recipients r WHERE r.message_id = m.id AND r.state IN ('queued', 'held')) GROUP BY kind"
                )
            },
            "rcpt": {
                (r["domain"], r["state"]): r["n"]
                for r in await conn.fetch("SELECT domain, state, count(*) AS n FROM recipients GROUP BY 1, 2")
            },
            "dom": {
                r["domain"]: r["n"]
                for r in await conn.fetch(
                    "SELECT domain, count(DISTINCT message_id) AS n FROM recipients"
                    " WHERE state IN ('queued', 'held') GROUP BY domain"
                )
            },
            "pending_rcpts": 0,
        }
        assert kept == real
        return real
    finally:
        await conn.close()


async def test_nodes_claiming_at_once_never_get_the_same_recipient(nodes: list[PostgresSpool]) -> None:
    n1 = nodes[0]
    ids = await asyncio.gather(*(put(n1, f"a{i}@a.example", f"b{i}@b.example", at=T0 + i % 7) for i in range(150)))
    every = {(qid, i) for qid in ids for i in (0, 1)}
    got: dict[str, list[tuple[str, int]]] = {s.node: [] for s in nodes}

    async def drain(spool: PostgresSpool, limit: int, exclude: tuple[str, ...]) -> None:
        for _ in range(500):
            claims = await spool.claim_due(
                now=T0 + 10, owner=spool.node, lease_seconds=600, limit=limit, exclude_domains=exclude
            )
            if not claims:
                return
            got[spool.node] += keys(claims)
            await asyncio.sleep(0)

    # Different limits and paths (any domain; per-domain merge) on three connections at once.
    await asyncio.gather(drain(nodes[0], 7, ()), drain(nodes[1], 5, ("c.example",)), drain(nodes[2], 11, ()))
    claimed = [k for ks in got.values() for k in ks]
    assert len(claimed) == len(set(claimed)), "a recipient was claimed by two nodes"
    assert set(claimed) == every
    assert all(got.values()), {k: len(v) for k, v in got.items()}  # every node got work


async def test_a_dead_nodes_lease_passes_on_and_its_late_outcome_is_refused(nodes: list[PostgresSpool]) -> None:
    n1, n2, _ = nodes
    qid = await put(n1, "x@a.example", "y@a.example")
    mine = await n1.claim_due(now=T0, owner="n1", lease_seconds=30, limit=10)
    assert keys(mine) == [(qid, 0), (qid, 1)]
    assert await n2.claim_due(now=T0 + 29, owner="n2", lease_seconds=30, limit=10) == []
    theirs = await n2.claim_due(now=T0 + 31, owner="n2", lease_seconds=30, limit=10)  # n1 stopped renewing
    assert keys(theirs) == keys(mine)
    with pytest.raises(LeaseLost):
        await n1.renew(mine, now=T0 + 32, lease_seconds=30)
    with pytest.raises(LeaseLost):  # n1 was only slow: its 250 arrives late and is not recorded
        await n1.record("n1", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 33)
    await n2.record("n2", [RecipientUpdate(qid, 0, Delivered(OK)), RecipientUpdate(qid, 1, Delivered(OK))], now=T0 + 34)
    rec = await n1.get(qid)
    assert rec is not None and [r.attempts for r in rec.recipients] == [1, 1]
    assert await n1.count_pending() == 0


async def test_counters_stay_exact_when_nodes_finish_one_message_together(
    nodes: list[PostgresSpool], postgres_url: str
) -> None:
    n1, n2, n3 = nodes
    ids = [await put(n1, *(f"u{j}@a.example" for j in range(3)), "v@b.example", at=T0 + i) for i in range(40)]
    # Each message's recipients end up spread over the three nodes.
    claims: dict[str, list[Claim]] = {"n1": [], "n2": [], "n3": []}
    for _ in range(200):
        progress = False
        for spool in nodes:
            got = await spool.claim_due(now=T0 + 100, owner=spool.node, lease_seconds=600, limit=1)
            claims[spool.node] += got
            progress = progress or bool(got)
        if not progress:
            break
    assert sum(len(keys(c)) for c in claims.values()) == 40 * 4

    rng = random.Random(7)

    async def finish(spool: PostgresSpool) -> None:
        for c in claims[spool.node]:
            updates = [
                RecipientUpdate(
                    r.message_id,
                    r.index,
                    Delivered(OK) if rng.random() < 0.8 else Deferred(LATER),
                    next_attempt_at=T0 + 500,
                )
                for r in c.recipients
            ]
            await spool.record(spool.node, updates, now=T0 + 101)

    await asyncio.gather(finish(n1), finish(n2), finish(n3))
    await recount(postgres_url)
    st = await n2.stats()
    rest = {qid for qid in ids if (rec := await n3.get(qid)) is not None and rec.pending}
    assert st.messages_pending == len(rest) == await n1.count_pending()
    doms = {d.domain: d for d in st.domains}
    assert sum(doms[d].by_state.get("delivered", 0) for d in doms) + st.recipients_by_state.get("queued", 0) == 160


async def test_random_operations_from_three_nodes_keep_counters_exact(
    nodes: list[PostgresSpool], postgres_url: str, clock: FakeClock
) -> None:
    rng = random.Random(3)
    ids: list[QueueId] = []
    held: dict[str, list[Claim]] = {s.node: [] for s in nodes}

    async def worker(spool: PostgresSpool) -> None:
        for _ in range(60):
            action = rng.random()
            if action < 0.35 or not ids:
                ids.append(
                    await put(
                        spool, *(f"r{k}@{rng.choice('abc')}.example" for k in range(rng.randint(1, 4))), at=clock.now()
                    )
                )
            elif action < 0.6:
                held[spool.node] += await spool.claim_due(
                    now=clock.now(), owner=spool.node, lease_seconds=60, limit=rng.randint(1, 5)
                )
            elif action < 0.8 and held[spool.node]:
                c = held[spool.node].pop(0)
                outcomes: list[Outcome] = [Delivered(OK), Deferred(LATER)]
                updates = [
                    RecipientUpdate(r.message_id, r.index, rng.choice(outcomes), next_attempt_at=clock.now())
                    for r in c.recipients
                ]
                try:
                    await spool.record(spool.node, updates, now=clock.now())
                except LeaseLost:
                    pass  # an operator deleted it meanwhile
            elif action < 0.87:
                await spool.hold(rng.choice(ids))
            elif action < 0.94:
                await spool.release_held(None, domain=f"{rng.choice('abc')}.example")
            else:
                await spool.delete(rng.choice(ids))
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(s) for s in nodes))
    await recount(postgres_url)


async def test_outages_are_one_for_all_nodes(nodes: list[PostgresSpool]) -> None:
    n1, n2, n3 = nodes
    await n1.outage_started("a.example", T0)
    await n2.outage_started("a.example", T0 + 5)  # the second node's probe agrees: still one outage
    [o] = await n3.outages("a.example")
    assert (o.started_at, o.ended_at) == (T0, None)
    await asyncio.gather(n2.outage_ended("a.example", T0 + 60), n3.outage_ended("a.example", T0 + 61))
    [o] = await n1.outages("a.example")
    assert o.started_at == T0 and o.ended_at in (T0 + 60, T0 + 61)
    await asyncio.gather(*(s.outage_started("a.example", T0 + 100 + i) for i, s in enumerate(nodes)))
    periods = await n1.outages("a.example")
    assert len(periods) == 2 and periods[1].ended_at is None


async def test_shared_state_is_one_for_all_nodes(nodes: list[PostgresSpool], clock: FakeClock) -> None:
    n1, n2, n3 = nodes
    await n1.kv_put("learned", "example.com/alice", b"1")
    await n2.kv_put("learned", "example.com/bob", b"2", expires_at=T0 + 10)
    await n3.kv_put("drills", "2026-01-01", b"{}")
    assert await n3.kv_get("learned", "example.com/alice") == b"1"
    page = await n1.kv_list("learned", prefix="example.com/")
    assert [(i.key, i.value, i.updated_by) for i in page] == [
        ("example.com/alice", b"1", "n1"),
        ("example.com/bob", b"2", "n2"),
    ]
    assert [i.key for i in await n1.kv_list("learned", after="example.com/alice")] == ["example.com/bob"]
    clock.advance(11)
    assert await n1.kv_get("learned", "example.com/bob") is None  # expired
    assert [i.key for i in await n2.kv_list("learned")] == ["example.com/alice"]
    await n1.purge(before=T0)  # removes expired state too
    assert await n2.kv_delete("learned", "example.com/alice")
    assert not await n2.kv_delete("learned", "example.com/alice")
    assert await n3.kv_list("learned") == []


async def test_a_node_is_registered_by_its_claims_not_by_opening(nodes: list[PostgresSpool]) -> None:
    n1, n2, _ = nodes
    assert await n1.nodes() == []  # a CLI command opening the spool is no node
    await n2.claim_due(now=T0, owner="n2", lease_seconds=60, limit=1)
    [info] = await n1.nodes()
    assert (info.name, info.seen_at) == ("n2", T0)


async def test_each_node_group_commits_its_own_puts(nodes: list[PostgresSpool]) -> None:
    before = [s.statistics() for s in nodes]
    await asyncio.gather(*(put(s, f"u{i}@a.example") for s in nodes for i in range(50)))
    for s, b in zip(nodes, before, strict=True):
        after = s.statistics()
        assert after.puts - b.puts == 50
        assert after.commits - b.commits < 50 and after.largest_group > 1
    assert await nodes[0].count_pending() == 150
