"""The delivery engine: claims due recipients from the spool in a bounded window, groups them per
destination and message, and hands them to the primaries over a few cached connections per
destination, with slow start.

What it does not do: decide health (monitor/probe.py), route (route.py), speak SMTP (relay.py). What it
promises: nothing is claimed for a destination that is DOWN; a recipient's 250 is recorded in its own
commit at once; a bounce or expiry is recorded in the same commit as its DSN; an unknown error defers.
A `spool.record` refused with SpoolUnavailable (the database restarting, SQLite busy) is tried again,
the same outcomes and the same DSNs, with a short backoff while the lease is ours (renewed meanwhile);
before each new try the recipients are read back, so a first try that did commit (its reply lost) is
never written twice. Any other failure (LeaseLost, SpoolError, the lease running out, a stop) is logged
and the lease simply runs out, so the recipients come back: at worst a duplicate, never a loss.

Fairness: the spool hands out due recipients in order of due time, so new mail (due on arrival) and
retries (due at their backoff) interleave; a destination never holds more than half the window, so a
backlog at one primary cannot starve the others; a destination leaving DOWN is flushed, oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from random import Random
from types import MappingProxyType
from typing import Protocol

from backupmx.clock import Clock, SystemClock, wait_event_or_timeout
from backupmx.config import Config
from backupmx.delivery.backoff import JITTER, clamp_due, clock_went_back, next_attempt_at
from backupmx.delivery.bounce import DsnAction, DsnRecipient, build_dsn, dsn_owed, original_for_dsn
from backupmx.delivery.relay import (
    BODY_CHUNK,
    ConnectFailed,
    RelaySession,
    RelaySettings,
    StoredBody,
    TransactionResult,
)
from backupmx.delivery.retention import RetentionPolicy
from backupmx.delivery.route import Route, RouteResolver, RouteSource, Target
from backupmx.errors import LeaseLost, RouteError, SpoolError, SpoolUnavailable
from backupmx.maillog import MailLog
from backupmx.model import Bounced, Deferred, Delivered, MessageKind, MessageRecord, Outcome, RecipientRecord
from backupmx.monitor import DestinationState
from backupmx.reply import Reply
from backupmx.spool import Claim, NewMessage, OutagePeriod, RecipientUpdate, Spool

log = logging.getLogger("backupmx.delivery")

try:  # the spool's fault-injection hook, for kill tests
    from backupmx.spool.faults import fault_point
except ImportError:  # pragma: no cover - the module ships with the spool
    def fault_point(name: str) -> None:
        return None

POLL = 5.0  # longest sleep: a flush from the CLI (another process) is seen within this
CACHE_IDLE = 5.0  # seconds an idle cached connection is kept
MAX_RCPTS_PER_TRANSACTION = 100  # RFC 5321 §4.5.3.1.8: a server must accept at least 100
SWEEP_INTERVAL = 60.0  # how often DOWN destinations are checked for expiry and delay notices
SWEEP_BATCH = 500
OUTAGE_CACHE_TTL = 30.0
RECORD_RETRY_FIRST = 0.2  # a record refused with SpoolUnavailable: first wait before trying again,
RECORD_RETRY_MAX = 2.0  # doubling up to this
RECORD_LEASE_MARGIN = 1.0  # stop trying again this long (at most a fifth of the lease) before it runs out
RECORD_STOP_GRACE = 10.0  # after stop(), how long a record may still be tried again
_REAL_CLOCK = SystemClock()  # run_once waits for workers in real time, whatever clock the engine has


class Monitor(Protocol):
    """What the engine needs from monitor.probe.HealthMonitor."""

    def is_deliverable(self, domain: str) -> bool: ...
    def in_recovery_guard(self, domain: str, now: float | None = None) -> bool: ...
    def subscribe(self, callback: Callable[[str, DestinationState, DestinationState], None]) -> None: ...
    async def report_delivery(self, domain: str, *, ok: bool, error: str | None = None) -> None: ...


# --- statistics ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DestinationStatistics:
    domain: str
    concurrency: int  # current connection limit (slow start)
    connections: int  # sessions working now
    cached: int  # idle sessions kept open
    in_flight: int  # transactions under way
    queued: int  # recipients claimed into memory, waiting for a connection
    delivered: int
    deferred: int
    bounced: int
    expired: int
    held: int
    reroute: str | None  # "host:port, ..." while the operator reroutes this destination


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    window: int  # recipients that may be claimed into memory at most
    claimed: int  # recipients in memory now
    delivered: int
    deferred: int
    bounced: int
    expired: int
    held: int
    dsns_queued: int
    destinations: Mapping[str, DestinationStatistics]


# --- in-memory work ------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Job:
    claim: Claim  # one message, the recipients of one destination (at most MAX_RCPTS_PER_TRANSACTION)
    domain: str
    lease_ends: float = 0.0  # time.monotonic() when the lease runs out (as of the last claim or renewal)

    @property
    def size(self) -> int:
        return len(self.claim.recipients)


@dataclass(eq=False)
class _Destination:
    domain: str
    cwnd: float
    queue: deque[_Job] = field(default_factory=deque)
    connections: int = 0
    in_flight: int = 0
    cache: list[tuple[RelaySession, float]] = field(default_factory=list)  # (session, idle since)
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    held: int = 0

    @property
    def queued(self) -> int:
        return sum(j.size for j in self.queue)


class DeliveryEngine:
    """Run with `await engine.run()` (until `await engine.stop()`), after `await monitor.open()`.

    `run_once()` makes one complete pass (claim everything due now, deliver it, wait for the results)
    and returns; tests drive the engine with it and a FakeClock."""

    def __init__(self, config: Config, spool: Spool, clock: Clock, maillog: MailLog, monitor: Monitor,
                 resolver: RouteResolver, *, owner: str | None = None, rng: Random | None = None) -> None:
        self._config = config
        self._d = config.delivery
        self._spool = spool
        self._clock = clock
        self._maillog = maillog
        self._monitor = monitor
        self._resolver = resolver
        self._owner = owner or config.server.node
        self._rng = rng or Random()
        self._retention = RetentionPolicy(self._d.retention, self._d.retention_cap)
        self._lease = self._d.lease.total_seconds()
        self._window = self._d.window
        self._refill_at = max(1, self._window // 4)  # a destination's queue length that asks for more
        self._dests: dict[str, _Destination] = {}
        self._jobs: set[_Job] = set()
        self._reroutes: dict[str, tuple[Target, ...]] = {}
        self._flush_pending: set[str] = set()
        self._outage_cache: dict[str, tuple[float, list[OutagePeriod]]] = {}
        self._delay_sent: set[str] = set()  # message IDs with a delay DSN queued by this process
        self._kick = asyncio.Event()
        self._stopping = False
        self._stopped_at: float | None = None  # time.monotonic() at stop()
        self._tg: asyncio.TaskGroup | None = None
        self._last_sweep = float("-inf")
        self._jump_flushed_at: float | None = None
        self._last_pass_at: float | None = None  # the clock at the last pass, to see it go backwards
        # how far ahead a stored due time may lie: a backoff, or the lease of a recipient in flight
        self._due_horizon = max(self._d.retry_max.total_seconds() * (1.0 + JITTER), self._lease) + 1.0
        self._totals = {"delivered": 0, "deferred": 0, "bounced": 0, "expired": 0, "held": 0, "dsns": 0}
        for name in sorted(config.domain_names):
            self._dest(name)  # every protected destination shows in statistics(), even before mail
        monitor.subscribe(self._on_state)

    # -- public API ----------------------------------------------------------------------------------
    def wake(self, domain: str | None = None) -> None:
        """New mail queued, a flush, a release: look at the spool now instead of after the sleep."""
        self._kick.set()

    def set_reroute(self, domain: str, hosts: list[tuple[str, int]] | None) -> None:
        """Deliver `domain`'s mail to `hosts` instead of its primary (None: back to normal). A rerouted
        destination is delivered even while its primary is DOWN."""
        domain = domain.lower()
        if hosts:
            self._reroutes[domain] = tuple(Target(h, p, h if _is_ip(h) else None) for h, p in hosts)
        else:
            self._reroutes.pop(domain, None)
        dest = self._dests.get(domain)
        if dest is not None:
            self._drop_cache(dest)
        self.wake(domain)

    def statistics(self) -> EngineStatistics:
        dests = {
            name: DestinationStatistics(
                name, int(d.cwnd), d.connections, len(d.cache), d.in_flight, d.queued, d.delivered,
                d.deferred, d.bounced, d.expired, d.held,
                ", ".join(t.label for t in self._reroutes[name]) if name in self._reroutes else None)
            for name, d in self._dests.items()
        }
        t = self._totals
        return EngineStatistics(self._window, sum(j.size for j in self._jobs), t["delivered"], t["deferred"],
                                t["bounced"], t["expired"], t["held"], t["dsns"], MappingProxyType(dests))

    async def run(self) -> None:
        """Until `stop()`; a `stop()` that came first is not lost (run returns at once)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._renew_loop())
                while not self._stopping:
                    try:
                        claimed = await self._pass()
                        timeout = await self._sleep_time(claimed)
                    except Exception:  # the spool is unavailable, say: keep going, never crash
                        log.exception("delivery pass failed")
                        timeout = POLL
                    await self._wait(timeout)
                await self._release_queued()
        finally:
            self._tg = None
            await self._close_cache()

    async def stop(self) -> None:
        """Stop claiming, give back what is not started, let transactions under way finish."""
        self._stopping = True
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._kick.set()

    async def run_once(self) -> int:
        """Claim and deliver everything due now; return the number of recipients given an outcome."""
        before = sum(self._totals[k] for k in ("delivered", "deferred", "bounced", "expired", "held"))
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._last_sweep = float("-inf")
            while True:
                claimed = await self._pass()
                if claimed == 0 and not self._jobs:
                    break
                if claimed == 0:
                    await self._wait(1.0, real=True)
        self._tg = None
        await self._close_cache()
        return sum(self._totals[k] for k in ("delivered", "deferred", "bounced", "expired", "held")) - before

    # -- the loop ------------------------------------------------------------------------------------
    async def _pass(self) -> int:
        self._kick.clear()  # a kick from here on (a worker finishing, a wake) ends the next wait early
        now = self._clock.now()
        for domain in sorted(self._flush_pending):
            n = await self._spool.flush(domain, now=now)
            self._flush_pending.discard(domain)  # only once done: a failed flush is tried again
            log.info("%s left DOWN: %d recipients made due", domain, n)
        if now - self._last_sweep >= SWEEP_INTERVAL:
            self._last_sweep = now
            await self._sweep_down(now)
        self._expire_cache()
        for dest in self._dests.values():
            if dest.queue and not self._deliverable(dest.domain):
                await self._release_dest_queue(dest)
        claimed = await self._claim(now)
        for dest in list(self._dests.values()):
            self._dispatch(dest)
        return claimed

    async def _sleep_time(self, claimed: int) -> float:
        now = self._clock.now()
        due = await self._spool.next_due_at()
        if self._clock_went_back(due, now, self._last_pass_at):
            # due times (and leases) computed before the jump lie far ahead: make the queue due again,
            # once per jump; our own leases come right at the next renewal
            last = self._jump_flushed_at
            if last is None or now < last or now - last > self._due_horizon:
                log.warning("the clock went backwards: making the queue due again")
                await self._spool.flush(None, now=now)  # if this fails, the next pass sees the jump again
                self._jump_flushed_at = self._last_pass_at = now
                return 0.0
        self._last_pass_at = now
        if due is None or (due <= now and claimed == 0):
            return POLL  # nothing, or only what we cannot take now (DOWN, window full)
        due = clamp_due(due, now, maximum=self._d.retry_max)
        return min(max(due - now, 0.0), POLL)

    def _clock_went_back(self, due: float | None, now: float, seen: float | None) -> bool:
        """Seen: the clock reads earlier than at the last pass by more than any backoff. Inferred (a jump
        while we were not running): the earliest due time lies further ahead than anything we store
        could put it. That is a backoff (up to `retry_max` + jitter) or, for a recipient in flight, the
        end of its lease (up to `lease` ahead, which may be the longer: next_due_at counts it)."""
        if seen is not None and clock_went_back(seen, now, maximum=self._d.retry_max):
            return True
        return due is not None and due > now + self._due_horizon

    async def _wait(self, timeout: float, *, real: bool = False) -> None:
        await wait_event_or_timeout(_REAL_CLOCK if real else self._clock, self._kick, timeout)

    def _deliverable(self, domain: str) -> bool:
        return domain in self._reroutes or self._monitor.is_deliverable(domain)

    def _dest(self, domain: str) -> _Destination:
        dest = self._dests.get(domain)
        if dest is None:
            dest = _Destination(domain, float(self._d.concurrency_initial))
            self._dests[domain] = dest
        return dest

    async def _claim(self, now: float) -> int:
        room = self._window - sum(j.size for j in self._jobs)
        if room <= 0 or self._stopping:
            return 0
        per_dest_cap = max(1, self._window // 2)
        exclude = {d for d in self._config.domain_names if not self._deliverable(d)}
        exclude |= {name for name, d in self._dests.items() if d.queued >= per_dest_cap}
        claims = await self._spool.claim_due(now=now, owner=self._owner, lease_seconds=self._lease,
                                             limit=room, exclude_domains=sorted(exclude))
        mono = time.monotonic()
        count = 0
        give_back: list[Claim] = []
        for claim in claims:
            by_domain: dict[str, list[RecipientRecord]] = {}
            for r in claim.recipients:
                by_domain.setdefault(r.domain.lower(), []).append(r)
            for domain, rcpts in by_domain.items():
                for i in range(0, len(rcpts), MAX_RCPTS_PER_TRANSACTION):
                    part = dataclasses.replace(claim, recipients=tuple(rcpts[i:i + MAX_RCPTS_PER_TRANSACTION]))
                    if not self._deliverable(domain):
                        give_back.append(part)  # went DOWN since the claim
                        continue
                    job = _Job(part, domain, mono + min(part.lease_until - now, self._lease))
                    self._jobs.add(job)
                    self._dest(domain).queue.append(job)
                    count += job.size
        if give_back:
            await self._spool.release(give_back)
        return count

    def _dispatch(self, dest: _Destination) -> None:
        """Start connections up to the destination's current limit, never more than there is work for
        (a connection that is not in a transaction will take the next waiting job)."""
        if self._tg is None or self._stopping:
            return
        limit = max(1, int(dest.cwnd))
        while dest.queue and dest.connections < limit and dest.connections - dest.in_flight < len(dest.queue):
            dest.connections += 1
            self._tg.create_task(self._worker(dest))

    # -- a connection's life ---------------------------------------------------------------------------
    async def _worker(self, dest: _Destination) -> None:
        session: RelaySession | None = None
        try:
            while dest.queue and not self._stopping:
                if not self._deliverable(dest.domain):
                    await self._release_dest_queue(dest)
                    break
                if session is None or not session.usable:
                    session = self._from_cache(dest)
                if session is None:
                    session = await self._connect(dest)
                    if session is None:
                        break
                if not dest.queue:
                    break
                job = dest.queue.popleft()
                if len(dest.queue) == self._refill_at:
                    # claim more while the connections still have work, instead of when the queue is
                    # empty and every connection waits for the claim (a stall per window of messages)
                    self._kick.set()
                try:
                    await self._deliver(dest, session, job)
                finally:
                    self._jobs.discard(job)
                if not session.usable or session.transactions >= self._d.messages_per_connection:
                    await session.quit()
                    session = None
                self._dispatch(dest)  # slow start: the limit may have grown
        except Exception:
            log.exception("delivery worker for %s failed", dest.domain)
            if session is not None:
                session.abort()
                session = None
        finally:
            dest.connections -= 1
            if session is not None:
                self._to_cache(dest, session)
            self._kick.set()

    async def _route(self, domain: str) -> Route:
        reroute = self._reroutes.get(domain)
        if reroute is not None:
            return Route(domain, reroute, RouteSource.REROUTE)
        return await self._resolver.resolve(domain)

    async def _connect(self, dest: _Destination) -> RelaySession | None:
        """A new session, or None after the waiting jobs were dealt with (deferred or bounced)."""
        rerouted = dest.domain in self._reroutes
        try:
            route = await self._route(dest.domain)
        except RouteError as e:
            await self._fail_queue(dest, Deferred(Reply(451, "4.4.3", str(e))), relay=None)
            return None
        if route.failure is not None:
            await self._fail_queue(dest, Bounced(route.failure), relay=None)
            return None
        settings = RelaySettings.from_config(self._config, dest.domain)
        try:
            return await RelaySession.open(route.targets, settings)
        except ConnectFailed as e:
            dest.cwnd = max(1.0, dest.cwnd / 2)
            if not rerouted:
                await self._monitor.report_delivery(dest.domain, ok=False, error=e.reply.text)
            relay = e.target.label if e.target else None
            await self._fail_queue(dest, Deferred(e.reply), relay=relay)
            return None

    def _from_cache(self, dest: _Destination) -> RelaySession | None:
        while dest.cache:
            session, _ = dest.cache.pop()
            if session.usable:
                return session
            session.abort()
        return None

    def _to_cache(self, dest: _Destination, session: RelaySession) -> None:
        if (session.usable and not self._stopping and session.transactions < self._d.messages_per_connection
                and dest.connections + len(dest.cache) < max(1, int(dest.cwnd))
                and self._deliverable(dest.domain)):
            dest.cache.append((session, time.monotonic()))
        else:
            self._spawn_quit(session)

    def _spawn_quit(self, session: RelaySession) -> None:
        if self._tg is not None:
            self._tg.create_task(session.quit())
        else:
            session.abort()

    def _expire_cache(self) -> None:
        cutoff = time.monotonic() - CACHE_IDLE
        for dest in self._dests.values():
            keep = []
            for session, since in dest.cache:
                if since < cutoff or not session.usable:
                    self._spawn_quit(session)
                else:
                    keep.append((session, since))
            dest.cache = keep

    def _drop_cache(self, dest: _Destination) -> None:
        for session, _ in dest.cache:
            self._spawn_quit(session)
        dest.cache = []

    async def _close_cache(self) -> None:
        sessions = [s for d in self._dests.values() for s, _ in d.cache]
        for d in self._dests.values():
            d.cache = []
        await asyncio.gather(*(s.quit() for s in sessions), return_exceptions=True)

    # -- one transaction -------------------------------------------------------------------------------
    async def _deliver(self, dest: _Destination, session: RelaySession, job: _Job) -> None:
        msg = job.claim.message
        # streamed from the spool while it is sent (bounded memory); an unreadable body ends the
        # transaction without the final dot, as a deferral
        body = StoredBody(msg.size, lambda: self._spool.iter_body(msg.id, BODY_CHUNK))
        dest.in_flight += 1
        try:
            # the renew loop keeps the lease alive meanwhile: the job stays in self._jobs until recorded
            result = await session.deliver(msg.envelope, job.claim.recipients, body)
        finally:
            dest.in_flight -= 1
        if any(isinstance(o, Delivered) for o in result.outcomes):
            fault_point("delivery.after_remote_250")
        await self._record(dest, job, result)

    async def _record(self, dest: _Destination, job: _Job, result: TransactionResult) -> None:
        now = self._clock.now()
        msg = job.claim.message
        protected = self._config.domain(dest.domain) is not None
        rerouted = dest.domain in self._reroutes
        guard = protected and not rerouted and self._monitor.in_recovery_guard(dest.domain, now)
        outages = await self._outages(dest.domain, now)
        updates: list[RecipientUpdate] = []
        failed: list[DsnRecipient] = []
        relayed: list[DsnRecipient] = []
        delayed: list[DsnRecipient] = []
        events: list[tuple[str, RecipientRecord, Outcome, str]] = []
        delay_due = self._delay_warning_due(msg, now)
        for rcpt, outcome in zip(job.claim.recipients, result.outcomes, strict=True):
            if isinstance(outcome, Bounced) and guard:
                outcome = Deferred(outcome.reply, guard_hold=True)
            if isinstance(outcome, Delivered):
                updates.append(RecipientUpdate(msg.id, rcpt.index, outcome))
                events.append(("delivered", rcpt, outcome, ""))
                if not result.dsn_offered and dsn_owed(msg.envelope, rcpt.notify, DsnAction.RELAYED):
                    relayed.append(DsnRecipient(rcpt, DsnAction.RELAYED, "2.0.0", outcome.reply,
                                                result.remote_mta, now))
            elif isinstance(outcome, Bounced):
                updates.append(RecipientUpdate(msg.id, rcpt.index, outcome))
                events.append(("bounced", rcpt, outcome, ""))
                if dsn_owed(msg.envelope, rcpt.notify, DsnAction.FAILED):
                    failed.append(DsnRecipient(rcpt, DsnAction.FAILED, outcome.reply.status or "5.0.0",
                                               outcome.reply, result.remote_mta, now))
            elif outcome.guard_hold:
                updates.append(RecipientUpdate(msg.id, rcpt.index, outcome, next_attempt_at=now))
                events.append(("held", rcpt, outcome, "recovery-guard"))
            elif self._retention.expired(msg.received_at, now, outages):
                updates.append(RecipientUpdate(msg.id, rcpt.index, outcome, expire=True))
                events.append(("expired", rcpt, outcome, ""))
                if dsn_owed(msg.envelope, rcpt.notify, DsnAction.FAILED):
                    failed.append(DsnRecipient(rcpt, DsnAction.FAILED, "4.4.7", None, result.remote_mta, now,
                                               detail=f"delivery time expired; last reply: {outcome.reply}"))
            else:
                retry_at = next_attempt_at(now, rcpt.attempts + 1, minimum=self._d.retry_min,
                                           maximum=self._d.retry_max, rng=self._rng)
                notify = delay_due and dsn_owed(msg.envelope, rcpt.notify, DsnAction.DELAYED)
                updates.append(RecipientUpdate(msg.id, rcpt.index, outcome, next_attempt_at=retry_at,
                                               delay_notified=notify))
                events.append(("deferred", rcpt, outcome, ""))
                if notify:
                    delayed.append(DsnRecipient(
                        rcpt, DsnAction.DELAYED, outcome.reply.status or "4.0.0", None, result.remote_mta, now,
                        will_retry_until=self._retention.expires_at(msg.received_at, now, outages),
                        detail=f"delivery temporarily suspended: {outcome.reply}"))
        dsns = await self._build_dsns(msg, [failed, relayed, delayed], now)
        if delayed:
            self._delay_sent.add(str(msg.id))
        if not await self._record_outcomes(job, updates, dsns, now):
            return
        self._account(dest, msg, result, events, now)
        if dsns:
            self._totals["dsns"] += len(dsns)
            self.wake()
        await self._feedback(dest, result, rerouted)

    async def _record_outcomes(self, job: _Job, updates: list[RecipientUpdate], dsns: list[NewMessage],
                               now: float) -> bool:
        """`spool.record` for one job; True once the outcomes are committed (by this call or, its reply
        lost, by an earlier try). While the database is unavailable the same updates and DSNs are tried
        again, with a short backoff, as long as the lease is ours (renewed here too: the renew loop stops
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
            return True
        except LeaseLost as e:
            log.warning("%s: lease lost before recording (%s); the recipients come back later", msg_id, e)
            return False
        except SpoolUnavailable as e:
            log.warning("%s: recording outcomes failed (%s); trying again while the lease lasts", msg_id, e)
        except Exception:
            log.exception("%s: recording outcomes failed; the lease will run out and they come back", msg_id)
            return False
        # renewals could keep the lease forever (a database that renews but refuses the record): bounded
        give_up_at = time.monotonic() + self._lease - margin
        while True:
            await asyncio.sleep(max(0.0, min(delay, min(job.lease_ends - margin, give_up_at) - time.monotonic())))
            delay = min(delay * 2.0, RECORD_RETRY_MAX)
            mono = time.monotonic()
            if mono >= min(job.lease_ends - margin, give_up_at):
                log.warning("%s: outcomes not recorded after %d tries, the lease runs out; the recipients"
                            " come back (a duplicate at worst)", msg_id, tries)
                return False
            if self._stopped_at is not None and mono >= self._stopped_at + RECORD_STOP_GRACE:
                log.warning("%s: outcomes not recorded after %d tries, stopping; the recipients come back"
                            " when the lease runs out", msg_id, tries)
                return False
            try:
                done = await self._recorded(job, updates)
                if done is None:
                    return False
                if done:
                    log.info("%s: outcomes found recorded by an earlier try (its reply was lost)", msg_id)
                    return True
                await self._spool.renew([job.claim], now=self._clock.now(), lease_seconds=self._lease)
                job.lease_ends = mono + self._lease
                tries += 1
                await self._spool.record(self._owner, updates, dsns, now=now)
            except LeaseLost as e:
                log.warning("%s: lease lost while trying to record again (%s); the recipients come back later",
                            msg_id, e)
                return False
            except SpoolUnavailable:
                continue
            except Exception:
                log.exception("%s: recording outcomes failed; the lease will run out and they come back", msg_id)
                return False
            log.info("%s: outcomes recorded after %d tries", msg_id, tries)
            return True

    async def _recorded(self, job: _Job, updates: Sequence[RecipientUpdate]) -> bool | None:
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
        log.warning("%s: some recipients changed while their outcomes waited to be recorded; left as they are",
                    job.claim.message.id)
        return None

    async def _build_dsns(self, msg: MessageRecord, groups: Sequence[list[DsnRecipient]], now: float
                          ) -> list[NewMessage]:
        if not any(groups):
            return []
        original = await original_for_dsn(self._spool, msg)  # never raises; headers only unless RET=FULL
        out: list[NewMessage] = []
        for entries in groups:
            if entries:
                out.append(build_dsn(msg, entries, original=original, reporting_mta=self._config.server.hostname,
                                     now=now))
        return out

    def _delay_warning_due(self, msg: MessageRecord, now: float) -> bool:
        warn = self._d.delay_warning
        if warn is None or str(msg.id) in self._delay_sent:
            return False
        if any(r.delay_notified for r in msg.recipients):
            return False  # at most one delay notice per message
        return now - msg.received_at >= warn.total_seconds()

    def _account(self, dest: _Destination, msg: MessageRecord, result: TransactionResult,
                 events: list[tuple[str, RecipientRecord, Outcome, str]], now: float) -> None:
        kind = None if msg.kind is MessageKind.USER else msg.kind.value  # DSNs, canaries: never user mail
        for event, rcpt, outcome, reason in events:
            attr = {"delivered": "delivered", "bounced": "bounced", "held": "held", "expired": "expired",
                    "deferred": "deferred"}[event]
            setattr(dest, attr, getattr(dest, attr) + 1)
            self._totals[attr] += 1
            reply = outcome.reply
            self._maillog.event(
                event, str(msg.id), to=f"<{rcpt.address}>", relay=result.relay,
                delay=f"{max(now - msg.received_at, 0.0):.1f}", attempts=rcpt.attempts + 1,
                dsn=reply.status or None, reply=str(reply), reason=reason or None, kind=kind)

    async def _feedback(self, dest: _Destination, result: TransactionResult, rerouted: bool) -> None:
        """Slow start: +1 connection per `cwnd` good transactions; -1 on a 4xx; halve on 421/timeouts."""
        d = self._d
        if result.timed_out or any(isinstance(o, Deferred) and o.reply.code == 421 for o in result.outcomes):
            dest.cwnd = max(1.0, dest.cwnd / 2)
        elif any(isinstance(o, Deferred) and 400 <= o.reply.code < 500 for o in result.outcomes):
            dest.cwnd = max(1.0, dest.cwnd - 1)
        elif result.final_reply is not None and result.final_reply.code // 100 == 2:
            dest.cwnd = min(float(d.concurrency_max), dest.cwnd + 1.0 / max(dest.cwnd, 1.0))
        if rerouted:
            return
        if any(isinstance(o, Delivered) for o in result.outcomes):
            await self._monitor.report_delivery(dest.domain, ok=True)

    async def _fail_queue(self, dest: _Destination, outcome: Deferred | Bounced, *, relay: str | None) -> None:
        """The destination cannot be reached now: every waiting job gets the same outcome, in one commit
        per message (no attempt per message against a dead host, as Postfix does)."""
        jobs = list(dest.queue)
        dest.queue.clear()
        label = relay or "none"
        for n, job in enumerate(jobs):
            if not self._deliverable(dest.domain):
                # the monitor has just declared the destination DOWN: no attempt is counted for the rest
                rest = jobs[n:]
                for j in rest:
                    self._jobs.discard(j)
                await self._spool.release([j.claim for j in rest])
                return
            try:
                outcomes = tuple(outcome for _ in job.claim.recipients)
                result = TransactionResult(outcomes, label, relay.rsplit(":", 1)[0] if relay else "", False,
                                           timed_out=False)
                await self._record(dest, job, result)
            finally:
                self._jobs.discard(job)

    async def _release_dest_queue(self, dest: _Destination) -> None:
        jobs = list(dest.queue)
        dest.queue.clear()
        for job in jobs:
            self._jobs.discard(job)
        if jobs:
            await self._spool.release([j.claim for j in jobs])

    async def _release_queued(self) -> None:
        claims: list[Claim] = []
        for dest in self._dests.values():
            for job in dest.queue:
                claims.append(job.claim)
                self._jobs.discard(job)
            dest.queue.clear()
        if claims:
            with contextlib.suppress(Exception):
                await self._spool.release(claims)

    # -- leases -----------------------------------------------------------------------------------------
    async def _renew_loop(self) -> None:
        every = max(self._lease / 3.0, 0.2)
        while not self._stopping:
            await self._wait_renew(every)
            if self._stopping:
                break
            jobs = list(self._jobs)
            if not jobs:
                continue
            now = self._clock.now()
            mono = time.monotonic()
            try:
                await self._spool.renew([j.claim for j in jobs], now=now, lease_seconds=self._lease)
                for job in jobs:
                    job.lease_ends = mono + self._lease
            except LeaseLost:
                for job in jobs:  # find the ones taken over; they are someone else's now
                    try:
                        await self._spool.renew([job.claim], now=now, lease_seconds=self._lease)
                        job.lease_ends = mono + self._lease
                    except LeaseLost:
                        self._forget(job)
                    except Exception:
                        log.exception("renewing a lease")
            except Exception:
                log.exception("renewing leases")

    async def _wait_renew(self, seconds: float) -> None:
        # real time: a lease protects against other nodes, whose clocks are real
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.2, end - time.monotonic()))

    def _forget(self, job: _Job) -> None:
        self._jobs.discard(job)
        dest = self._dests.get(job.domain)
        if dest is not None and job in dest.queue:
            dest.queue.remove(job)

    # -- DOWN destinations: expiry at the hard cap and delay notices, without delivery attempts --------
    async def _sweep_down(self, now: float) -> None:
        for domain in sorted(self._config.domain_names):
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
        outages = await self._outages(domain, now, fresh=True)
        dest = self._dest(domain)
        give_back: list[Claim] = []
        for claim in claims:
            msg = claim.message
            delay_due = self._delay_warning_due(msg, now)
            updates: list[RecipientUpdate] = []
            failed: list[DsnRecipient] = []
            delayed: list[DsnRecipient] = []
            events: list[tuple[str, RecipientRecord, Outcome, str]] = []
            untouched: list[RecipientRecord] = []
            down = Reply(451, "4.4.1", f"primary of {domain} is down (outage declared)")
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
            dsns = await self._build_dsns(msg, [failed, delayed], now)
            if delayed:
                self._delay_sent.add(str(msg.id))
            try:
                await self._spool.record(self._owner, updates, dsns, now=now)
            except Exception:
                log.exception("%s: recording the sweep's outcomes failed", msg.id)
                continue
            result = TransactionResult(tuple(o for _, _, o, _ in events), "none", "", False)
            self._account(dest, msg, result, events, now)
            self._totals["dsns"] += len(dsns)
        if give_back:
            await self._spool.release(give_back)

    async def _outages(self, domain: str, now: float, *, fresh: bool = False) -> list[OutagePeriod]:
        if self._config.domain(domain) is None:
            return []
        cached = self._outage_cache.get(domain)
        mono = time.monotonic()
        if cached is not None and not fresh and mono - cached[0] < OUTAGE_CACHE_TTL:
            return cached[1]
        try:
            periods = await self._spool.outages(domain)
        except Exception:
            log.exception("reading outages of %s", domain)
            return cached[1] if cached else []
        self._outage_cache[domain] = (mono, periods)
        return periods

    # -- monitor events ---------------------------------------------------------------------------------
    def _on_state(self, domain: str, old: DestinationState, new: DestinationState) -> None:
        domain = domain.lower()
        self._outage_cache.pop(domain, None)
        dest = self._dest(domain)
        if new is DestinationState.DOWN:
            self._drop_cache(dest)
        elif old is DestinationState.DOWN:
            dest.cwnd = float(self._d.concurrency_initial)  # a recovered primary starts small
            self._flush_pending.add(domain)
        self._kick.set()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
