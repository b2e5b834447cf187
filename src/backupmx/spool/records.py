"""Rows -> records, shared by the SQLite and PostgreSQL backends: both store the same columns, and a
row of either (sqlite3.Row, asyncpg.Record) is read by column name. An envelope that cannot be read
is not an error here: the message is still listed, from what its columns tell, with the reason."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from backupmx.model import Envelope, MessageKind, MessageRecord, QueueId, Recipient, RecipientRecord, RecipientState


def rcpt_record(row: Any) -> RecipientRecord:
    return RecipientRecord(
        message_id=QueueId(row["message_id"]),
        index=row["idx"],
        address=row["address"],
        domain=row["domain"],
        state=RecipientState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_attempt_at=row["last_attempt_at"],
        last_reply=row["last_reply"],
        held_reason=row["held_reason"],
        notify=tuple(row["notify"].split(",")) if row["notify"] else None,
        orcpt=row["orcpt"],
        delay_notified=bool(row["delay_notified"]),
        updated_at=row["updated_at"],
    )


def parse_envelope(row: Any) -> Envelope:
    data = json.loads(row["envelope_json"])
    if not isinstance(data, dict):
        raise TypeError("envelope is not an object")
    return Envelope.from_json(data)


def fallback_envelope(row: Any, rcpts: Sequence[RecipientRecord]) -> Envelope:
    """What the columns still tell of an entry whose envelope cannot be read (for listing it)."""
    try:
        kind = MessageKind(row["kind"])
    except ValueError:
        kind = MessageKind.USER
    return Envelope(
        sender=row["sender"],
        recipients=tuple(Recipient(r.address, r.notify, r.orcpt) for r in rcpts),
        kind=kind,
    )


def message_record(row: Any, rcpts: tuple[RecipientRecord, ...]) -> tuple[MessageRecord, str | None]:
    """The record of one message row with its recipients; the second value is why its envelope is
    unreadable, if it is."""
    problem: str | None = None
    try:
        envelope = parse_envelope(row)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        problem = f"unreadable envelope: {type(exc).__name__}: {exc}"
        envelope = fallback_envelope(row, rcpts)
    record = MessageRecord(
        id=QueueId(row["id"]), envelope=envelope, size=row["size"], received_at=row["received_at"], recipients=rcpts
    )
    return record, problem


def crc_text(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"
