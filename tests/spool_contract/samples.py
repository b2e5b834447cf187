"""Envelopes and bodies for the contract suite."""

from __future__ import annotations

from pathlib import Path

from backupmx.model import Envelope, Recipient
from backupmx.spool import BodyBuffer

T0 = 1_700_000_000.0


def envelope(*rcpts: str | Recipient, sender: str = "alice@sender.example", **kw: object) -> Envelope:
    recipients = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in rcpts)
    return Envelope(sender=sender, recipients=recipients, **kw)  # type: ignore[arg-type]


def body(data: bytes, tmp_dir: Path | None = None) -> BodyBuffer:
    return BodyBuffer.from_bytes(data, tmp_dir)
