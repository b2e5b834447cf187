"""Contract: claims lease due recipients, oldest first, bounded; leases expire, renew, release;
`record` writes outcomes and owed DSNs in one commit, or nothing (LeaseLost)."""

from __future__ import annotations

import pytest

from backupmx.errors import LeaseLost
from backupmx.model import Bounced, Deferred, Delivered, MessageKind, QueueId, RecipientState
from backupmx.reply import Reply
from backupmx.spool import Claim, NewMessage, RecipientUpdate, Spool
from tests.spool_contract.samples import T0, body, envelope

OK = Reply(250, "2.0.0", "Ok: queued as ABC")
LATER = Reply(451, "4.3.0", "try later")
NO_USER = Reply(550, "5.1.1", "no such user")


async def _put(spool: Spool, *rcpts: str, at: float = T0, sender: str = "alice@sender.example") -> QueueId:
    return await spool.put(envelope(*rcpts, sender=sender), body(b"msg"), now=at)


def _keys(claims: list[Claim]) -> list[tuple[str, int]]:
    return [(r.message_id, r.index) for c in claims for r in c.recipients]


async def test_claim_hands_out_due_recipients_oldest_first_grouped_by_message(spool: Spool) -> None:
    a = await _put(spool, "x@example.com", "y@example.com", at=T0)
    b = await _put(spool, "z@example.com", at=T0 + 1)
    c = await _put(spool, "w@example.com", at=T0 + 2)
    claims = await spool.claim_due(now=T0 + 10, owner="n1", lease_seconds=60, limit=10)
    assert [cl.message.id for cl in claims] == [a, b, c]
    assert [len(cl.recipients) for cl in claims] == [2, 1, 1]
    first = claims[0]
    assert first.owner == "n1" and first.lease_until == T0 + 70
    assert first.message.envelope.recipients[0].address == "x@example.com"
    assert all(r.state is RecipientState.QUEUED for r in first.recipients)


async def test_claim_is_bounded_by_limit_in_recipients(spool: Spool) -> None:
    for i in range(5):
        await _put(spool, f"a{i}@example.com", f"b{i}@example.com", at=T0 + i)
    claims = await spool.claim_due(now=T0 + 10, owner="n1", lease_seconds=60, limit=3)
    assert len(_keys(claims)) == 3
    rest = await spool.claim_due(now=T0 + 10, owner="n1", lease_seconds=60, limit=100)
    assert len(_keys(rest)) == 7
    assert not set(_keys(claims)) & set(_keys(rest))


async def test_claim_skips_recipients_not_yet_due(spool: Spool) -> None:
    await _put(spool, "x@example.com", at=T0 + 100)
    assert await spool.claim_due(now=T0 + 50, owner="n1", lease_seconds=60, limit=10) == []
    assert len(await spool.claim_due(now=T0 + 100, owner="n1", lease_seconds=60, limit=10)) == 1


async def test_a_leased_recipient_is_not_claimed_again_until_the_lease_expires(spool: Spool) -> None:
    qid = await _put(spool, "x@example.com")
    assert len(await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)) == 1
    assert await spool.claim_due(now=T0 + 59, owner="n2", lease_seconds=60, limit=10) == []
    taken = await spool.claim_due(now=T0 + 60, owner="n2", lease_seconds=60, limit=10)
    assert _keys(taken) == [(qid, 0)]
    assert taken[0].owner == "n2"


async def test_renew_extends_the_lease(spool: Spool) -> None:
    await _put(spool, "x@example.com")
    claims = await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.renew(claims, now=T0 + 50, lease_seconds=60)
    assert await spool.claim_due(now=T0 + 100, owner="n2", lease_seconds=60, limit=10) == []
    assert len(await spool.claim_due(now=T0 + 110, owner="n2", lease_seconds=60, limit=10)) == 1


async def test_renew_after_a_takeover_raises_lease_lost(spool: Spool) -> None:
    await _put(spool, "x@example.com")
    mine = await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    theirs = await spool.claim_due(now=T0 + 61, owner="n2", lease_seconds=60, limit=10)
    assert theirs
    with pytest.raises(LeaseLost):
        await spool.renew(mine, now=T0 + 62, lease_seconds=60)
    await spool.renew(theirs, now=T0 + 62, lease_seconds=60)


async def test_release_makes_recipients_claimable_at_once(spool: Spool) -> None:
    qid = await _put(spool, "x@example.com", "y@example.com")
    claims = await spool.claim_due(now=T0, owner="n1", lease_seconds=600, limit=10)
    await spool.release(claims)
    again = await spool.claim_due(now=T0 + 1, owner="n2", lease_seconds=600, limit=10)
    assert _keys(again) == [(qid, 0), (qid, 1)]
    rec = await spool.get(qid)
    assert rec is not None and all(r.attempts == 0 for r in rec.recipients)


