"""Delay notices and DSN bodies for the engine: whether a message is due its (single) delay notice,
and the DSN messages (bounce.py) for groups of recipients, with the original read from the spool.

A DSN whose original cannot be read is built without it (the quote is lost, never the notice).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from datetime import timedelta

from backupmx.config import Config
from backupmx.delivery.bounce import DsnRecipient, build_dsn, original_for_dsn
from backupmx.model import MessageRecord
from backupmx.spool import NewMessage, Spool

DELAY_SENT_MIN = 10_000


class Notices:
    def __init__(self, config: Config, spool: Spool) -> None:
        self._hostname = config.server.hostname
        self._warn: timedelta | None = config.delivery.delay_warning
        self._spool = spool
        # message IDs with a delay DSN committed by this process: guards the other jobs of the same claim
        # (whose message records predate the commit), so the oldest may go (bounded, insertion order)
        self._delay_sent: OrderedDict[str, None] = OrderedDict()
        self._delay_sent_max = max(DELAY_SENT_MIN, 2 * config.delivery.window)

    def delay_due(self, msg: MessageRecord, now: float) -> bool:
        if self._warn is None or str(msg.id) in self._delay_sent:
            return False
        if any(r.delay_notified for r in msg.recipients):
            return False  # at most one delay notice per message
        return now - msg.received_at >= self._warn.total_seconds()

    def delay_sent(self, msg: MessageRecord) -> None:
        self._delay_sent[str(msg.id)] = None
        while len(self._delay_sent) > self._delay_sent_max:
            self._delay_sent.popitem(last=False)

    async def build(self, msg: MessageRecord, groups: Sequence[list[DsnRecipient]], now: float) -> list[NewMessage]:
        if not any(groups):
            return []
        original = await original_for_dsn(self._spool, msg)  # never raises; headers only unless RET=FULL
        out: list[NewMessage] = []
        for entries in groups:
            if entries:
                out.append(build_dsn(msg, entries, original=original, reporting_mta=self._hostname, now=now))
        return out
