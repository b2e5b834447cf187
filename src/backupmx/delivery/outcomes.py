"""Recording an outcome: turns one transaction's result into recipient updates and DSNs (`plan`, a pure
function), writes them with `spool.record`, then counts and logs them.

A `spool.record` refused with SpoolUnavailable (the database restarting, SQLite busy) is tried again,
the same outcomes and the same DSNs, with a short backoff while the lease is ours (renewed meanwhile);
before each new try the recipients are read back, so a first try that did commit (its reply lost) is
never written twice. Any other failure is logged and the lease simply runs out: the recipients come
back, at worst a duplicate, never a loss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from random import Random

from backupmx.clock import Clock
from backupmx.config import Config
from backupmx.delivery.backoff import next_attempt_at
from backupmx.delivery.bounce import DsnAction, DsnRecipient, dsn_owed
from backupmx.delivery.notices import Notices
from backupmx.delivery.outages import OutageCache
from backupmx.delivery.relay import TransactionResult
from backupmx.delivery.retention import RetentionPolicy
from backupmx.delivery.statistics import Totals
from backupmx.delivery.work import Destination, Job
from backupmx.errors import LeaseLost, SpoolError, SpoolFullError, SpoolUnavailable
from backupmx.maillog import MailLog
from backupmx.model import Bounced, Deferred, Delivered, MessageKind, MessageRecord, Outcome, QueueId, RecipientRecord
from backupmx.spool import NewMessage, OutagePeriod, RecipientUpdate, Spool

log = logging.getLogger("backupmx.delivery")

RECORD_RETRY_FIRST = 0.2  # a record refused with SpoolUnavailable: first wait before trying again,
RECORD_RETRY_MAX = 2.0  # doubling up to this
RECORD_LEASE_MARGIN = 1.0  # stop trying again this long (at most a fifth of the lease) before it runs out
RECORD_STOP_GRACE = 10.0  # after stop(), how long a record may still be tried again

try:  # the spool's fault-injection hook, for kill tests
    from backupmx.spool.faults import fault_point
except ImportError:  # pragma: no cover - the module ships with the spool

    def fault_point(name: str) -> None:
        return None


class Recorded(StrEnum):
    COMMITTED = "committed"  # every outcome of the job is in the spool
    WITH_DSNS = "with-dsns"  # committed, and DSNs were queued (deliver them now)
    LEFT = "left"  # not recorded: lease lost or ran out, spool unavailable or full; the recipients come back
    FAILED = "failed"  # not recorded: an unexpected error (counted toward the poison limit)

    @property
    def committed(self) -> bool:
        return self in (Recorded.COMMITTED, Recorded.WITH_DSNS)


Event = tuple[str, RecipientRecord, Outcome, str]  # (event, recipient, outcome, reason) for the mail log


@dataclass(slots=True)
class Plan:
    """What one transaction's result means for the spool: updates, and the recipients owed a DSN."""

    updates: list[RecipientUpdate] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    failed: list[DsnRecipient] = field(default_factory=list)
    relayed: list[DsnRecipient] = field(default_factory=list)
    delayed: list[DsnRecipient] = field(default_factory=list)