async def test_release_with_a_due_time_moves_on_without_an_attempt(spool: Spool) -> None:
    first = await _put(spool, "x@example.com")
    second = await _put(spool, "y@example.com")
    claims = await spool.claim_due(now=T0, owner="n1", lease_seconds=600, limit=1)
    assert _keys(claims) == [(first, 0)]
    await spool.release(claims, due=[T0 + 300])
    assert _keys(await spool.claim_due(now=T0 + 1, owner="n1", lease_seconds=600, limit=1)) == [(second, 0)]
    assert _keys(await spool.claim_due(now=T0 + 300, owner="n2", lease_seconds=600, limit=1)) == [(first, 0)]
    rec = await spool.get(first)
    assert rec is not None and rec.recipients[0].attempts == 0


async def test_record_outcomes(spool: Spool) -> None:
    qid = await _put(spool, "ok@example.com", "later@example.com", "guard@example.com", "old@example.com")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    ids = await spool.record(
        "n1",
        [
            RecipientUpdate(qid, 0, Delivered(OK)),
            RecipientUpdate(qid, 1, Deferred(LATER), next_attempt_at=T0 + 300),
            RecipientUpdate(qid, 2, Deferred(NO_USER, guard_hold=True)),
            RecipientUpdate(qid, 3, None, expire=True),
        ],
        now=T0 + 5,
    )
    assert ids == []
    rec = await spool.get(qid)
    assert rec is not None
    r = rec.recipients
    assert (r[0].state, r[0].attempts, r[0].last_reply, r[0].last_attempt_at) == (
        RecipientState.DELIVERED,
        1,
        str(OK),
        T0 + 5,
    )
    assert (r[1].state, r[1].attempts, r[1].next_attempt_at, r[1].last_reply) == (
        RecipientState.QUEUED,
        1,
        T0 + 300,
        str(LATER),
    )
    assert (r[2].state, r[2].held_reason, r[2].last_reply) == (RecipientState.HELD, "recovery-guard", str(NO_USER))
    assert (r[3].state, r[3].attempts) == (RecipientState.EXPIRED, 0)
    assert rec.pending  # "later" and "guard" still need us
    # The deferred one comes back when due, and not before.
    assert await spool.claim_due(now=T0 + 299, owner="n1", lease_seconds=60, limit=10) == []
    again = await spool.claim_due(now=T0 + 300, owner="n1", lease_seconds=60, limit=10)
    assert _keys(again) == [(qid, 1)]


async def test_record_queues_the_dsn_in_the_same_commit(spool: Spool) -> None:
    qid = await _put(spool, "gone@example.com", sender="alice@sender.example")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    dsn_env = envelope("alice@sender.example", sender="", kind=MessageKind.DSN)
    dsn_body = b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\n..."
    [dsn_id] = await spool.record(
        "n1", [RecipientUpdate(qid, 0, Bounced(NO_USER))], [NewMessage(dsn_env, dsn_body)], now=T0 + 5
    )
    assert dsn_id > qid
    rec = await spool.get(qid)
    assert rec is not None and rec.recipients[0].state is RecipientState.BOUNCED and not rec.pending
    dsn = await spool.get(dsn_id)
    assert dsn is not None
    assert dsn.envelope == dsn_env and dsn.kind is MessageKind.DSN and dsn.received_at == T0 + 5
    assert [(r.address, r.state) for r in dsn.recipients] == [("alice@sender.example", RecipientState.QUEUED)]
    assert await spool.read_body(dsn_id) == dsn_body
    assert await spool.count_pending() == 1
    claims = await spool.claim_due(now=T0 + 5, owner="n1", lease_seconds=60, limit=10)
    assert [c.message.id for c in claims] == [dsn_id]


async def test_record_by_another_owner_raises_lease_lost_and_writes_nothing(spool: Spool) -> None:
    qid = await _put(spool, "x@example.com", "y@example.com")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    dsn = NewMessage(envelope("alice@sender.example", sender="", kind=MessageKind.DSN), b"dsn")
    with pytest.raises(LeaseLost):
        await spool.record("n2", [RecipientUpdate(qid, 0, Bounced(NO_USER))], [dsn], now=T0 + 1)
    # One good update and one lost one: still nothing.
    with pytest.raises(LeaseLost):
        await spool.record(
            "n1",
            [RecipientUpdate(qid, 0, Delivered(OK)), RecipientUpdate(QueueId("00000000000000"), 0, Delivered(OK))],
            [dsn],
            now=T0 + 1,
        )
    rec = await spool.get(qid)
    assert rec is not None and all(r.state is RecipientState.QUEUED and r.attempts == 0 for r in rec.recipients)
    assert await spool.count_pending() == 1  # no DSN was queued
    # The rightful owner still can.
    await spool.record("n1", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 2)


