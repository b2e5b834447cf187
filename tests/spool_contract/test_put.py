"""Contract: put is the commit point; what was put comes back byte-exact; concurrent puts share commits."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from backupmx.clock import FakeClock
from backupmx.errors import NotFound, SpoolError
from backupmx.model import MessageKind, QueueId, Recipient, RecipientState, new_queue_id
from backupmx.spool import Spool
from tests.spool_contract.conftest import Backend
from tests.spool_contract.samples import T0, body, envelope


async def test_put_then_get_returns_envelope_and_queued_recipients(spool: Spool) -> None:
    env = envelope(
        "bob@Example.COM",
        Recipient("carol@example.com", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;carol@example.com"),
        "dave@other.example",
        body_type="8BITMIME",
        smtputf8=True,
        ret="HDRS",
        envid="env+2Bid",
        client_ip="192.0.2.7",
        client_helo="mta.sender.example",
    )
    qid = await spool.put(env, body(b"Subject: hi\r\n\r\nhello\r\n"))
    rec = await spool.get(qid)
    assert rec is not None
    assert rec.id == qid
    assert rec.envelope == env
    assert rec.size == len(b"Subject: hi\r\n\r\nhello\r\n")
    assert rec.received_at == T0
    assert rec.kind is MessageKind.USER
    assert rec.pending
    assert [(r.index, r.address, r.domain, r.state) for r in rec.recipients] == [
        (0, "bob@Example.COM", "example.com", RecipientState.QUEUED),
        (1, "carol@example.com", "example.com", RecipientState.QUEUED),
        (2, "dave@other.example", "other.example", RecipientState.QUEUED),
    ]
    r1 = rec.recipients[1]
    assert r1.notify == ("SUCCESS", "FAILURE")
    assert r1.orcpt == "rfc822;carol@example.com"
    assert all(r.attempts == 0 and r.next_attempt_at == T0 for r in rec.recipients)


async def test_put_uses_given_now(spool: Spool) -> None:
    qid = await spool.put(envelope("b@example.com"), body(b"x"), now=T0 + 50)
    rec = await spool.get(qid)
    assert rec is not None and rec.received_at == T0 + 50


async def test_null_sender_and_dsn_kind_round_trip(spool: Spool) -> None:
    env = envelope("b@example.com", sender="", kind=MessageKind.DSN)
    qid = await spool.put(env, body(b"report"))
    rec = await spool.get(qid)
    assert rec is not None and rec.envelope.sender == "" and rec.kind is MessageKind.DSN


@pytest.mark.parametrize("size", [0, 1, 256 * 1024 - 1, 256 * 1024 + 1, 5 * 1024 * 1024])
async def test_body_is_byte_exact(spool: Spool, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    qid = await spool.put(envelope("b@example.com"), body(data, tmp_path))
    assert await spool.read_body(qid) == data
    chunks = [c async for c in spool.iter_body(qid, chunk_size=64 * 1024)]
    assert b"".join(chunks) == data
    assert all(len(c) <= 64 * 1024 for c in chunks)
    rec = await spool.get(qid)
    assert rec is not None and rec.size == size


async def test_body_keeps_every_byte_value_and_line_ending(spool: Spool) -> None:
    data = bytes(range(256)) * 3 + b"\r\n.\r\n..x\r\n\x00\r\n"
    qid = await spool.put(envelope("b@example.com"), body(data))
    assert await spool.read_body(qid) == data


async def test_put_with_id_keeps_the_id(spool: Spool) -> None:
    qid = new_queue_id(T0)
    assert await spool.put_with_id(qid, envelope("b@example.com"), body(b"x")) == qid
    assert (await spool.get(qid)) is not None


async def test_put_with_a_taken_id_fails_and_leaves_the_first_intact(spool: Spool) -> None:
    qid = new_queue_id(T0)
    await spool.put_with_id(qid, envelope("b@example.com"), body(b"first"))
    with pytest.raises(SpoolError):
        await spool.put_with_id(qid, envelope("c@example.com"), body(b"second"))
    rec = await spool.get(qid)
    assert rec is not None and [r.address for r in rec.recipients] == ["b@example.com"]
    assert await spool.read_body(qid) == b"first"


async def test_ids_sort_by_arrival(spool: Spool) -> None:
    ids = [await spool.put(envelope("b@example.com"), body(b"x")) for _ in range(20)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20


async def test_unknown_ids(spool: Spool) -> None:
    missing = QueueId("00000000000000")
    assert await spool.get(missing) is None
    with pytest.raises(NotFound):
        await spool.read_body(missing)
    with pytest.raises(NotFound):
        async for _ in spool.iter_body(missing):
            pass
    assert await spool.delete(missing) is False


async def test_concurrent_puts_are_group_committed(spool: Spool) -> None:
    before = spool.statistics()
    datas = [os.urandom(5000) + str(i).encode() for i in range(100)]
    ids = await asyncio.gather(*[spool.put(envelope(f"u{i}@example.com"), body(d)) for i, d in enumerate(datas)])
    after = spool.statistics()
    assert len(set(ids)) == 100
    assert after.puts - before.puts == 100
    assert after.commits - before.commits < 100, after
    assert after.largest_group > 1
    for qid, data in zip(ids, datas, strict=True):
        assert await spool.read_body(qid) == data
    assert await spool.count_pending() == 100


async def test_a_failing_put_does_not_fail_the_others_in_its_group(spool: Spool) -> None:
    taken = new_queue_id(T0)
    await spool.put_with_id(taken, envelope("b@example.com"), body(b"first"))
    good = [spool.put(envelope(f"u{i}@example.com"), body(b"ok %d" % i)) for i in range(20)]
    bad = spool.put_with_id(taken, envelope("x@example.com"), body(b"dup"))
    results = await asyncio.gather(*good[:10], bad, *good[10:], return_exceptions=True)
    assert isinstance(results[10], SpoolError)
    ok = [r for i, r in enumerate(results) if i != 10]
    assert all(isinstance(r, str) for r in ok)
    for i, qid in enumerate(ok):
        assert await spool.read_body(QueueId(str(qid))) == b"ok %d" % i
    assert await spool.read_body(taken) == b"first"
    assert await spool.count_pending() == 21


async def test_what_was_put_survives_close_and_reopen(
    spool: Spool, backend: Backend, clock: FakeClock, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    qid = await spool.put(envelope("b@example.com", "c@other.example"), body(data, tmp_path))
    await spool.close()
    again = await backend.make(clock)
    try:
        assert await again.read_body(qid) == data
        rec = await again.get(qid)
        assert rec is not None and len(rec.recipients) == 2
        assert await again.count_pending() == 1
    finally:
        await again.close()
