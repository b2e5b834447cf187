"""`backupmx queue export` at scale: 10,000 held messages (put through the Spool API, a few of them
over a megabyte, some with "From " lines) exported per recipient to mbox by the real command and to
Maildir in-process under tracemalloc, then read back with Python's `mailbox` module: every body is
byte-identical (mbox "From " lines come back after mboxrd un-quoting), in arrival order, and the
export's memory stays flat while the queue is many times larger."""

from __future__ import annotations

import asyncio
import mailbox
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupmx.continuity.export import Format, Selection, export
from backupmx.model import Envelope, QueueId, Recipient
from backupmx.spool.body import BodyBuffer
from backupmx.spool.sqlite import SqliteSpool
from tests.support.serve import render_toml

N = 10_000
REPO = Path(__file__).resolve().parents[2]


def body(i: int, rng: random.Random) -> bytes:
    head = (
        f"From: sender{i % 97}@else.test\r\nTo: someone@example.test\r\nSubject: message {i}\r\n"
        f"Message-ID: <{i}@else.test>\r\n\r\n"
    ).encode()
    lines = [f"line {n} of message {i} {'x' * rng.randint(0, 70)}".encode() for n in range(rng.randint(3, 60))]
    if i % 100 == 7:
        lines[1:1] = [b"From the desk of the CEO", b">From a quoted line", b"From "]
    if i % 2000 == 11:  # a big one: several 1 MiB chunks, a "From " line near a chunk boundary
        lines.append(b"y" * (1 << 20) + b"\r\nFrom across the boundary\r\n" + b"z" * (600 << 10))
    return head + b"\r\n".join(lines) + b"\r\n"


async def seed(data_dir: Path) -> dict[str, list[tuple[QueueId, bytes]]]:
    rng = random.Random(20261124)
    spool = SqliteSpool(data_dir, node="t")
    await spool.open()
    expected: dict[str, list[tuple[QueueId, bytes]]] = {"alice@example.test": [], "bob@example.test": []}
    try:
        for start in range(0, N, 500):
            batch = []
            for i in range(start, start + 500):
                roll = rng.random()
                rcpts = (
                    ["alice@example.test"]
                    if roll < 0.8
                    else ["bob@example.test"]
                    if roll < 0.9
                    else ["alice@example.test", "bob@example.test"]
                )
                batch.append((rcpts, body(i, rng)))
            # concurrent puts are group-committed: 500 messages in a handful of fsyncs
            ids = await asyncio.gather(
                *(
                    spool.put(Envelope("sender@else.test", tuple(Recipient(a) for a in r)), BodyBuffer.from_bytes(b))
                    for r, b in batch
                )
            )
            for qid, (rcpts, b) in sorted(zip(ids, batch, strict=True)):
                for a in rcpts:
                    expected[a].append((qid, b))
    finally:
        await spool.close()
    for items in expected.values():
        items.sort()
    return expected


def unquote_mboxrd(data: bytes) -> bytes:
    return re.sub(rb"(?m)^>(>*From )", rb"\1", data)


@pytest.fixture
def out_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the mailboxes go: a tmpfs when the machine has one. Creating 11,000 small files costs
    0.5-3 ms each on the CI disk, which is the disk's figure, not the exporter's."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="backupmx-export-", dir=shm))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path / "out"


async def test_export_10000_held_messages_to_mbox_and_maildir(tmp_path: Path, out_dir: Path) -> None:
    started = time.monotonic()
    data_dir = tmp_path / "data"
    expected = await seed(data_dir)
    total_bytes = sum(len(b) for items in expected.values() for _, b in items)
    assert sum(len(v) for v in expected.values()) > N and total_bytes > 25_000_000

    # mbox, through the real command
    config = tmp_path / "backupmx.toml"
    config.write_text(
        render_toml(
            {
                "server": {"hostname": "backup.test", "listen": ["127.0.0.1:2525"], "data_dir": str(data_dir)},
                "domains": [{"name": "example.test", "primary": ["127.0.0.1:1"]}],
                "admin": {"listen": ""},
            }
        )
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "backupmx.cli",
            "queue",
            "export",
            "--domain",
            "example.test",
            "--format",
            "mbox",
            str(out_dir / "mbox"),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert res.returncode == 0, res.stderr
    assert "exported 10,000 messages" in res.stderr

    # Maildir, in-process, with Python allocations traced
    spool = SqliteSpool(data_dir, node="t")
    await spool.open()
    try:
        tracemalloc.start()
        result = await export(spool, Selection(domain="example.test"), Format.MAILDIR, out_dir / "maildir")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        await spool.close()
    assert result.messages == N and result.copies == sum(len(v) for v in expected.values())
    assert peak < 16_000_000, f"export peaked at {peak:,} bytes of Python memory for {total_bytes:,} bytes of mail"

    for address, items in expected.items():
        box = mailbox.mbox(out_dir / "mbox" / f"{address}.mbox", create=False)
        keys = list(box.iterkeys())
        assert len(keys) == len(items)
        quoted = 0
        for key, (_, want) in zip(keys, items, strict=True):
            got = box.get_bytes(key)
            if got != want:
                assert unquote_mboxrd(got) == want and b"\n>From " in got
                quoted += 1
        assert quoted > 0  # the "From " lines were quoted, and nothing else differs
        md = mailbox.Maildir(out_dir / "maildir" / address, create=False)
        by_id = {key.split(".")[1]: key for key in md.iterkeys()}
        assert sorted(by_id) == [qid for qid, _ in items]
        for qid, want in items:
            assert md.get_bytes(by_id[qid]) == want
    print(
        f"10,000 messages ({total_bytes:,} bytes) exported twice and read back in "
        f"{time.monotonic() - started:.1f} s; Maildir export peak Python memory {peak:,} bytes"
    )