async def test_record_after_a_takeover_raises_lease_lost(spool: Spool) -> None:
    qid = await _put(spool, "x@example.com")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.claim_due(now=T0 + 61, owner="n2", lease_seconds=60, limit=10)
    with pytest.raises(LeaseLost):
        await spool.record("n1", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 62)
    await spool.record("n2", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 62)


async def test_record_twice_raises_lease_lost(spool: Spool) -> None:
    qid = await _put(spool, "x@example.com")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.record("n1", [RecipientUpdate(qid, 0, Deferred(LATER), next_attempt_at=T0 + 10)], now=T0 + 1)
    with pytest.raises(LeaseLost):
        await spool.record("n1", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 2)
    rec = await spool.get(qid)
    assert rec is not None and rec.recipients[0].state is RecipientState.QUEUED


async def test_record_of_an_expired_but_untaken_lease_is_kept(spool: Spool) -> None:
    """The mail went out; nobody else took the lease: recording it avoids a duplicate."""
    qid = await _put(spool, "x@example.com")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.record("n1", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 600)
    rec = await spool.get(qid)
    assert rec is not None and rec.recipients[0].state is RecipientState.DELIVERED


async def test_delay_notified_is_recorded(spool: Spool) -> None:
    qid = await _put(spool, "x@example.com")
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=10)
    await spool.record(
        "n1",
        [RecipientUpdate(qid, 0, Deferred(LATER), next_attempt_at=T0, delay_notified=True)],
        [NewMessage(envelope("alice@sender.example", sender="", kind=MessageKind.DSN), b"d")],
        now=T0 + 1,
    )
    rec = await spool.get(qid)
    assert rec is not None and rec.recipients[0].delay_notified


async def test_claim_by_domain_and_excluding_domains(spool: Spool) -> None:
    a = await _put(spool, "x@a.example", "y@b.example", at=T0)
    b = await _put(spool, "z@b.example", at=T0 + 1)
    c = await _put(spool, "w@C.example", at=T0 + 2)
    only_b = await spool.claim_due(now=T0 + 5, owner="n1", lease_seconds=60, limit=10, domains=["B.example"])
    assert _keys(only_b) == [(a, 1), (b, 0)]
    assert only_b[0].message.recipients[0].address == "x@a.example"  # the whole message comes along
    not_a = await spool.claim_due(now=T0 + 5, owner="n1", lease_seconds=60, limit=10, exclude_domains=["a.example"])
    assert _keys(not_a) == [(c, 0)]
    assert await spool.claim_due(now=T0 + 5, owner="n1", lease_seconds=60, limit=10, domains=[]) == []
    rest = await spool.claim_due(now=T0 + 5, owner="n1", lease_seconds=60, limit=10)
    assert _keys(rest) == [(a, 0)]


async def test_claim_several_domains_merges_in_order(spool: Spool) -> None:
    ids = [await _put(spool, f"u@{d}.example", at=T0 + i) for i, d in enumerate("abcabc")]
    claims = await spool.claim_due(
        now=T0 + 10, owner="n1", lease_seconds=60, limit=3, domains=["c.example", "a.example"]
    )
    assert [c.message.id for c in claims] == [ids[0], ids[2], ids[3]]


async def test_next_due_at(spool: Spool) -> None:
    assert await spool.next_due_at() is None
    qid = await _put(spool, "x@a.example", at=T0)
    await _put(spool, "y@b.example", at=T0 + 100)
    assert await spool.next_due_at() == T0
    assert await spool.next_due_at(domains=["b.example"]) == T0 + 100
    assert await spool.next_due_at(domains=["none.example"]) is None
    await spool.claim_due(now=T0, owner="n1", lease_seconds=30, limit=1)
    # Leased: due again only if the lease runs out.
    assert await spool.next_due_at(domains=["a.example"]) == T0 + 30
    await spool.record("n1", [RecipientUpdate(qid, 0, Deferred(LATER), next_attempt_at=T0 + 500)], now=T0 + 1)
    assert await spool.next_due_at() == T0 + 100
    assert await spool.next_due_at(domains=["a.example"]) == T0 + 500


async def test_claim_with_exclusions_takes_many_small_domains_in_due_order(spool: Spool) -> None:
    """DSNs to many senders' domains beside one excluded (DOWN) domain: all are handed out, oldest first
    (SQLite serves the small domains with one query, not one per domain)."""
    down = [await _put(spool, "a@down.example", at=T0 + i) for i in range(3)]
    small = [await _put(spool, f"bob@s{i}.example", at=T0 + 10 + i) for i in range(40)]
    claims = await spool.claim_due(
        now=T0 + 100, owner="n1", lease_seconds=60, limit=30, exclude_domains=["down.example"]
    )
    assert [c.message.id for c in claims] == small[:30]
    claims = await spool.claim_due(
        now=T0 + 100, owner="n1", lease_seconds=60, limit=30, exclude_domains=["down.example"]
    )
    assert [c.message.id for c in claims] == small[30:]
    assert not set(down) & {c.message.id for c in claims}
