"""Bodies in the PostgreSQL spool: rows of at most 256 KiB, a large body uploaded (and committed) before
its message so it never holds up the small ones, nothing left behind by a put that fails, a missing
chunk set aside as damage, and the memory a 50 MB put needs (measured in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from backupmx.errors import SpoolError
from backupmx.model import Envelope, Recipient, new_queue_id
from backupmx.spool import BodyBuffer
from backupmx.spool.postgres import CHUNK, INLINE_BODY_MAX, PostgresSpool
from tests.support.postgres import postgres_server_fixture, postgres_url_fixture  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[3]


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="s@sender.example", recipients=tuple(Recipient(r) for r in rcpts))


async def rows(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, server_settings={"search_path": "backupmx"})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.mark.parametrize("size", [INLINE_BODY_MAX, INLINE_BODY_MAX + 1, 3 * CHUNK + 17])
async def test_bodies_are_stored_in_chunks(postgres_url: str, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    spool = PostgresSpool(postgres_url)
    await spool.open()
    try:
        qid = await spool.put(env("a@a.example"), BodyBuffer.from_bytes(data, tmp_path))
        got = await rows(
            postgres_url, "SELECT seq, length(data) AS n FROM body_chunks WHERE message_id = $1 ORDER BY seq", qid
        )
        assert [r["seq"] for r in got] == list(range(-(-size // CHUNK)))
        assert all(r["n"] == CHUNK for r in got[:-1]) and sum(r["n"] for r in got) == size
        assert await rows(postgres_url, "SELECT * FROM body_uploads") == []
        assert await spool.read_body(qid) == data
    finally:
        await spool.close()


async def test_a_large_put_with_a_taken_id_leaves_the_first_and_nothing_else(postgres_url: str, tmp_path: Path) -> None:
    spool = PostgresSpool(postgres_url)
    await spool.open()
    try:
        qid = new_queue_id()
        first = os.urandom(2_000_000)
        await spool.put_with_id(qid, env("a@a.example"), BodyBuffer.from_bytes(first, tmp_path))
        with pytest.raises(SpoolError):
            await spool.put_with_id(qid, env("b@a.example"), BodyBuffer.from_bytes(os.urandom(3_000_000), tmp_path))
        assert await spool.read_body(qid) == first
        assert await rows(postgres_url, "SELECT * FROM body_uploads") == []
        assert await spool.count_pending() == 1
    finally:
        await spool.close()


async def test_a_missing_chunk_sets_the_message_aside(postgres_url: str, tmp_path: Path) -> None:
    spool = PostgresSpool(postgres_url)
    await spool.open()
    try:
        qid = await spool.put(env("a@a.example"), BodyBuffer.from_bytes(os.urandom(12 * CHUNK), tmp_path))
        await rows(postgres_url, "DELETE FROM body_chunks WHERE message_id = $1 AND seq = 9", qid)
        with pytest.raises(SpoolError, match="missing"):
            await spool.read_body(qid)
        assert [q for q, _ in await spool.list_corrupt()] == [qid]
    finally:
        await spool.close()


_MEASURE = r"""
import asyncio, json, os, sys, tempfile, time
from backupmx.model import Envelope, Recipient
from backupmx.spool import BodyBuffer
from backupmx.spool.postgres import PostgresSpool

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

async def main(url, size):
    spool = PostgresSpool(url, node="rss")
    await spool.open()
    body = BodyBuffer(tempfile.mkdtemp())
    block = os.urandom(64 * 1024)
    for _ in range(size // len(block)):
        body.write(block)
    env = Envelope(sender="s@sender.example", recipients=(Recipient("a@a.example"),))
    await spool.put(env, BodyBuffer.from_bytes(b"warm up"))
    base = status("VmRSS")
    reset_peak()
    t = time.monotonic()
    qid = await spool.put(env, body)
    put_seconds = time.monotonic() - t
    put_peak = status("VmHWM")
    reset_peak()
    base_read = status("VmRSS")
    t = time.monotonic()
    n = 0
    async for chunk in spool.iter_body(qid):
        n += len(chunk)
    read_seconds = time.monotonic() - t
    read_peak = status("VmHWM")
    await spool.close()
    print(json.dumps({"size": body.size, "read": n, "base_rss": base, "put_peak_rss": put_peak,
                      "put_growth": put_peak - base, "put_seconds": put_seconds,
                      "read_growth": read_peak - base_read, "read_seconds": read_seconds}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_a_50_mb_put_does_not_need_50_mb_of_memory(postgres_url: str, tmp_path: Path) -> None:
    size = 50 * 1024 * 1024
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, postgres_url, str(size)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)
    print(
        f"50 MiB put: RSS {m['base_rss'] / 2**20:.1f} MiB before, peak +{m['put_growth'] / 2**20:.1f} MiB"
        f" during the put ({m['put_seconds']:.2f}s); read back: peak +{m['read_growth'] / 2**20:.1f} MiB"
        f" ({m['read_seconds']:.2f}s)"
    )
    assert m["read"] == size
    assert m["put_growth"] < 16 * 2**20, m
    assert m["read_growth"] < 16 * 2**20, m
