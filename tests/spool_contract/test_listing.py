"""Contract: listing pages by ID with filters, counts, stats, outages."""

from __future__ import annotations

from backupmx.model import Bounced, Delivered, MessageKind, QueueId, RecipientState
from backupmx.reply import Reply
from backupmx.spool import NewMessage, QueueFilter, RecipientUpdate, Spool
from tests.spool_contract.samples import T0, body, envelope

OK = Reply(250, "2.0.0", "Ok")


async def test_paging_returns_every_message_once_in_arrival_order(spool: Spool) -> None:
    ids = [await spool.put(envelope(f"u{i}@example.com"), body(b"x"), now=T0 + i) for i in range(25)]
    seen: list[QueueId] = []
    after: QueueId | None = None
    while True:
        page = await spool.list_messages(limit=10, after=after)
        if not page:
            break
        assert len(page) <= 10
        seen += [m.id for m in page]
        after = page[-1].id
    assert seen == ids
    first = (await spool.list_messages(limit=1))[0]
    assert first.id == ids[0] and first.recipients[0].address == "u0@example.com"


async def test_filters(spool: Spool) -> None:
    a = await spool.put(envelope("Bob@A.example", "carol@b.example", sender="alice@sender.example"), body(b"x"))
    b = await spool.put(envelope("dave@b.example", sender="eve@other.example"), body(b"x"))
    c = await spool.put(envelope("frank@a.example", sender="", kind=MessageKind.DSN), body(b"x"))

    async def ids(flt: QueueFilter) -> list[QueueId]:
        return [m.id for m in await spool.list_messages(flt)]

    assert await ids(QueueFilter()) == [a, b, c]
    assert await ids(QueueFilter(domain="b.EXAMPLE")) == [a, b]
    assert await ids(QueueFilter(recipient="BOB@")) == [a]
    assert await ids(QueueFilter(recipient="@a.example")) == [a, c]
    assert await ids(QueueFilter(sender="Sender.Example")) == [a]
    assert await ids(QueueFilter(kind="dsn")) == [c]
    assert await ids(QueueFilter(kind="user", domain="a.example")) == [a]

    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.record("n1", [RecipientUpdate(b, 0, Delivered(OK))], now=T0 + 1)
    await spool.hold(c)
    assert await ids(QueueFilter()) == [a, c]  # pending only, by default
    assert await ids(QueueFilter(pending_only=False)) == [a, b, c]
    assert await ids(QueueFilter(pending_only=False, state=RecipientState.DELIVERED)) == [b]
    assert await ids(QueueFilter(state=RecipientState.HELD)) == [c]
    assert await ids(QueueFilter(state=RecipientState.QUEUED, domain="a.example")) == [a]


async def test_filter_by_held_reason_and_same_recipient(spool: Spool) -> None:
    a = await spool.put(envelope("x@a.example", "y@b.example"), body(b"x"))
    b = await spool.put(envelope("z@a.example"), body(b"x"))
    await spool.hold(a, domain="b.example", reason="recovery-guard")
    await spool.hold(b, reason="operator")

    async def ids(flt: QueueFilter) -> list[QueueId]:
        return [m.id for m in await spool.list_messages(flt)]

    assert await ids(QueueFilter(held_reason="recovery-guard")) == [a]
    assert await ids(QueueFilter(held_reason="operator")) == [b]
    assert await ids(QueueFilter(held_reason="recovery-guard", domain="a.example")) == []  # not the same rcpt
    assert await ids(QueueFilter(held_reason="recovery-guard", domain="b.example")) == [a]
    assert await ids(QueueFilter(state=RecipientState.HELD, domain="a.example")) == [b]
    await spool.release_held(a)
    assert await ids(QueueFilter(held_reason="recovery-guard")) == []


async def test_filtered_paging(spool: Spool) -> None:
    ids = [await spool.put(envelope(f"u{i}@{'a' if i % 3 else 'b'}.example"), body(b"x")) for i in range(30)]
    want = [qid for i, qid in enumerate(ids) if i % 3 == 0]
    got: list[QueueId] = []
    after: QueueId | None = None
    while page := await spool.list_messages(QueueFilter(domain="b.example"), limit=4, after=after):
        got += [m.id for m in page]
        after = page[-1].id
    assert got == want


