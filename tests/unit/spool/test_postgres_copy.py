"""Moving a queue between backends: `copy_spool` and `backupmx spool copy|migrate|nodes`. Both ways are
exact (put_record): every recipient's state, attempts, due time, last reply and hold come along.
Nothing pending is left behind, bodies are byte-exact, and running the copy again copies nothing twice."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import pytest

from backupmx.cli.spool import add_parser as add_spool_parser
from backupmx.clock import FakeClock
from backupmx.model import Bounced, Deferred, Delivered, Envelope, MessageKind, QueueId, Recipient, RecipientState
from backupmx.reply import Reply
from backupmx.spool import BodyBuffer, NewMessage, RecipientUpdate, Spool
from backupmx.spool.copy import CopyProgress, copy_spool
from backupmx.spool.pg_schema import SCHEMA_VERSION
from backupmx.spool.postgres import PostgresSpool
from backupmx.spool.sqlite import SqliteSpool
from tests.support.postgres import postgres_server_fixture, postgres_url_fixture  # noqa: F401 (fixtures)

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.3.0", "later")


def env(*rcpts: str, sender: str = "s@sender.example", kind: MessageKind = MessageKind.USER) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=tuple(Recipient(r, notify=("FAILURE",) if "n" in r else None) for r in rcpts),
        kind=kind,
        envid="e1",
        ret="HDRS",
    )


async def fill(spool: Spool, tmp: Path) -> dict[QueueId, bytes]:
    """A queue with history: delivered, deferred, bounced (+ DSN), held, a large body, a finished one."""
    bodies: dict[QueueId, bytes] = {}

    async def put(*rcpts: str, size: int = 300, at: float = T0) -> QueueId:
        data = os.urandom(size)
        qid = await spool.put(env(*rcpts), BodyBuffer.from_bytes(data, tmp), now=at)
        bodies[qid] = data
        return qid

    a = await put("a1@a.example", "a2n@a.example", "b1@b.example", at=T0)
    b = await put("big@b.example", size=3_000_000, at=T0 + 1)
    c = await put("held@a.example", at=T0 + 2)
    done = await put("done@a.example", at=T0 + 3)
    for i in range(30):
        await put(f"bulk{i}@c.example", at=T0 + 10 + i)
    await spool.claim_due(now=T0 + 5, owner="n1", lease_seconds=60, limit=6)
    [dsn] = await spool.record(
        "n1",
        [
            RecipientUpdate(a, 0, Delivered(OK)),
            RecipientUpdate(a, 1, Bounced(Reply(550, "5.1.1", "no such user"))),
            RecipientUpdate(a, 2, Deferred(LATER), next_attempt_at=T0 + 900, delay_notified=True),
            RecipientUpdate(b, 0, Deferred(LATER), next_attempt_at=T0 + 600),
            RecipientUpdate(done, 0, Delivered(OK)),
        ],
        [NewMessage(env("s@sender.example", sender="", kind=MessageKind.DSN), b"dsn body")],
        now=T0 + 6,
    )
    bodies[dsn] = b"dsn body"
    await spool.hold(c, now=T0 + 7)
    del bodies[done]  # finished: not copied
    return bodies


async def test_sqlite_to_postgres_is_exact_and_idempotent(postgres_url: str, tmp_path: Path) -> None:
    src = SqliteSpool(tmp_path / "data", node="old", clock=FakeClock(T0))
    dst = PostgresSpool(postgres_url, node="new", clock=FakeClock(T0))
    await src.open()
    await dst.open()
    try:
        bodies = await fill(src, tmp_path)
        seen: list[CopyProgress] = []
        report = await copy_spool(src, dst, seen.append, tmp_dir=tmp_path)
        assert (report.copied, report.already_there, report.failed, report.approximate) == (len(bodies), 0, (), ())
        assert seen[-1].done == seen[-1].total == len(bodies)
        for qid, data in bodies.items():
            want, got = await src.get(qid), await dst.get(qid)
            assert got == want  # envelope, arrival, every recipient's state, attempts, replies, holds
            assert await dst.read_body(qid) == data
        assert await dst.count_pending() == await src.count_pending()
        st_src, st_dst = await src.stats(), await dst.stats()
        assert st_dst.messages_pending == st_src.messages_pending
        # Due times came along: the deferred recipient is not due before its time.
        due = await dst.claim_due(now=T0 + 599, owner="new", lease_seconds=60, limit=100, domains=["b.example"])
        assert due == []
        again = await copy_spool(src, dst, tmp_dir=tmp_path)
        assert (again.copied, again.already_there) == (0, len(bodies))
    finally:
        await src.close()
        await dst.close()


async def test_postgres_to_sqlite_is_exact_and_idempotent(postgres_url: str, tmp_path: Path) -> None:
    src = PostgresSpool(postgres_url, node="old", clock=FakeClock(T0))
    dst = SqliteSpool(tmp_path / "data", node="new", clock=FakeClock(T0))
    await src.open()
    await dst.open()
    try:
        bodies = await fill(src, tmp_path)
        report = await copy_spool(src, dst, tmp_dir=tmp_path)
        assert (report.copied, report.already_there, report.failed, report.approximate) == (len(bodies), 0, (), ())
        for qid, data in bodies.items():
            want, got = await src.get(qid), await dst.get(qid)
            assert got == want  # envelope, arrival, every recipient's state, attempts, replies, holds
            assert await dst.read_body(qid) == data
        assert await dst.count_pending() == await src.count_pending()
        st_src, st_dst = await src.stats(), await dst.stats()
        assert st_dst.messages_pending == st_src.messages_pending
        held = [m for m in await dst.list_messages() if any(r.state is RecipientState.HELD for r in m.recipients)]
        assert len(held) == 1
        # The attempt history came along: the deferred recipients are not due before their time.
        deferred = {
            (r.message_id, r.index)
            for m in await src.list_messages()
            for r in m.recipients
            if r.attempts and r.state is RecipientState.QUEUED
        }
        assert len(deferred) == 2
        assert await dst.claim_due(now=T0 + 599, owner="new", lease_seconds=60, limit=100, domains=["b.example"]) == []
        due = await dst.claim_due(now=T0 + 900, owner="new", lease_seconds=60, limit=100, domains=["b.example"])
        assert {(r.message_id, r.index) for c in due for r in c.recipients} == deferred
        again = await copy_spool(src, dst, tmp_dir=tmp_path)
        assert (again.copied, again.already_there) == (0, len(bodies))
    finally:
        await src.close()
        await dst.close()


async def test_a_damaged_message_is_reported_not_copied(postgres_url: str, tmp_path: Path) -> None:
    src = SqliteSpool(tmp_path / "data", clock=FakeClock(T0))
    dst = PostgresSpool(postgres_url, clock=FakeClock(T0))
    await src.open()
    await dst.open()
    try:
        good = await src.put(env("a@a.example"), BodyBuffer.from_bytes(b"good"))
        bad = await src.put(env("b@a.example"), BodyBuffer.from_bytes(b"bad body"))
        import sqlite3

        conn = sqlite3.connect(tmp_path / "data" / "spool.db", isolation_level=None)
        conn.execute("UPDATE bodies SET data = ? WHERE message_id = ?", (b"BAD body", bad))
        conn.close()
        report = await copy_spool(src, dst)
        assert report.copied == 1 and [q for q, _ in report.failed] == [bad]
        assert await dst.read_body(good) == b"good"
        assert await dst.get(bad) is None
    finally:
        await src.close()
        await dst.close()


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="backupmx")
    add_spool_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    code: int = args.handler(args)
    return code


def test_the_commands(postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "backupmx.toml"
    config.write_text(
        f'[server]\nnode_name = "mx2"\ndata_dir = "{tmp_path / "data"}"\n\n[spool]\nurl = "{postgres_url}"\n'
    )
    assert run_cli("spool", "migrate", "--config", str(config)) == 0
    assert f"migrated from version 0 to {SCHEMA_VERSION}" in capsys.readouterr().out
    assert run_cli("spool", "migrate", "--config", str(config)) == 0
    assert f"up to date (version {SCHEMA_VERSION})" in capsys.readouterr().out

    async def fill_sqlite() -> dict[QueueId, bytes]:
        src = SqliteSpool(tmp_path / "old", clock=FakeClock(T0))
        await src.open()
        try:
            return await fill(src, tmp_path)
        finally:
            await src.close()

    bodies = asyncio.run(fill_sqlite())
    assert run_cli("spool", "copy", "--from", f"sqlite:{tmp_path / 'old' / 'spool.db'}", "--to", postgres_url) == 0
    out, err = capsys.readouterr()
    assert f"copied {len(bodies)} message(s)" in out and "0 failed" in out
    assert f"{len(bodies)}/{len(bodies)} messages" in err  # the progress
    assert run_cli("spool", "copy", "--from", f"sqlite:{tmp_path / 'old'}", "--to", postgres_url, "-q") == 0
    assert f"copied 0 message(s) (0 bytes), {len(bodies)} already there" in capsys.readouterr().out
    # ... and back, into a new SQLite spool
    assert (
        run_cli("spool", "copy", "--from", postgres_url, "--to", f"sqlite:{tmp_path / 'back'}", "--config", str(config))
        == 0
    )
    assert f"copied {len(bodies)} message(s)" in capsys.readouterr().out

    async def count_back() -> int:
        spool = SqliteSpool(tmp_path / "back")
        await spool.open()
        try:
            return await spool.count_pending()
        finally:
            await spool.close()

    assert asyncio.run(count_back()) == len(bodies)

    async def claim_as_node() -> None:
        spool = PostgresSpool(postgres_url, node="mx2")
        await spool.open()
        try:
            await spool.claim_due(now=T0, owner="mx2", lease_seconds=1, limit=1)
        finally:
            await spool.close()

    asyncio.run(claim_as_node())
    assert run_cli("spool", "nodes", "--config", str(config)) == 0
    assert "mx2" in capsys.readouterr().out
