"""Delay notices and DSN bodies for the engine: whether a message is due its (single) delay notice,
and the DSN messages (bounce.py) for groups of recipients, with the original read from the spool.

A DSN whose original cannot be read is built without it (headers only are lost, never the notice).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from backupmx.config import Config
from backupmx.delivery.bounce import DsnRecipient, build_dsn
from backupmx.model import MessageRecord
from backupmx.spool import NewMessage, Spool


class Notices:
    def __init__(self, config: Config, spool: Spool) -> None:
        self._hostname = config.server.hostname
        self._warn: timedelta | None = config.delivery.delay_warning
        self._spool = spool
        self._delay_sent: set[str] = set()  # message IDs with a delay DSN committed by this process

    def delay_due(self, msg: MessageRecord, now: float) -> bool:
        if self._warn is None or str(msg.id) in self._delay_sent:
            return False
        if any(r.delay_notified for r in msg.recipients):
            return False  # at most one delay notice per message
        return now - msg.received_at >= self._warn.total_seconds()

    def delay_sent(self, msg: MessageRecord) -> None:
        self._delay_sent.add(str(msg.id))

    async def build(self, msg: MessageRecord, groups: Sequence[list[DsnRecipient]], now: float
                    ) -> list[NewMessage]:
        if not any(groups):
            return []
        try:
            original = await self._spool.read_body(msg.id)
        except Exception:
            original = b""
        out: list[NewMessage] = []
        for entries in groups:
            if entries:
                out.append(build_dsn(msg, entries, original=original, reporting_mta=self._hostname, now=now))
        return out
