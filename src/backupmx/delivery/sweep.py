"""Sweeping DOWN destinations: no delivery attempt is spent on their mail, but a recipient past its
retention's hard cap still expires (with its DSN), and a message due its delay notice still gets it.

Runs every SWEEP_INTERVAL over each protected destination that is not deliverable, SWEEP_BATCH
recipients at a time; what needs nothing is given back due when it next may, so sweeps advance through
the whole queue. A failure is logged per destination or message and tried again at the next sweep;
an unexpected one counts toward the poison limit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence

from backupmx.config import Config
from backupmx.delivery.bounce import DsnAction, DsnRecipient, dsn_owed
from backupmx.delivery.notices import Notices
from backupmx.delivery.outages import OutageCache
from backupmx.delivery.outcomes import Event, OutcomeRecorder, Recorded
from backupmx.delivery.poison import PoisonGuard
from backupmx.delivery.retention import RetentionPolicy
from backupmx.delivery.statistics import Totals
from backupmx.delivery.work import Window
from backupmx.model import Deferred, MessageRecord, QueueId, RecipientRecord, RecipientState
from backupmx.reply import Reply
from backupmx.spool import Claim, OutagePeriod, QueueFilter, RecipientUpdate, Spool

log = logging.getLogger("backupmx.delivery")

SWEEP_INTERVAL = 60.0  # how often DOWN destinations are checked for expiry and delay notices
SWEEP_BATCH = 500
SWEEP_BATCHES = 10  # batches per destination and sweep at most


class DownSweep:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        window: Window,
        recorder: OutcomeRecorder,
        *,
        owner: str,
        lease: float,
        protected: Iterable[str],
        deliverable: Callable[[str], bool],
        outages: OutageCache,
        notices: Notices,
        totals: Totals,
        poison: PoisonGuard,
    ) -> None:
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
        self._poison = poison
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
        """Up to SWEEP_BATCHES batches: what needs nothing now is given back due when it next may (its
        delay notice or its expiry, within `retry_max`), so the next batch, and the next sweep, reads
        other recipients instead of the same first SWEEP_BATCH again."""
        for _ in range(SWEEP_BATCHES):
            claims = await self._spool.claim_due(
                now=now, owner=self._owner, lease_seconds=self._lease, limit=SWEEP_BATCH, domains=[domain]
            )
            if not claims:
                return
            outages = await self._outages.get(domain, fresh=True)
            give_back: list[Claim] = []
            due: list[float] = []
            try:
                for claim in claims:
                    untouched = await self._sweep_message(domain, claim, now, outages)
                    if untouched:
                        give_back.append(dataclasses.replace(claim, recipients=tuple(untouched)))
                        due.append(self._next_look(claim.message, now, outages))
            finally:
                if give_back:
                    await self._spool.release(give_back, due=due)
            if sum(len(c.recipients) for c in claims) < SWEEP_BATCH:
                return

    def _next_look(self, msg: MessageRecord, now: float, outages: Sequence[OutagePeriod]) -> float:
        """When a recipient the sweep left untouched may need it: its delay notice, its expiry, and at
        the latest `retry_max` from now (a due time further ahead would look like a clock jump)."""
        at = min(self._retention.expires_at(msg.received_at, now, outages), now + self._d.retry_max.total_seconds())
        warn = self._d.delay_warning
        if warn is not None and not any(r.delay_notified for r in msg.recipients):
            at = min(at, msg.received_at + warn.total_seconds())
        return max(at, now + 1.0)

    async def _sweep_message(
        self, domain: str, claim: Claim, now: float, outages: Sequence[OutagePeriod]
    ) -> list[RecipientRecord]:
        """Expire or notify what is due for it, in one commit with the DSNs; returns the untouched
        recipients. A failure leaves the message to its lease; an unexpected one counts as poison."""
        msg = claim.message
        dest = self._window.dest(domain)
        down = Reply(451, "4.4.1", f"primary of {domain} is down (outage declared)")
        delay_due = self._notices.delay_due(msg, now)
        updates: list[RecipientUpdate] = []
        failed: list[DsnRecipient] = []
        delayed: list[DsnRecipient] = []
        events: list[Event] = []
        untouched: list[RecipientRecord] = []
        try:
            for rcpt in claim.recipients:
                if self._retention.expired(msg.received_at, now, outages):
                    outcome = Deferred(Reply.parse(rcpt.last_reply) if rcpt.last_reply else down)
                    updates.append(RecipientUpdate(msg.id, rcpt.index, None, expire=True))
                    events.append(("expired", rcpt, outcome, ""))
                    if dsn_owed(msg.envelope, rcpt.notify, DsnAction.FAILED):
                        failed.append(
                            DsnRecipient(
                                rcpt,
                                DsnAction.FAILED,
                                "4.4.7",
                                None,
                                None,
                                rcpt.last_attempt_at,
                                detail=f"delivery time expired; last reply: {outcome.reply}",
                            )
                        )
                elif delay_due and dsn_owed(msg.envelope, rcpt.notify, DsnAction.DELAYED):
                    # no attempt against a DOWN primary: only the notice, then wait for the recovery flush
                    updates.append(
                        RecipientUpdate(
                            msg.id,
                            rcpt.index,
                            Deferred(down),
                            next_attempt_at=now + self._d.retry_max.total_seconds(),
                            delay_notified=True,
                        )
                    )
                    delayed.append(
                        DsnRecipient(
                            rcpt,
                            DsnAction.DELAYED,
                            "4.4.1",
                            None,
                            None,
                            rcpt.last_attempt_at,
                            will_retry_until=self._retention.expires_at(msg.received_at, now, outages),
                        )
                    )
                else:
                    untouched.append(rcpt)
            if not updates:
                return untouched
            dsns = await self._notices.build(msg, [failed, delayed], now)
        except Exception as e:
            log.exception("%s: the sweep's outcomes could not be prepared", msg.id)
            await self._poison.failed(msg.id, f"{type(e).__name__}: {e}", claim)
            return []  # left to the lease
        status = await self._recorder.write_once(updates, dsns, now)
        if status is Recorded.FAILED:
            await self._poison.failed(msg.id, "recording the sweep's outcomes failed (see the diagnostic log)", claim)
        if not status.committed:
            return []  # left to the lease: the next sweep after it runs out tries again
        if delayed:
            self._notices.delay_sent(msg)  # only once committed
        self._recorder.account(dest, msg, "none", events, now)
        self._totals.counts["dsns"] += len(dsns)
        return untouched


HELD_EXPIRES = ("recovery-guard", "poison")  # holds that follow retention_cap; an operator's hold does not
HELD_PAGE = 100


class HeldSweep:
    """Held is not forgotten: a recipient HELD by the recovery guard or as poison that reaches
    `retention_cap` (wall clock since arrival) expires with its DSN, as queued mail does, unless the
    operator released or deleted it first. Messages are read oldest first; the first one not yet at the
    cap ends the scan (arrival order), so a sweep reads little more than what it expires."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        window: Window,
        recorder: OutcomeRecorder,
        *,
        owner: str,
        lease: float,
        notices: Notices,
        totals: Totals,
    ) -> None:
        self._cap = config.delivery.retention_cap.total_seconds()
        self._spool = spool
        self._window = window
        self._recorder = recorder
        self._owner = owner
        self._lease = lease
        self._notices = notices
        self._totals = totals

    async def sweep(self, now: float) -> None:
        for reason in HELD_EXPIRES:
            try:
                await self._expire(reason, now)
            except Exception:
                log.exception("expiring recipients held as %s", reason)  # tried again at the next sweep

    async def _expire(self, reason: str, now: float) -> None:
        flt = QueueFilter(state=RecipientState.HELD, held_reason=reason)
        after: QueueId | None = None
        for _ in range(SWEEP_BATCHES):
            page = await self._spool.list_messages(flt, limit=HELD_PAGE, after=after)
            for msg in page:
                if now - msg.received_at < self._cap:
                    return
                await self._expire_message(msg, reason, now)
            if len(page) < HELD_PAGE:
                return
            after = page[-1].id

    async def _expire_message(self, msg: MessageRecord, reason: str, now: float) -> None:
        claim = await self._spool.claim_held(
            msg.id, reason=reason, owner=self._owner, lease_seconds=self._lease, now=now
        )
        if claim is None:
            return
        msg = claim.message
        updates: list[RecipientUpdate] = []
        failed: list[DsnRecipient] = []
        events: list[Event] = []
        for rcpt in claim.recipients:
            why = Reply(451, "4.4.7", f"held ({reason}) until the retention cap")
            outcome = Deferred(Reply.parse(rcpt.last_reply) if rcpt.last_reply else why)
            updates.append(RecipientUpdate(msg.id, rcpt.index, None, expire=True))
            events.append(("expired", rcpt, outcome, reason))
            if dsn_owed(msg.envelope, rcpt.notify, DsnAction.FAILED):
                failed.append(
                    DsnRecipient(
                        rcpt,
                        DsnAction.FAILED,
                        "4.4.7",
                        None,
                        None,
                        rcpt.last_attempt_at,
                        detail=f"held ({reason}) until the retention cap; last reply: {outcome.reply}",
                    )
                )
        try:
            dsns = await self._notices.build(msg, [failed], now)
        except Exception:
            log.exception("%s: the DSN for held recipients at the retention cap could not be built", msg.id)
            await self._spool.release([claim])  # still held; tried again at the next sweep
            return
        status = await self._recorder.write_once(updates, dsns, now)
        if not status.committed:
            return  # still held; its lease runs out and the next sweep tries again
        self._recorder.account(self._window.dest(claim.recipients[0].domain), msg, "none", events, now)
        self._totals.counts["dsns"] += len(dsns)
        log.warning("%s: %d recipients held as %s expired at the retention cap", msg.id, len(updates), reason)
