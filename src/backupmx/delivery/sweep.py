"""Sweeping DOWN destinations: no delivery attempt is spent on their mail, but a recipient past its
retention's hard cap still expires (with its DSN), and a message due its delay notice still gets it.

Runs every SWEEP_INTERVAL over each protected destination that is not deliverable, SWEEP_BATCH
recipients at a time; what needs nothing is given back untouched. A failure is logged per destination
or message and tried again at the next sweep.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

from backupmx.config import Config
from backupmx.delivery.bounce import DsnAction, DsnRecipient, dsn_owed
from backupmx.delivery.notices import Notices
from backupmx.delivery.outages import OutageCache
from backupmx.delivery.outcomes import Event, OutcomeRecorder
from backupmx.delivery.retention import RetentionPolicy
from backupmx.delivery.statistics import Totals
from backupmx.delivery.work import Window
from backupmx.model import Deferred, RecipientRecord
from backupmx.reply import Reply
from backupmx.spool import Claim, RecipientUpdate, Spool

log = logging.getLogger("backupmx.delivery")

SWEEP_INTERVAL = 60.0  # how often DOWN destinations are checked for expiry and delay notices
SWEEP_BATCH = 500


class DownSweep:
    def __init__(self, config: Config, spool: Spool, window: Window, recorder: OutcomeRecorder, *, owner: str,
                 lease: float, protected: Iterable[str], deliverable: Callable[[str], bool], outages: OutageCache,
                 notices: Notices, totals: Totals) -> None:
        self._d = config.delivery
        self._spool = spool
        self._window = window
        self._recorder = recorder
        self._owner = owner
        self._lease = lease
        self._protected = tuple(sorted(protected))
        self._deliverable = deliverable
        self._outages = outages
        self._notices = notices
        self._totals = totals
        self._retention = RetentionPolicy(self._d.retention, self._d.retention_cap)

    async def sweep(self, now: float) -> None:
        for domain in self._protected:
            if self._deliverable(domain):
                continue
            try:
                await self._sweep_one(domain, now)
            except Exception:
                log.exception("sweeping %s", domain)

    async def _sweep_one(self, domain: str, now: float) -> None:
        claims = await self._spool.claim_due(now=now, owner=self._owner, lease_seconds=self._lease,
                                             limit=SWEEP_BATCH, domains=[domain])
        if not claims:
            return
        outages = await self._outages.get(domain, fresh=True)
        dest = self._window.dest(domain)
        give_back: list[Claim] = []
        down = Reply(451, "4.4.1", f"primary of {domain} is down (outage declared)")
        for claim in claims:
            msg = claim.message
            delay_due = self._notices.delay_due(msg, now)
            updates: list[RecipientUpdate] = []
            failed: list[DsnRecipient] = []
            delayed: list[DsnRecipient] = []
            events: list[Event] = []
            untouched: list[RecipientRecord] = []
            for rcpt in claim.recipients:
                if self._retention.expired(msg.received_at, now, outages):
                    outcome = Deferred(Reply.parse(rcpt.last_reply) if rcpt.last_reply else down)
                    updates.append(RecipientUpdate(msg.id, rcpt.index, None, expire=True))
                    events.append(("expired", rcpt, outcome, ""))
                    if dsn_owed(msg.envelope, rcpt.notify, DsnAction.FAILED):
                        failed.append(DsnRecipient(rcpt, DsnAction.FAILED, "4.4.7", None, None, rcpt.last_attempt_at,
                                                   detail=f"delivery time expired; last reply: {outcome.reply}"))
                elif delay_due and dsn_owed(msg.envelope, rcpt.notify, DsnAction.DELAYED):
                    # no attempt against a DOWN primary: only the notice, then wait for the recovery flush
                    updates.append(RecipientUpdate(msg.id, rcpt.index, Deferred(down),
                                                   next_attempt_at=now + self._d.retry_max.total_seconds(),
                                                   delay_notified=True))
                    delayed.append(DsnRecipient(
                        rcpt, DsnAction.DELAYED, "4.4.1", None, None, rcpt.last_attempt_at,
                        will_retry_until=self._retention.expires_at(msg.received_at, now, outages)))
                else:
                    untouched.append(rcpt)
            if untouched:
                give_back.append(dataclasses.replace(claim, recipients=tuple(untouched)))
            if not updates:
                continue
            dsns = await self._notices.build(msg, [failed, delayed], now)
            if delayed:
                self._notices.delay_sent(msg)
            try:
                await self._spool.record(self._owner, updates, dsns, now=now)
            except Exception:
                log.exception("%s: recording the sweep's outcomes failed", msg.id)
                continue
            self._recorder.account(dest, msg, "none", events, now)
            self._totals.counts["dsns"] += len(dsns)
        if give_back:
            await self._spool.release(give_back)
