"""A message is parsed once per view: concurrent readers and the frame/parts after them share one read
and one parse; a message past the budget is not parsed (nor read, past the byte cap); a spool error is
not kept."""

from __future__ import annotations

import asyncio

import pytest

from backupmx.continuity.render import MAX_VIEW_BYTES, ParsedMessage, TooLarge
from backupmx.continuity.viewcache import ViewCache
from backupmx.errors import SpoolUnavailable
from tests.unit.continuity import mail


async def test_one_read_and_parse_for_every_reader() -> None:
    cache = ViewCache()
    reads = 0
    body = mail.multipart()

    async def read() -> bytes:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)
        return body

    try:
        views = await asyncio.gather(*(cache.view("Q1", len(body), read) for _ in range(6)))
        views.append(await cache.view("Q1", len(body), read))
        assert reads == 1 and all(v is views[0] for v in views) and isinstance(views[0], ParsedMessage)
    finally:
        cache.close()


async def test_too_large_is_never_parsed_and_errors_are_not_kept() -> None:
    cache = ViewCache()
    calls = 0

    async def unreadable() -> bytes:
        nonlocal calls
        calls += 1
        raise SpoolUnavailable("down")

    try:
        assert isinstance(await cache.view("Q2", MAX_VIEW_BYTES + 1, unreadable), TooLarge) and calls == 0
        many = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + b"--x\r\n\r\nx\r\n" * 600 + b"--x--\r\n"

        async def read_many() -> bytes:
            return many

        assert isinstance(await cache.view("Q3", len(many), read_many), TooLarge)
        for _ in range(2):
            with pytest.raises(SpoolUnavailable):
                await cache.view("Q4", 10, unreadable)
        assert calls == 2  # tried again, not served from the cache
    finally:
        cache.close()
