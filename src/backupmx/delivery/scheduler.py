"""The delivery engine: composes the parts of delivery and runs them. Claims due recipients into a
bounded window (claiming.py), queues them per destination (work.py) and hands them to the primaries over
a few cached connections per destination with slow start (connections.py), one attempt at a time
(attempt.py), recording each outcome (outcomes.py); leases are kept (leases.py) and DOWN destinations
swept (sweep.py). Statistics are snapshots (statistics.py).

What it does not do: decide health (monitor/probe.py), route (route.py), speak SMTP (relay.py). What it
promises: nothing is claimed for a destination that is DOWN; a recipient's 250 is recorded in its own
commit at once; a bounce or expiry is recorded in the same commit as its DSN; an unknown error defers.

Fairness: the spool hands out due recipients in order of due time, so new mail (due on arrival) and
retries (due at their backoff) interleave; a destination never holds more than half the window, so a
backlog at one primary cannot starve the others; a destination leaving DOWN is flushed, oldest first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine
from random import Random
from typing import Any, Protocol

from backupmx.clock import Clock, SystemClock, wait_event_or_timeout
from backupmx.config import Config
from backupmx.delivery.attempt import Attempts, Unreachable
from backupmx.delivery.backoff import JITTER, clamp_due, clock_went_back
from backupmx.delivery.claiming import Claimer
from backupmx.delivery.connections import Connections
from backupmx.delivery.leases import LeaseKeeper
from backupmx.delivery.notices import Notices
from backupmx.delivery.outages import OutageCache
from backupmx.delivery.outcomes import OutcomeRecorder, Recorded
from backupmx.delivery.poison import PoisonGuard
from backupmx.delivery.relay import RelaySession, TransactionResult
from backupmx.delivery.route import RouteResolver, Target
from backupmx.delivery.statistics import DestinationStatistics, EngineStatistics, Totals
from backupmx.delivery.sweep import SWEEP_INTERVAL, DownSweep, HeldSweep
from backupmx.delivery.work import MAX_RCPTS_PER_TRANSACTION, Destination, Job, Window
from backupmx.maillog import MailLog
from backupmx.model import Bounced, Deferred, Delivered
from backupmx.monitor import DestinationState
from backupmx.spool import Spool

__all__ = ["MAX_RCPTS_PER_TRANSACTION", "DeliveryEngine", "DestinationStatistics", "EngineStatistics", "Monitor"]

log = logging.getLogger("backupmx.delivery")

POLL = 5.0  # longest sleep: a flush from the CLI (another process) is seen within this
_REAL_CLOCK = SystemClock()  # run_once waits for workers in real time, whatever clock the engine has


class Monitor(Protocol):
    """What the engine needs from monitor.probe.HealthMonitor."""

    def is_deliverable(self, domain: str) -> bool: ...
    def in_recovery_guard(self, domain: str, now: float | None = None) -> bool: ...
    def subscribe(self, callback: Callable[[str, DestinationState, DestinationState], None]) -> None: ...
    async def report_delivery(self, domain: str, *, ok: bool, error: str | None = None) -> None: ...


class DeliveryEngine:
    """Run with `await engine.run()` (until `await engine.stop()`), after `await monitor.open()`.

    `run_once()` makes one complete pass (claim everything due now, deliver it, wait for the results)
    and returns; tests drive the engine with it and a FakeClock."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        clock: Clock,
        maillog: MailLog,
        monitor: Monitor,
        resolver: RouteResolver,
        *,
        owner: str | None = None,
        rng: Random | None = None,
    ) -> None:
        self._config = config
        self._d = d = config.delivery
        self._spool = spool
        self._clock = clock
        self._monitor = monitor
        owner = owner or config.server.node
        self._lease = lease = d.lease.total_seconds()
        self._refill_at = max(1, d.window // 4)  # a destination's queue length that asks for more
        self._reroutes: dict[str, tuple[Target, ...]] = {}
        self._flush_pending: set[str] = set()
        self._kick = asyncio.Event()
        self._stopping = False
        self._stopped_at: float | None = None  # time.monotonic() at stop()
        self._tg: asyncio.TaskGroup | None = None
        self._last_sweep = float("-inf")
        self._jump_flushed_at: float | None = None
        self._last_pass_at: float | None = None  # the clock at the last pass, to see it go backwards
        # how far ahead a stored due time may lie: a backoff, or the lease of a recipient in flight
        self._due_horizon = max(d.retry_max.total_seconds() * (1.0 + JITTER), lease) + 1.0

        protected = config.domain_names
        self._window = Window(d.window, d.concurrency_initial)
        self._totals = Totals()
        self._outages = OutageCache(config, spool)
        self._notices = Notices(config, spool)
        self._claimer = Claimer(
            spool, self._window, owner=owner, lease=lease, protected=protected, deliverable=self._deliverable
        )
        self._connections = Connections(self._window, d, self._spawn)
        self._attempts = Attempts(config, spool, resolver, self._reroutes)
        self._recorder = OutcomeRecorder(
            config,
            spool,
            clock,
            maillog,
            owner=owner,
            lease=lease,
            guard=self._guard,
            outages=self._outages,
            notices=self._notices,
            totals=self._totals,
            rng=rng or Random(),
            stopped_at=lambda: self._stopped_at,
        )
        self._poison = PoisonGuard(spool, clock, maillog, limit=d.poison_after)
        self._sweep = DownSweep(
            config,
            spool,
            self._window,
            self._recorder,
            owner=owner,
            lease=lease,
            protected=protected,
            deliverable=self._deliverable,
            outages=self._outages,
            notices=self._notices,
            totals=self._totals,
            poison=self._poison,
        )
        self._held = HeldSweep(
            config,
            spool,
            self._window,
            self._recorder,
            owner=owner,
            lease=lease,
            notices=self._notices,
            totals=self._totals,
        )
        self._leases = LeaseKeeper(spool, clock, self._window, lease=lease, stopping=lambda: self._stopping)
        for name in sorted(protected):
            self._window.dest(name)  # every protected destination shows in statistics(), even before mail
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
        dest = self._window.dests.get(domain)
        if dest is not None:
            self._connections.drop(dest)
        self.wake(domain)

    def statistics(self) -> EngineStatistics:
        return self._totals.snapshot(self._window, self._reroutes)

    async def run(self) -> None:
        """Until `stop()`; a `stop()` that came first is not lost (run returns at once)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._leases.run())
                while not self._stopping:
                    try:
                        claimed = await self._pass()
                        timeout = await self._sleep_time(claimed)
                    except Exception:  # the spool is unavailable, say: keep going, never crash
                        log.exception("delivery pass failed")
                        timeout = POLL
                    await self._wait(timeout)
                await self._claimer.release_all()
        finally:
            self._tg = None
            await self._connections.close()

    async def stop(self) -> None:
        """Stop claiming, give back what is not started, let transactions under way finish."""
        self._stopping = True
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._kick.set()

    async def run_once(self) -> int:
        """Claim and deliver everything due now; return the number of recipients given an outcome."""
        before = self._totals.outcomes
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._last_sweep = float("-inf")
            while True:
                claimed = await self._pass()
                if claimed == 0 and not self._window.jobs:
                    break
                if claimed == 0:
                    await self._wait(1.0, real=True)
        self._tg = None
        await self._connections.close()
        return self._totals.outcomes - before

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
            await self._sweep.sweep(now)
            await self._held.sweep(now)
        self._connections.expire()
        self._window.prune(set(self._config.domain_names) | set(self._reroutes))
        for dest in self._window.dests.values():
            if dest.queue and not self._deliverable(dest.domain):
                await self._claimer.release(self._window.drop_queue(dest))
        claimed = 0 if self._stopping else await self._claimer.claim(now)
        for dest in list(self._window.dests.values()):
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

    def _guard(self, domain: str, now: float) -> bool:
        """Under the recovery guard a 5xx is held for review, not bounced (never for a reroute)."""
        protected = self._config.domain(domain) is not None
        return protected and domain not in self._reroutes and self._monitor.in_recovery_guard(domain, now)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> bool:
        if self._tg is None:
            coro.close()
            return False
        self._tg.create_task(coro)
        return True

    def _dispatch(self, dest: Destination) -> None:
        """Start connections up to the destination's current limit, never more than there is work for
        (a connection that is not in a transaction will take the next waiting job)."""
        if self._tg is None or self._stopping:
            return
        limit = self._connections.limit(dest)
        while dest.queue and dest.connections < limit and dest.connections - dest.in_flight < len(dest.queue):
            dest.connections += 1
            self._tg.create_task(self._worker(dest))

    # -- a connection's life ---------------------------------------------------------------------------
    async def _worker(self, dest: Destination) -> None:
        session: RelaySession | None = None
        try:
            while dest.queue and not self._stopping:
                if not self._deliverable(dest.domain):
                    await self._claimer.release(self._window.drop_queue(dest))
                    break
                if session is None or not session.usable:
                    session = self._connections.take(dest)
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
                    self._window.done(job)
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
                keep = not self._stopping and self._deliverable(dest.domain)
                self._connections.put(dest, session, keep=keep)
            self._kick.set()

    async def _connect(self, dest: Destination) -> RelaySession | None:
        """A new session, or None after the waiting jobs were dealt with (deferred or bounced)."""
        got = await self._attempts.connect(dest)
        if not isinstance(got, Unreachable):
            return got
        if got.connect_error is not None:
            self._connections.connect_failed(dest)
            if dest.domain not in self._reroutes:
                await self._monitor.report_delivery(dest.domain, ok=False, error=got.connect_error)
        await self._fail_queue(dest, got.outcome, relay=got.relay)
        return None

    async def _deliver(self, dest: Destination, session: RelaySession, job: Job) -> None:
        async def lease_check(step: str) -> bool:
            return await self._leases.check(job)

        try:
            result = await self._attempts.deliver(dest, session, job, lease_check)
        except Exception as e:  # relay.py maps what peers do; this is ours: the session is in doubt
            log.exception("%s: the delivery attempt failed", job.claim.message.id)
            session.abort()
            await self._poison.failed(job.claim.message.id, f"{type(e).__name__}: {e}", job.claim)
            return
        if result.lease_lost:
            self._window.forget(job)  # someone else's now: record nothing
            return
        await self._record(dest, job, result)

    async def _record(self, dest: Destination, job: Job, result: TransactionResult) -> None:
        """Total: whatever happens, the job ends here in a recorded outcome, or left to its lease (it
        comes back); an unexpected error counts toward the poison limit. The caller takes the job out of
        the window."""
        msg_id = job.claim.message.id
        try:
            status = await self._recorder.record(dest, job, result)
        except Exception as e:  # a bug, or a message no code path expected: never a stuck job
            log.exception("%s: recording the outcome failed", msg_id)
            status, error = Recorded.FAILED, f"{type(e).__name__}: {e}"
        else:
            error = "recording the outcome failed (see the diagnostic log)"
        if status is Recorded.FAILED:
            await self._poison.failed(msg_id, error, job.claim)
            return
        if not status.committed:
            return  # left to the lease
        await self._poison.succeeded(msg_id)
        if status is Recorded.WITH_DSNS:
            self.wake()  # deliver the DSNs now
        self._connections.feedback(dest, result)
        if dest.domain not in self._reroutes and any(isinstance(o, Delivered) for o in result.outcomes):
            try:
                await self._monitor.report_delivery(dest.domain, ok=True)
            except Exception:
                log.exception("reporting a delivery to the health monitor")

    async def _fail_queue(self, dest: Destination, outcome: Deferred | Bounced, *, relay: str | None) -> None:
        """The destination cannot be reached now: every waiting job gets the same outcome, in one commit
        per message (no attempt per message against a dead host, as Postfix does)."""
        jobs = self._window.take_queue(dest)
        label = relay or "none"
        try:
            for n, job in enumerate(jobs):
                if not self._deliverable(dest.domain):
                    # the monitor has just declared the destination DOWN: no attempt is counted for the rest
                    rest = jobs[n:]
                    for j in rest:
                        self._window.done(j)
                    await self._claimer.release(rest)  # if this fails, their leases run out
                    return
                outcomes = tuple(outcome for _ in job.claim.recipients)
                result = TransactionResult(
                    outcomes, label, relay.rsplit(":", 1)[0] if relay else "", False, timed_out=False
                )
                await self._record(dest, job, result)  # total: each job independently
                self._window.done(job)
        finally:
            for job in jobs:  # whatever raised (a release, a cancellation): no job stays in the window
                self._window.done(job)

    # -- monitor events ---------------------------------------------------------------------------------
    def _on_state(self, domain: str, old: DestinationState, new: DestinationState) -> None:
        domain = domain.lower()
        self._outages.forget(domain)
        dest = self._window.dest(domain)
        if new is DestinationState.DOWN:
            self._connections.drop(dest)
        elif old is DestinationState.DOWN:
            self._connections.restart(dest)
            self._flush_pending.add(domain)
        self._kick.set()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
