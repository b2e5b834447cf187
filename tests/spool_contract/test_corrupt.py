"""Contract: a damaged entry is set aside (corrupt), reported, never claimed, and never crashes the caller."""

from __future__ import annotations

import os

import pytest

from backupmx.errors import SpoolError
from backupmx.model import RecipientState
from backupmx.spool import Spool
from tests.spool_contract.conftest import Backend
from tests.spool_contract.samples import T0, body, envelope


async def test_a_damaged_body_is_set_aside(spool: Spool, backend: Backend) -> None:
    bad = await spool.put(envelope("x@a.example"), body(os.urandom(70_000)))
    good = await spool.put(envelope("y@a.example"), body(b"fine"))
    backend.corrupt_body(bad)

    with pytest.raises(SpoolError):
        await spool.read_body(bad)
    assert [qid for qid, _ in await spool.list_corrupt()] == [bad]
    [(_, reason)] = await spool.list_corrupt()
    assert "checksum" in reason

    claims = await spool.claim_due(now=T0 + 1, owner="n1", lease_seconds=60, limit=10)
    assert [c.message.id for c in claims] == [good]
    st = await spool.stats()
    assert st.corrupt == 1
    assert await spool.count_pending() == 1
    listed = await spool.list_messages()  # still listed for the operator; no crash
    assert {m.id for m in listed} == {bad, good}
    assert await spool.read_body(good) == b"fine"
    with pytest.raises(SpoolError):
        await spool.read_body(bad)  # stays set aside
    assert await spool.delete(bad)  # the operator can remove it
    assert await spool.list_corrupt() == []
    assert (await spool.stats()).corrupt == 0


async def test_a_damaged_body_raises_at_the_end_of_iteration(spool: Spool, backend: Backend) -> None:
    bad = await spool.put(envelope("x@a.example"), body(os.urandom(200_000)))
    backend.corrupt_body(bad)
    with pytest.raises(SpoolError):
        async for _ in spool.iter_body(bad, chunk_size=50_000):
            pass
    assert [qid for qid, _ in await spool.list_corrupt()] == [bad]


async def test_an_unreadable_envelope_is_set_aside_by_claim(spool: Spool, backend: Backend) -> None:
    bad = await spool.put(envelope("x@a.example", sender="s@x.example"), body(b"x"), now=T0)
    good = await spool.put(envelope("y@a.example"), body(b"x"), now=T0 + 1)
    backend.corrupt_envelope(bad)
    claims = await spool.claim_due(now=T0 + 2, owner="n1", lease_seconds=60, limit=10)
    assert [c.message.id for c in claims] == [good]
    [(qid, reason)] = await spool.list_corrupt()
    assert qid == bad and "envelope" in reason
    later = await spool.claim_due(now=T0 + 100, owner="n2", lease_seconds=60, limit=10)
    assert [c.message.id for c in later] == [good]  # its lease ran out; the damaged one stays aside
    assert (await spool.stats()).corrupt == 1


async def test_an_unreadable_envelope_is_still_listed_and_shown(spool: Spool, backend: Backend) -> None:
    bad = await spool.put(envelope("x@a.example", sender="s@x.example"), body(b"x"))
    backend.corrupt_envelope(bad)
    [listed] = await spool.list_messages()
    assert listed.id == bad
    assert [r.address for r in listed.recipients] == ["x@a.example"]
    shown = await spool.get(bad)
    assert shown is not None and shown.recipients[0].state is RecipientState.QUEUED
    assert [qid for qid, _ in await spool.list_corrupt()] == [bad]
