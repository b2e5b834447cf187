"""Contract: operator actions (hold, release, delete, flush, purge), also against leased recipients."""

from __future__ import annotations

import pytest

from backupmx.errors import LeaseLost, NotFound
from backupmx.model import Bounced, Deferred, Delivered, QueueId, RecipientState
from backupmx.reply import Reply
from backupmx.spool import RecipientUpdate, Spool
from tests.spool_contract.samples import T0, body, envelope

OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.3.0", "try later")


async def _put(spool: Spool, *rcpts: str, at: float = T0) -> QueueId:
    return await spool.put(envelope(*rcpts), body(b"msg"), now=at)


async def _states(spool: Spool, qid: QueueId) -> list[RecipientState]:
    rec = await spool.get(qid)
    assert rec is not None
    return [r.state for r in rec.recipients]


async def test_hold_one_message_then_release(spool: Spool) -> None:
    a = await _put(spool, "x@a.example", "y@b.example")
    b = await _put(spool, "z@a.example")
    assert await spool.hold(a, now=T0 + 1) == 2
    assert await _states(spool, a) == [RecipientState.HELD, RecipientState.HELD]
    rec = await spool.get(a)
    assert rec is not None and rec.recipients[0].held_reason == "operator" and rec.pending
    claims = await spool.claim_due(now=T0 + 2, owner="n1", lease_seconds=60, limit=10)
    assert [c.message.id for c in claims] == [b]
    assert await spool.count_pending() == 2  # held mail is still ours
    assert await spool.release_held(a, now=T0 + 3) == 2
    rec = await spool.get(a)
    assert rec is not None
    assert all(
        r.state is RecipientState.QUEUED and r.next_attempt_at == T0 + 3 and r.held_reason is None
        for r in rec.recipients
    )
    assert [c.message.id for c in await spool.claim_due(now=T0 + 3, owner="n1", lease_seconds=60, limit=10)] == [a]


async def test_hold_all_and_by_domain(spool: Spool) -> None:
    a = await _put(spool, "x@a.example", "y@b.example")
    b = await _put(spool, "z@a.example")
    assert await spool.hold(None, domain="A.example", reason="drill") == 2
    assert await _states(spool, a) == [RecipientState.HELD, RecipientState.QUEUED]
    assert await spool.hold(None) == 1
    assert await spool.hold(None) == 0
    assert await spool.release_held(None, reason="drill") == 2
    assert await _states(spool, b) == [RecipientState.QUEUED]
    assert await _states(spool, a) == [RecipientState.QUEUED, RecipientState.HELD]
    assert await spool.release_held(None, domain="b.example") == 1


async def test_release_held_by_reason_only_touches_that_reason(spool: Spool) -> None:
    a = await _put(spool, "x@a.example")
    b = await _put(spool, "y@a.example")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.record(
        "n1", [RecipientUpdate(a, 0, Deferred(Reply(550, "5.1.1", "who?"), guard_hold=True))], now=T0 + 1
    )
    await spool.release(await spool.claim_due(now=T0 + 61, owner="n1", lease_seconds=60, limit=10))
    await spool.hold(b)
    assert await spool.release_held(None, reason="recovery-guard", now=T0 + 2) == 1
    assert await _states(spool, a) == [RecipientState.QUEUED]
    assert await _states(spool, b) == [RecipientState.HELD]


async def test_hold_while_leased_survives_a_deferral(spool: Spool) -> None:
    qid = await _put(spool, "x@a.example")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    assert await spool.hold(qid, now=T0 + 1) == 1
    await spool.renew(
        await spool.claim_due(now=T0, owner="n2", lease_seconds=1, limit=1), now=T0, lease_seconds=1
    )  # nothing to claim: held
    await spool.record("n1", [RecipientUpdate(qid, 0, Deferred(LATER), next_attempt_at=T0 + 10)], now=T0 + 2)
    rec = await spool.get(qid)
    assert rec is not None
    r = rec.recipients[0]
    assert (r.state, r.held_reason, r.attempts, r.last_reply) == (RecipientState.HELD, "operator", 1, str(LATER))
    assert await spool.claim_due(now=T0 + 100, owner="n1", lease_seconds=60, limit=10) == []


