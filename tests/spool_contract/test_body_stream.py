"""Contract: the chunked body reader (`iter_body`) that delivery streams bodies with. Many readers of
one body at once, in small chunks, each byte-exact; a reader abandoned half-way leaves nothing held
(the message can still be read, recorded and deleted); a body deleted while it is read ends in
NotFound, never in silently short data."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from backupmx.errors import NotFound
from backupmx.spool import Spool
from tests.spool_contract.samples import body, envelope

SIZE = 3 * 1024 * 1024 + 17


async def test_concurrent_readers_in_small_chunks_are_byte_exact(spool: Spool, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    qid = await spool.put(envelope("b@example.com"), body(data, tmp_path))

    async def read(chunk: int) -> bytes:
        out = bytearray()
        async for c in spool.iter_body(qid, chunk_size=chunk):
            assert 0 < len(c) <= chunk
            out += c
            await asyncio.sleep(0)  # interleave the readers
        return bytes(out)

    got = await asyncio.gather(*(read(64 * 1024 + i) for i in range(8)))
    assert all(g == data for g in got)


async def test_abandoned_reader_holds_nothing(spool: Spool, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    qid = await spool.put(envelope("b@example.com"), body(data, tmp_path))
    it = spool.iter_body(qid, chunk_size=256 * 1024)
    first = await anext(it)
    assert first == data[: len(first)]
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()
    del it
    assert await spool.read_body(qid) == data  # read again whole
    assert await spool.delete(qid) is True
    with pytest.raises(NotFound):
        await spool.read_body(qid)


async def test_deleted_while_read_ends_in_not_found(spool: Spool, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    qid = await spool.put(envelope("b@example.com"), body(data, tmp_path))
    got = bytearray()
    with pytest.raises(NotFound):
        async for c in spool.iter_body(qid, chunk_size=64 * 1024):
            if not got:
                assert await spool.delete(qid) is True
            got += c
            if len(got) > SIZE:
                break
    assert len(got) < SIZE  # the reader noticed; it never passed off a short body as whole
    with pytest.raises(NotFound):
        await spool.read_body(qid)
