"""Schema version 2 (the kv table) is added to a version 1 spool in place, messages kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from backupmx.model import Envelope, Recipient
from backupmx.spool import BodyBuffer
from backupmx.spool.schema import SCHEMA_VERSION
from backupmx.spool.sqlite import SqliteSpool


async def test_a_version_1_spool_is_migrated_and_keeps_its_mail(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path, node="n1")
    await spool.open()
    qid = await spool.put(Envelope("a@sender.test", (Recipient("u@example.test"),)), BodyBuffer.from_bytes(b"x\r\n"))
    await spool.close()
    conn = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)  # back to what version 1 had
    conn.execute("DROP TABLE kv")
    conn.execute("PRAGMA user_version = 1")
    conn.close()

    spool = SqliteSpool(tmp_path, node="n1")
    await spool.open()
    try:
        assert await spool.get(qid) is not None
        await spool.kv_put("drill", "report/example.test", b"{}")
        assert await spool.kv_get("drill", "report/example.test") == b"{}"
    finally:
        await spool.close()
    conn = sqlite3.connect(tmp_path / "spool.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