def plan(
    msg: MessageRecord,
    recipients: Sequence[RecipientRecord],
    result: TransactionResult,
    *,
    now: float,
    guard: bool,
    delay_due: bool,
    outages: Sequence[OutagePeriod],
    retention: RetentionPolicy,
    config: Config,
    rng: Random,
) -> Plan:
    """Per recipient, exactly one update: delivered, bounced (held instead under the recovery guard),
    expired (retention ran out), or deferred to its next attempt."""
    d = config.delivery
    p = Plan()
    for rcpt, outcome in zip(recipients, result.outcomes, strict=True):
        if isinstance(outcome, Bounced) and guard:
            outcome = Deferred(outcome.reply, guard_hold=True)
        if isinstance(outcome, Delivered):
            p.updates.append(RecipientUpdate(msg.id, rcpt.index, outcome))
            p.events.append(("delivered", rcpt, outcome, ""))
            if not result.dsn_offered and dsn_owed(msg.envelope, rcpt.notify, DsnAction.RELAYED):
                p.relayed.append(DsnRecipient(rcpt, DsnAction.RELAYED, "2.0.0", outcome.reply, result.remote_mta, now))
        elif isinstance(outcome, Bounced):
            p.updates.append(RecipientUpdate(msg.id, rcpt.index, outcome))
            p.events.append(("bounced", rcpt, outcome, ""))
            if dsn_owed(msg.envelope, rcpt.notify, DsnAction.FAILED):
                p.failed.append(
                    DsnRecipient(
                        rcpt, DsnAction.FAILED, outcome.reply.status or "5.0.0", outcome.reply, result.remote_mta, now
                    )
                )
        elif outcome.guard_hold:
            p.updates.append(RecipientUpdate(msg.id, rcpt.index, outcome, next_attempt_at=now))
            p.events.append(("held", rcpt, outcome, "recovery-guard"))
        elif retention.expired(msg.received_at, now, outages):
            p.updates.append(RecipientUpdate(msg.id, rcpt.index, outcome, expire=True))
            p.events.append(("expired", rcpt, outcome, ""))
            if dsn_owed(msg.envelope, rcpt.notify, DsnAction.FAILED):
                p.failed.append(
                    DsnRecipient(
                        rcpt,
                        DsnAction.FAILED,
                        "4.4.7",
                        None,
                        result.remote_mta,
                        now,
                        detail=f"delivery time expired; last reply: {outcome.reply}",
                    )
                )
        else:
            retry_at = next_attempt_at(now, rcpt.attempts + 1, minimum=d.retry_min, maximum=d.retry_max, rng=rng)
            notify = delay_due and dsn_owed(msg.envelope, rcpt.notify, DsnAction.DELAYED)
            p.updates.append(
                RecipientUpdate(msg.id, rcpt.index, outcome, next_attempt_at=retry_at, delay_notified=notify)
            )
            p.events.append(("deferred", rcpt, outcome, ""))
            if notify:
                p.delayed.append(
                    DsnRecipient(
                        rcpt,
                        DsnAction.DELAYED,
                        outcome.reply.status or "4.0.0",
                        None,
                        result.remote_mta,
                        now,
                        will_retry_until=retention.expires_at(msg.received_at, now, outages),
                        detail=f"delivery temporarily suspended: {outcome.reply}",
                    )
                )
    return p


def _not_recorded(msg_id: QueueId, e: Exception) -> Recorded:
    """In OutcomeRecorder.write's `except`, for an error no retry there cures: logged with its traceback;
    a full disk LEFT (the lease runs out, the recipients come back), anything else FAILED (counted toward
    the poison limit)."""
    log.exception("%s: recording outcomes failed; the lease will run out and they come back", msg_id)
    return Recorded.LEFT if isinstance(e, SpoolFullError) else Recorded.FAILED