async def test_hold_while_leased_still_records_delivered(spool: Spool) -> None:
    qid = await _put(spool, "x@a.example", "y@a.example")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.hold(qid, now=T0 + 1)
    await spool.record(
        "n1",
        [RecipientUpdate(qid, 0, Delivered(OK)), RecipientUpdate(qid, 1, Bounced(Reply(550, "5.1.1", "no")))],
        now=T0 + 2,
    )
    assert await _states(spool, qid) == [RecipientState.DELIVERED, RecipientState.BOUNCED]
    assert await spool.count_pending() == 0


async def test_release_while_leased_then_record(spool: Spool) -> None:
    qid = await _put(spool, "x@a.example")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.hold(qid)
    await spool.release_held(qid, now=T0 + 1)
    # The lease still stands: nobody else gets it before it runs out.
    assert await spool.claim_due(now=T0 + 2, owner="n2", lease_seconds=60, limit=10) == []
    await spool.record("n1", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 3)
    assert await _states(spool, qid) == [RecipientState.DELIVERED]


async def test_delete(spool: Spool) -> None:
    a = await _put(spool, "x@a.example")
    b = await _put(spool, "y@a.example")
    assert await spool.delete(a) is True
    assert await spool.get(a) is None
    with pytest.raises(NotFound):
        await spool.read_body(a)
    assert await spool.delete(a) is False
    assert await spool.count_pending() == 1
    assert [m.id for m in await spool.list_messages()] == [b]


async def test_delete_while_leased_makes_record_raise_lease_lost(spool: Spool) -> None:
    qid = await _put(spool, "x@a.example")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    assert await spool.delete(qid)
    with pytest.raises(LeaseLost):
        await spool.record("n1", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 1)
    assert await spool.get(qid) is None


async def test_flush_makes_queued_recipients_due_now(spool: Spool) -> None:
    a = await _put(spool, "x@a.example")
    b = await _put(spool, "y@b.example")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.record(
        "n1",
        [
            RecipientUpdate(a, 0, Deferred(LATER), next_attempt_at=T0 + 3600),
            RecipientUpdate(b, 0, Deferred(LATER), next_attempt_at=T0 + 3600),
        ],
        now=T0 + 1,
    )
    assert await spool.claim_due(now=T0 + 10, owner="n1", lease_seconds=60, limit=10) == []
    assert await spool.flush("b.example", now=T0 + 10) == 1
    claims = await spool.claim_due(now=T0 + 10, owner="n1", lease_seconds=60, limit=10)
    assert [c.message.id for c in claims] == [b]
    assert await spool.flush(now=T0 + 11) == 1
    assert [c.message.id for c in await spool.claim_due(now=T0 + 11, owner="n1", lease_seconds=60, limit=10)] == [a]


async def test_purge_deletes_only_finished_messages_older_than_the_cutoff(spool: Spool) -> None:
    done = await _put(spool, "x@a.example")
    fresh = await _put(spool, "y@a.example")
    waiting = await _put(spool, "z@a.example")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=2)
    await spool.record("n1", [RecipientUpdate(done, 0, Delivered(OK))], now=T0 + 1)
    await spool.record("n1", [RecipientUpdate(fresh, 0, Delivered(OK))], now=T0 + 100)
    assert await spool.purge(before=T0 + 50) == 1
    assert await spool.get(done) is None
    assert await spool.get(fresh) is not None
    assert await spool.get(waiting) is not None
    assert await spool.purge(before=T0 + 50) == 0


async def test_claim_held_leases_only_that_reason_and_record_expires_it(spool: Spool) -> None:
    qid = await _put(spool, "x@a.example", "y@a.example")
    await spool.hold(qid, reason="poison", now=T0 + 1)
    assert await spool.claim_held(qid, reason="recovery-guard", owner="n1", lease_seconds=60, now=T0 + 2) is None
    claim = await spool.claim_held(qid, reason="poison", owner="n1", lease_seconds=60, now=T0 + 2)
    assert claim is not None and [r.index for r in claim.recipients] == [0, 1]
    assert await spool.claim_held(qid, reason="poison", owner="n2", lease_seconds=60, now=T0 + 3) is None  # leased
    assert await spool.claim_due(now=T0 + 3, owner="n2", lease_seconds=60, limit=10) == []  # still held
    stats = {d.domain: d for d in (await spool.stats()).domains}["a.example"]
    assert stats.held_by_reason == {"poison": 2} and stats.held_since == {"poison": T0 + 1}
    await spool.record("n1", [RecipientUpdate(qid, 0, None, expire=True)], now=T0 + 4)
    assert await _states(spool, qid) == [RecipientState.EXPIRED, RecipientState.HELD]
