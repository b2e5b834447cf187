"""SQLite-specific failure handling: disk full, a database locked too long, a second process on the
same directory (the CLI beside `serve`), and the fault-point switch itself."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupmx.clock import FakeClock
from backupmx.errors import SpoolFullError, SpoolUnavailable
from backupmx.model import Envelope, QueueId, Recipient, RecipientState
from backupmx.spool import BodyBuffer
from backupmx.spool.sqlite import SqliteSpool
from tests.unit.spool.integrity import check_integrity

T0 = 1_700_000_000.0


def _env(addr: str = "bob@example.com") -> Envelope:
    return Envelope(sender="alice@sender.example", recipients=(Recipient(addr),))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


async def test_disk_full_raises_spool_full_and_recovers(small_fs: Path) -> None:
    data_dir = small_fs / "data"
    spool = SqliteSpool(data_dir, clock=FakeClock(T0))
    await spool.open()
    ballast = small_fs / "ballast"
    ballast.write_bytes(b"\0" * 1_000_000)  # what the operator will delete to make room
    try:
        payload = os.urandom(40_000)
        stored: list[QueueId] = []
        full = 0
        for i in range(200):  # 3 MB cannot hold 200 x 40 KB
            try:
                stored.append(await spool.put(_env(f"u{i}@example.com"), BodyBuffer.from_bytes(payload)))
            except SpoolFullError:
                full += 1
                if full >= 3:
                    break
        assert full >= 3, "the file system never filled up"
        assert stored, "not even one message fit"
        # A burst of concurrent puts while full: each fails or succeeds alone, none half-stored.
        results = await asyncio.gather(
            *[spool.put(_env(), BodyBuffer.from_bytes(payload)) for _ in range(10)], return_exceptions=True
        )
        assert all(isinstance(r, str | SpoolFullError) for r in results), results
        stored += [QueueId(r) for r in results if isinstance(r, str)]
        assert await spool.count_pending() == len(stored)

        # Space comes back: the spool works again, without a restart.
        ballast.unlink()
        qid = await spool.put(_env(), BodyBuffer.from_bytes(b"after the storm"))
        assert await spool.read_body(qid) == b"after the storm"
        for q in stored:
            assert await spool.read_body(q) == payload
        assert await spool.delete(stored[0])
        assert await spool.count_pending() == len(stored)
    finally:
        await spool.close()
    assert check_integrity(data_dir / "spool.db") == []


async def test_a_put_too_large_for_the_disk_fails_alone(small_fs: Path, tmp_path: Path) -> None:
    spool = SqliteSpool(small_fs / "data", clock=FakeClock(T0))
    await spool.open()
    try:
        big = os.urandom(6_000_000)  # the file system has 3 MB
        for _ in range(2):
            smalls = [spool.put(_env(), BodyBuffer.from_bytes(b"small %d" % i)) for i in range(20)]
            results = await asyncio.gather(
                *smalls[:10],
                spool.put(_env(), BodyBuffer.from_bytes(big, tmp_path)),
                *smalls[10:],
                return_exceptions=True,
            )
            assert isinstance(results[10], SpoolFullError)
            assert all(isinstance(r, str) for i, r in enumerate(results) if i != 10), results
        assert await spool.count_pending() == 40
        assert spool.statistics().failed_operations == 2
    finally:
        await spool.close()
    assert check_integrity(small_fs / "data" / "spool.db") == []


async def test_locked_past_the_timeout_raises_unavailable_and_stores_nothing(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path, clock=FakeClock(T0), busy_timeout=0.2)
    await spool.open()
    blocker = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(SpoolUnavailable):
            await spool.put(_env(), BodyBuffer.from_bytes(b"x"))
        # Reads do not wait for the writer (WAL).
        assert await spool.count_pending() == 0
        blocker.execute("COMMIT")
        qid = await spool.put(_env(), BodyBuffer.from_bytes(b"x"))
        assert await spool.count_pending() == 1
        assert (await spool.get(qid)) is not None
    finally:
        blocker.close()
        await spool.close()
    assert check_integrity(tmp_path / "spool.db") == []


async def test_a_second_spool_on_the_same_directory_works_beside_the_first(tmp_path: Path) -> None:
    serve = SqliteSpool(tmp_path, node="serve")
    await serve.open()
    try:
        qid = await serve.put(_env(), BodyBuffer.from_bytes(b"x"))
        # Puts keep going while the "CLI" opens, acts and closes, several times.
        stop = asyncio.Event()

        async def keep_putting() -> int:
            n = 0
            while not stop.is_set():
                await serve.put(_env("carol@example.com"), BodyBuffer.from_bytes(b"y"))
                n += 1
            return n

        putter = asyncio.create_task(keep_putting())
        for _ in range(5):
            cli = SqliteSpool(tmp_path, node="cli")
            await cli.open()
            await cli.hold(qid)
            await cli.close()
            rec = await serve.get(qid)
            assert rec is not None and rec.recipients[0].state is RecipientState.HELD
            cli = SqliteSpool(tmp_path, node="cli")
            await cli.open()
            assert await cli.release_held(qid) == 1
            await cli.close()
        stop.set()
        n = await putter
        assert await serve.count_pending() == n + 1
    finally:
        await serve.close()


async def test_a_second_process_can_open_and_write(tmp_path: Path) -> None:
    serve = SqliteSpool(tmp_path)
    await serve.open()
    try:
        qid = await serve.put(_env(), BodyBuffer.from_bytes(b"x"))
        code = (
            "import asyncio, sys\n"
            "from pathlib import Path\n"
            "from backupmx.spool.sqlite import SqliteSpool\n"
            "async def main():\n"
            "    s = SqliteSpool(Path(sys.argv[1])); await s.open()\n"
            "    print(await s.hold(sys.argv[2])); await s.close()\n"
            "asyncio.run(main())\n"
        )
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code, str(tmp_path), qid], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
        rec = await serve.get(qid)
        assert rec is not None and rec.recipients[0].state is RecipientState.HELD
    finally:
        await serve.close()


async def test_two_spools_creating_the_schema_at_once(tmp_path: Path) -> None:
    # The race (WAL switch and migration meeting SQLITE_BUSY without the busy handler) is not hit on
    # every try, so it is run on several fresh directories.
    for round_ in range(12):
        spools = [SqliteSpool(tmp_path / str(round_)) for _ in range(4)]
        await asyncio.gather(*[s.open() for s in spools])
        try:
            await asyncio.gather(*[s.put(_env(), BodyBuffer.from_bytes(b"x")) for s in spools])
            assert await spools[0].count_pending() == 4
        finally:
            for s in spools:
                await s.close()


async def test_open_is_idempotent_and_close_then_open_again(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path)
    await spool.open()
    await spool.open()
    await spool.put(_env(), BodyBuffer.from_bytes(b"x"))
    await spool.close()
    await spool.close()
    with pytest.raises(SpoolUnavailable):
        await spool.put(_env(), BodyBuffer.from_bytes(b"x"))
    await spool.open()
    assert await spool.count_pending() == 1
    await spool.close()
    assert (tmp_path / "tmp").is_dir()
    assert spool.tmp_dir == tmp_path / "tmp"


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path)
    await spool.open()
    await spool.close()
    conn = sqlite3.connect(tmp_path / "spool.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SpoolUnavailable, match="newer"):
        await SqliteSpool(tmp_path).open()


async def test_wal_and_private_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    spool = SqliteSpool(data_dir)
    await spool.open()
    await spool.put(_env(), BodyBuffer.from_bytes(b"x"))
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        assert (data_dir / name).stat().st_mode & 0o777 == 0o600, name
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert spool.tmp_dir.stat().st_mode & 0o777 == 0o700
    await spool.close()
    conn = sqlite3.connect(data_dir / "spool.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_fault_point_is_inert_without_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from backupmx.spool.faults import fault_point

    monkeypatch.delenv("BACKUPMX_FAULT", raising=False)
    fault_point("spool.before_commit")
    monkeypatch.setenv("BACKUPMX_FAULT", "some.other_point")
    fault_point("spool.before_commit")


def test_fault_point_kills_on_the_nth_time() -> None:
    code = (
        "from backupmx.spool.faults import fault_point\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    fault_point('delivery.after_remote_250')\n"
    )
    env = {**os.environ, "BACKUPMX_FAULT": "delivery.after_remote_250", "BACKUPMX_FAULT_AFTER": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == -9
    assert out.stdout.split() == ["0", "1", "2"]