async def test_count_pending_by_kind(spool: Spool) -> None:
    assert await spool.count_pending() == 0
    u = await spool.put(envelope("x@a.example", "y@a.example"), body(b"x"))
    await spool.put(envelope("x@a.example", sender="", kind=MessageKind.DSN), body(b"x"))
    await spool.put(envelope("canary@a.example", kind=MessageKind.CANARY), body(b"x"))
    assert await spool.count_pending() == 2
    assert await spool.count_pending(include_kinds=("user",)) == 1
    assert await spool.count_pending(include_kinds=("user", "dsn", "canary")) == 3
    assert await spool.count_pending(include_kinds=()) == 0
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=1)
    await spool.record("n1", [RecipientUpdate(u, 0, Delivered(OK))], now=T0)
    assert await spool.count_pending(include_kinds=("user",)) == 1  # one recipient to go
    await spool.claim_due(now=T0 + 61, owner="n1", lease_seconds=60, limit=1)
    await spool.record(
        "n1",
        [RecipientUpdate(u, 1, Bounced(Reply(550, "5.1.1", "no")))],
        [NewMessage(envelope("alice@sender.example", sender="", kind=MessageKind.DSN), b"d")],
        now=T0 + 61,
    )
    assert await spool.count_pending(include_kinds=("user",)) == 0
    assert await spool.count_pending() == 2  # two DSNs


async def test_stats(spool: Spool) -> None:
    empty = await spool.stats()
    assert (
        empty.messages_pending,
        empty.recipients_by_state,
        empty.domains,
        empty.oldest_pending_at,
        empty.corrupt,
    ) == (0, {}, (), None, 0)
    a = await spool.put(envelope("x@a.example", "y@a.example", "z@b.example"), body(b"x" * 1000), now=T0)
    b = await spool.put(envelope("w@b.example"), body(b"x"), now=T0 + 10)
    await spool.claim_due(now=T0 + 20, owner="n1", lease_seconds=60, limit=10)
    await spool.record("n1", [RecipientUpdate(a, 0, Delivered(OK)), RecipientUpdate(a, 1, Delivered(OK))], now=T0 + 21)
    await spool.hold(b)
    st = await spool.stats()
    assert st.messages_pending == 2
    assert st.recipients_by_state == {"delivered": 2, "queued": 1, "held": 1}
    assert st.oldest_pending_at == T0
    assert st.corrupt == 0
    assert st.bytes_on_disk > 0
    doms = {d.domain: d for d in st.domains}
    assert doms["a.example"].by_state == {"delivered": 2}
    assert doms["a.example"].messages_pending == 0
    assert doms["a.example"].oldest_pending_at is None
    assert doms["b.example"].by_state == {"queued": 1, "held": 1}
    assert doms["b.example"].messages_pending == 2
    assert doms["b.example"].oldest_pending_at == T0
    await spool.delete(a)
    st = await spool.stats()
    assert st.messages_pending == 1 and st.oldest_pending_at == T0 + 10
    assert {d.domain: d.messages_pending for d in st.domains}.get("b.example") == 1
    assert st.recipients_by_state == {"held": 1}


async def test_outages(spool: Spool) -> None:
    assert await spool.outages() == []
    await spool.outage_started("A.example", T0)
    await spool.outage_started("a.example", T0 + 5)  # already open: no-op
    await spool.outage_started("b.example", T0 + 10)
    [oa, ob] = await spool.outages()
    assert (oa.domain, oa.started_at, oa.ended_at) == ("a.example", T0, None)
    assert (ob.domain, ob.started_at, ob.ended_at) == ("b.example", T0 + 10, None)
    await spool.outage_ended("a.example", T0 + 100)
    await spool.outage_ended("a.example", T0 + 200)  # none open: no-op
    [oa] = await spool.outages("a.example")
    assert (oa.started_at, oa.ended_at) == (T0, T0 + 100)
    await spool.outage_started("a.example", T0 + 300)
    assert [(o.started_at, o.ended_at) for o in await spool.outages("a.example")] == [(T0, T0 + 100), (T0 + 300, None)]
    # `since` drops the periods that ended before it; open ones always stay.
    assert [(o.domain, o.started_at) for o in await spool.outages(since=T0 + 150)] == [
        ("b.example", T0 + 10),
        ("a.example", T0 + 300),
    ]
