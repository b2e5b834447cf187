"""Checks a SQLite spool file behind the spool's back: nothing half-stored, checksums, counters.

Returns a list of problems (empty when sound), so a test can print all of them at once.
"""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path


def check_integrity(db: Path) -> list[str]:
    conn = sqlite3.connect(db, isolation_level=None)
    problems: list[str] = []
    try:
        conn.execute("BEGIN")
        ok = conn.execute("PRAGMA integrity_check").fetchall()
        if ok != [("ok",)]:
            problems.append(f"integrity_check: {ok}")

        def rows(sql: str) -> list[tuple[object, ...]]:
            return list(conn.execute(sql))

        orphans = {
            "message without body": "SELECT id FROM messages m"
            " WHERE NOT EXISTS (SELECT 1 FROM bodies b WHERE b.message_id = m.id)",
            "body without message": "SELECT message_id FROM bodies b"
            " WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = b.message_id)",
            "message without recipients": "SELECT id FROM messages m"
            " WHERE NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id)",
            "recipients without message": "SELECT DISTINCT message_id FROM recipients r"
            " WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = r.message_id)",
        }
        for what, sql in orphans.items():
            problems += [f"{qid}: {what}" for (qid,) in rows(sql)]
        for qid, size, checksum, data in conn.execute(
            "SELECT m.id, m.size, m.checksum, b.data FROM messages m JOIN bodies b ON b.message_id = m.id"
            " WHERE m.corrupt_reason IS NULL"
        ):
            if len(data) != size:
                problems.append(f"{qid}: body {len(data)} bytes, size says {size}")
            if checksum != f"crc32:{zlib.crc32(data):08x}":
                problems.append(f"{qid}: checksum mismatch")
        for qid, pending, actual in rows(
            "SELECT id, pending, EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
            " AND r.state IN ('queued','held')) FROM messages m"
        ):
            if pending != actual:
                problems.append(f"{qid}: pending flag {pending}, recipients say {actual}")

        def compare(name: str, kept: list[tuple[object, ...]], truth: list[tuple[object, ...]]) -> None:
            k = {r[:-1]: r[-1] for r in kept if r[-1] != 0}
            t = {r[:-1]: r[-1] for r in truth}
            if k != t:
                problems.append(f"{name}: kept {k} != counted {t}")

        compare(
            "msg_counts",
            rows("SELECT kind, pending FROM msg_counts"),
            rows("SELECT kind, count(*) FROM messages WHERE pending = 1 AND corrupt_reason IS NULL GROUP BY kind"),
        )
        compare(
            "rcpt_counts",
            rows("SELECT domain, state, n FROM rcpt_counts"),
            rows("SELECT domain, state, count(*) FROM recipients GROUP BY domain, state"),
        )
        compare(
            "dom_pending",
            rows("SELECT domain, messages FROM dom_pending"),
            rows(
                "SELECT domain, count(DISTINCT message_id) FROM recipients"
                " WHERE state IN ('queued','held') GROUP BY domain"
            ),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return problems