class OutcomeRecorder:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        clock: Clock,
        maillog: MailLog,
        *,
        owner: str,
        lease: float,
        guard: Callable[[str, float], bool],
        outages: OutageCache,
        notices: Notices,
        totals: Totals,
        rng: Random,
        stopped_at: Callable[[], float | None],
    ) -> None:
        self._config = config
        self._spool = spool
        self._clock = clock
        self._maillog = maillog
        self._owner = owner
        self._lease = lease
        self._guard = guard  # (domain, now): a 5xx is held for review, not bounced
        self._outages = outages
        self._notices = notices
        self._totals = totals
        self._retention = RetentionPolicy(config.delivery.retention, config.delivery.retention_cap)
        self._rng = rng
        self._stopped_at = stopped_at

    async def record(self, dest: Destination, job: Job, result: TransactionResult) -> Recorded:
        """Record `result` for `job` in two steps. First the primary's 250s, alone in their commit, so that
        nothing that could fail (a DSN to build, another recipient's update) comes before them. Then every
        other outcome with the DSNs it owes, in one commit (a bounce never exists without its DSN), and
        the "relayed" DSNs of the delivered recipients. Raises only for a bug (the caller counts it toward
        the poison limit); a spool refusal is a Recorded value."""
        now = self._clock.now()
        msg = job.claim.message
        outages = await self._outages.get(dest.domain)
        p = plan(
            msg,
            job.claim.recipients,
            result,
            now=now,
            guard=self._guard(dest.domain, now),
            delay_due=self._notices.delay_due(msg, now),
            outages=outages,
            retention=self._retention,
            config=self._config,
            rng=self._rng,
        )
        delivered = [u for u in p.updates if isinstance(u.outcome, Delivered)]
        others = [u for u in p.updates if not isinstance(u.outcome, Delivered)]
        if delivered:
            status = await self.write(job, delivered, [], now)
            if status is not Recorded.COMMITTED:
                return status
            fault_point("delivery.after_delivered_commit")
            self.account(dest, msg, result.relay, [e for e in p.events if e[0] == "delivered"], now)
        if not others and not p.relayed:
            return Recorded.COMMITTED
        dsns = await self._notices.build(msg, [p.failed, p.relayed, p.delayed], now)
        fault_point("delivery.before_dsn_commit")
        status = await self.write(job, others, dsns, now)
        if status is not Recorded.COMMITTED:
            if delivered:
                log.warning(
                    "%s: delivered recipients recorded; the other outcomes and %d DSNs not (%s): those"
                    " recipients come back with their lease",
                    msg.id,
                    len(dsns),
                    status.value,
                )
            return status
        if p.delayed:
            self._notices.delay_sent(msg)  # only once committed: a failed commit tries the notice again
        self.account(dest, msg, result.relay, [e for e in p.events if e[0] != "delivered"], now)
        self._totals.counts["dsns"] += len(dsns)
        return Recorded.COMMITTED if not dsns else Recorded.WITH_DSNS

    def account(self, dest: Destination, msg: MessageRecord, relay: str, events: Sequence[Event], now: float) -> None:
        kind = None if msg.kind is MessageKind.USER else msg.kind.value  # DSNs, canaries: never user mail
        for event, rcpt, outcome, reason in events:
            self._totals.count(dest, event)
            reply = outcome.reply
            self._maillog.event(
                event,
                str(msg.id),
                to=f"<{rcpt.address}>",
                relay=relay,
                delay=f"{max(now - msg.received_at, 0.0):.1f}",
                attempts=rcpt.attempts + 1,
                dsn=reply.status or None,
                reply=str(reply),
                reason=reason or None,
                kind=kind,
            )

    async def write(self, job: Job, updates: list[RecipientUpdate], dsns: list[NewMessage], now: float) -> Recorded:
        """`spool.record` for one job; COMMITTED once the outcomes are committed (by this call or, its
        reply lost, by an earlier try), LEFT when the lease ran out or was lost (the recipients come back),
        FAILED on an unexpected error (counted toward the poison limit).
        While the database is unavailable the same updates and DSNs are tried
        again, with a short backoff, as long as the lease is ours (renewed here too: the lease keeper stops
        at stop() and does not run under run_once). Before a new try the recipients are read back: record
        is one commit, so either every updated recipient carries a new state or attempt count (the earlier
        try committed: done, nothing is written twice, no DSN queued twice) or none does (try again).
        Tries stop within one lease's time in any case."""
        msg_id = job.claim.message.id
        delay = RECORD_RETRY_FIRST
        margin = min(RECORD_LEASE_MARGIN, self._lease / 5.0)
        tries = 1
        try:
            await self._spool.record(self._owner, updates, dsns, now=now)
            return Recorded.COMMITTED
        except LeaseLost as e:
            log.warning("%s: lease lost before recording (%s); the recipients come back later", msg_id, e)
            return Recorded.LEFT
        except SpoolUnavailable as e:
            log.warning("%s: recording outcomes failed (%s); trying again while the lease lasts", msg_id, e)
        except Exception as e:
            return _not_recorded(msg_id, e)
        # renewals could keep the lease forever (a database that renews but refuses the record): bounded
        give_up_at = time.monotonic() + self._lease - margin
        while True:
            await asyncio.sleep(max(0.0, min(delay, min(job.lease_ends - margin, give_up_at) - time.monotonic())))
            delay = min(delay * 2.0, RECORD_RETRY_MAX)
            mono = time.monotonic()
            if mono >= min(job.lease_ends - margin, give_up_at):
                log.warning(
                    "%s: outcomes not recorded after %d tries, the lease runs out; the recipients"
                    " come back (a duplicate at worst)",
                    msg_id,
                    tries,
                )
                return Recorded.LEFT
            stopped_at = self._stopped_at()
            if stopped_at is not None and mono >= stopped_at + RECORD_STOP_GRACE:
                log.warning(
                    "%s: outcomes not recorded after %d tries, stopping; the recipients come back"
                    " when the lease runs out",
                    msg_id,
                    tries,
                )
                return Recorded.LEFT
            try:
                done = await self._recorded(job, updates)
                if done is None:
                    return Recorded.LEFT
                if done:
                    log.info("%s: outcomes found recorded by an earlier try (its reply was lost)", msg_id)
                    return Recorded.COMMITTED
                await self._spool.renew([job.claim], now=self._clock.now(), lease_seconds=self._lease)
                job.lease_ends = mono + self._lease
                tries += 1
                await self._spool.record(self._owner, updates, dsns, now=now)
            except LeaseLost as e:
                log.warning(
                    "%s: lease lost while trying to record again (%s); the recipients come back later", msg_id, e
                )
                return Recorded.LEFT
            except SpoolUnavailable:
                continue
            except Exception as e:
                return _not_recorded(msg_id, e)
            log.info("%s: outcomes recorded after %d tries", msg_id, tries)
            return Recorded.COMMITTED

    async def write_once(self, updates: list[RecipientUpdate], dsns: list[NewMessage], now: float) -> Recorded:
        """`spool.record` once, no retry (the sweep: its next run tries again)."""
        try:
            await self._spool.record(self._owner, updates, dsns, now=now)
            return Recorded.COMMITTED
        except (LeaseLost, SpoolUnavailable, SpoolFullError) as e:
            log.warning("%s: recording the sweep's outcomes failed (%s)", updates[0].message_id, e)
            return Recorded.LEFT
        except Exception:
            log.exception("%s: recording the sweep's outcomes failed", updates[0].message_id)
            return Recorded.FAILED

    async def _recorded(self, job: Job, updates: Sequence[RecipientUpdate]) -> bool | None:
        """Whether `updates` are in the spool already: True (every recipient changed since the claim),
        False (none did: not recorded), None (the message is gone, or only some changed: someone else,
        an operator, acted on it; never write over that)."""
        record = await self._spool.get(job.claim.message.id)
        if record is None:
            log.warning("%s: gone from the queue while its outcomes waited to be recorded", job.claim.message.id)
            return None
        now_by_index = {r.index: r for r in record.recipients}
        claimed = {r.index: r for r in job.claim.recipients}
        changed = set()
        for u in updates:
            before, current = claimed.get(u.index), now_by_index.get(u.index)
            if before is None or current is None:
                raise SpoolError(f"{u.message_id}[{u.index}]: not a claimed recipient")
            changed.add((current.state, current.attempts) != (before.state, before.attempts))
        if changed == {True}:
            return True
        if changed == {False}:
            return False
        log.warning(
            "%s: some recipients changed while their outcomes waited to be recorded; left as they are",
            job.claim.message.id,
        )
        return None
