"""Contract: put_record stores a message exactly as another spool held it (what `spool copy` relies on):
ID, arrival, every recipient's state, attempts, due time, last reply, hold; counters follow."""

from __future__ import annotations

import dataclasses

import pytest

from backupmx.clock import FakeClock
from backupmx.errors import SpoolError
from backupmx.model import Deferred, Delivered, MessageRecord, QueueId, RecipientState, new_queue_id
from backupmx.reply import Reply
from backupmx.spool import QueueFilter, RecipientUpdate, Spool
from tests.spool_contract.samples import T0, body, envelope

LATER = Reply(451, "4.3.0", "later")
OK = Reply(250, "2.0.0", "Ok")
GONE = Reply(550, "5.1.1", "no such user")  # held by the recovery guard, for review


def renamed(record: MessageRecord, qid: QueueId) -> MessageRecord:
    return dataclasses.replace(
        record, id=qid, recipients=tuple(dataclasses.replace(r, message_id=qid) for r in record.recipients)
    )


async def history(spool: Spool) -> MessageRecord:
    """A message with one recipient delivered, one deferred twice, one held by the recovery guard."""
    qid = await spool.put(envelope("a@a.example", "b@b.example", "c@a.example"), body(b"hello\r\n"))
    await spool.claim_due(now=T0 + 1, owner="n1", lease_seconds=60, limit=2, domains=["a.example"])
    await spool.record(
        "n1",
        [RecipientUpdate(qid, 0, Delivered(OK)), RecipientUpdate(qid, 2, Deferred(GONE, guard_hold=True))],
        now=T0 + 1,
    )
    for at in (T0 + 2, T0 + 700):
        await spool.claim_due(now=at, owner="n1", lease_seconds=60, limit=10, domains=["b.example"])
        await spool.record("n1", [RecipientUpdate(qid, 1, Deferred(LATER), next_attempt_at=at + 600)], now=at)
    record = await spool.get(qid)
    assert record is not None
    return record


async def test_put_record_keeps_the_history(spool: Spool, clock: FakeClock) -> None:
    original = await history(spool)
    assert [r.state for r in original.recipients] == [
        RecipientState.DELIVERED,
        RecipientState.QUEUED,
        RecipientState.HELD,
    ]
    assert original.recipients[1].attempts == 2
    copy = renamed(original, new_queue_id(T0 + 50))
    before = await spool.stats()
    await spool.put_record(copy, body(b"hello\r\n"))
    assert await spool.get(copy.id) == copy
    assert await spool.read_body(copy.id) == b"hello\r\n"
    after = await spool.stats()
    assert after.messages_pending == before.messages_pending + 1
    for state in ("delivered", "queued", "held"):
        assert after.recipients_by_state[state] == before.recipients_by_state[state] + 1
    # the deferred recipient is due when the original is, not at once
    assert await spool.claim_due(now=T0 + 1299, owner="n2", lease_seconds=60, limit=10) == []
    due = await spool.claim_due(now=T0 + 1300, owner="n2", lease_seconds=60, limit=10)
    assert sorted((c.message.id, [r.index for r in c.recipients]) for c in due) == sorted(
        [(original.id, [1]), (copy.id, [1])]
    )


async def test_a_finished_record_is_not_pending(spool: Spool) -> None:
    qid = await spool.put(envelope("a@a.example"), body(b"x"))
    await spool.claim_due(now=T0, owner="n1", lease_seconds=60, limit=1)
    await spool.record("n1", [RecipientUpdate(qid, 0, Delivered(OK))], now=T0 + 1)
    original = await spool.get(qid)
    assert original is not None
    pending = await spool.count_pending()
    copy = renamed(original, new_queue_id(T0 + 5))
    await spool.put_record(copy, body(b"x"))
    assert await spool.get(copy.id) == copy
    assert await spool.count_pending() == pending
    assert await spool.purge(before=T0 + 2) == 2  # finished when its last recipient was, like the original


async def test_put_record_refuses_a_taken_id_or_a_wrong_size(spool: Spool) -> None:
    original = await history(spool)
    with pytest.raises(SpoolError):
        await spool.put_record(original, body(b"hello\r\n"))
    with pytest.raises(SpoolError):
        await spool.put_record(renamed(original, new_queue_id(T0 + 9)), body(b"hello"))
    assert len(await spool.list_messages(QueueFilter(pending_only=False))) == 1  # nothing half-stored
