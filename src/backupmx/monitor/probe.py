"""Health of each protected domain's primary: a probe every `delivery.probe_interval` (connect, banner,
EHLO, optionally MAIL FROM:<> / RCPT TO:<probe_rcpt> / RSET, QUIT), plus what deliveries report.

States: UNKNOWN/UP -> DOWN after `delivery.down_after` consecutive failures -> RECOVERING on the first
success -> UP on the next successful probe. While DOWN an outage is *declared* in the spool
(`outage_started` / `outage_ended`), so retention pauses and the declaration survives a restart: on
`open()`, an open outage makes the destination start DOWN until a probe says otherwise. Subscribers
hear every transition (the delivery engine flushes a destination that leaves DOWN). A spool error
while declaring is logged and retried on the next transition; it never stops the probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import aiosmtplib

from backupmx.clock import Clock, wait_event_or_timeout
from backupmx.config import Config
from backupmx.maillog import MailLog
from backupmx.monitor import DestinationState, DestinationStatus, RouteLookup, TargetLike
from backupmx.reply import readable
from backupmx.spool import Spool

log = logging.getLogger("backupmx.monitor")

Subscriber = Callable[[str, DestinationState, DestinationState], None]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    target: str  # host:port reached or last tried
    error: str | None = None
    extensions: Mapping[str, str] | None = None  # the EHLO keywords when it answered (policy/mirror.py)


Prober = Callable[[str, Sequence[TargetLike]], Awaitable[ProbeResult]]


async def smtp_probe(
    targets: Sequence[TargetLike], *, local_hostname: str, timeout: float, rcpt: str | None = None
) -> ProbeResult:
    """The primary is up when any target gives a banner, answers EHLO (and accepts `rcpt`)."""
    if not targets:
        return ProbeResult(False, "", "no route")
    last = ProbeResult(False, "", "no target")
    for t in targets:
        last = await _probe_one(t, local_hostname=local_hostname, timeout=timeout, rcpt=rcpt)
        if last.ok:
            return last
    return last


async def _probe_one(t: TargetLike, *, local_hostname: str, timeout: float, rcpt: str | None) -> ProbeResult:
    smtp = aiosmtplib.SMTP(
        hostname=t.address or t.host, port=t.port, local_hostname=local_hostname, timeout=timeout, start_tls=False
    )
    label = t.label
    try:
        await smtp.connect(timeout=timeout)
        await smtp.ehlo(hostname=local_hostname, timeout=timeout)
        extensions = dict(smtp.esmtp_extensions)  # QUIT clears them
        if rcpt:
            await smtp.mail("", timeout=timeout)
            await smtp.rcpt(rcpt, timeout=timeout)
            await smtp.rset(timeout=timeout)
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit(timeout=timeout)
        return ProbeResult(True, label, extensions=extensions)
    except aiosmtplib.SMTPResponseException as e:
        return ProbeResult(False, label, readable(f"{e.code} {e.message}").strip())  # 8-bit text too
    except aiosmtplib.SMTPConnectTimeoutError:
        return ProbeResult(False, label, "timed out waiting for the banner")
    except aiosmtplib.SMTPTimeoutError:
        return ProbeResult(False, label, "timed out")
    except (aiosmtplib.SMTPException, OSError) as e:
        cause = e.__cause__
        if isinstance(cause, ConnectionRefusedError):
            return ProbeResult(False, label, "connection refused")
        return ProbeResult(False, label, str(e) or type(e).__name__)
    except Exception as e:  # a probe never crashes the monitor
        return ProbeResult(False, label, f"probe error: {type(e).__name__}")
    finally:
        smtp.close()


@dataclass(slots=True)
class _Dest:
    domain: str
    state: DestinationState
    since: float
    outage_since: float | None = None
    recovered_at: float | None = None
    last_probe_at: float | None = None
    last_error: str | None = None
    failures: int = 0
    first_failure_at: float | None = None
    delivery_failure_at: float | None = None  # the last delivery-reported failure that was counted
    target: str = ""
    forced: str | None = None  # reason, while an operator drill holds the destination DOWN
    next_probe_at: float = 0.0
    lock: asyncio.Lock | None = None

    def status(self) -> DestinationStatus:
        error = f"forced down: {self.forced}" if self.forced else self.last_error
        return DestinationStatus(
            self.domain,
            self.state,
            self.since,
            self.outage_since,
            self.recovered_at,
            self.last_probe_at,
            error,
            self.failures,
            self.target,
        )


class HealthMonitor:
    """One per process. `await open()` (or `run()`, which opens) before the engine claims mail."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        clock: Clock,
        maillog: MailLog,
        resolver: RouteLookup,
        *,
        prober: Prober | None = None,
    ) -> None:
        self._config = config
        d = config.delivery
        self._interval = d.probe_interval.total_seconds()
        self._timeout = d.probe_timeout.total_seconds()
        self._down_after = d.down_after
        self._guard = d.recovery_guard.total_seconds()
        self._spool = spool
        self._clock = clock
        self._maillog = maillog
        self._resolver = resolver
        self._prober = prober
        now = clock.now()
        self._dests = {dc.name: _Dest(dc.name, DestinationState.UNKNOWN, now) for dc in config.domains}
        self._subscribers: list[Subscriber] = []
        self._opened = False
        self._stopping = False
        self._wake = asyncio.Event()
        self.on_ehlo: Callable[[str, Mapping[str, str]], Awaitable[None]] | None = None

    # -- reading -----------------------------------------------------------------------------------
    def status(self, domain: str) -> DestinationStatus:
        dest = self._dests.get(domain.lower())
        if dest is None:
            raise KeyError(domain)
        return dest.status()

    def snapshot(self) -> dict[str, DestinationStatus]:
        return {name: d.status() for name, d in self._dests.items()}

    def is_deliverable(self, domain: str) -> bool:
        """False while the destination is DOWN (no attempt is spent per message); True for domains
        we do not watch (senders' domains, for DSNs)."""
        dest = self._dests.get(domain.lower())
        return dest is None or dest.state is not DestinationState.DOWN

    def in_recovery_guard(self, domain: str, now: float | None = None) -> bool:
        """True within `delivery.recovery_guard` after the end of a declared outage of `domain`."""
        dest = self._dests.get(domain.lower())
        if dest is None or dest.recovered_at is None:
            return False
        t = self._clock.now() if now is None else now
        return 0.0 <= t - dest.recovered_at < self._guard

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def open(self) -> None:
        """Load declared outages from the spool: an open one starts the destination DOWN."""
        if self._opened:
            return
        self._opened = True
        for dest in self._dests.values():
            try:
                periods = await self._spool.outages(dest.domain)
            except Exception:
                log.exception("reading outages of %s", dest.domain)
                continue
            for p in periods:
                if p.ended_at is None:
                    dest.state = DestinationState.DOWN
                    dest.since = p.started_at
                    dest.outage_since = p.started_at
                elif dest.recovered_at is None or p.ended_at > dest.recovered_at:
                    dest.recovered_at = p.ended_at

    async def run(self) -> None:
        """Probe every destination every probe_interval until `stop()` or cancellation. A `stop()` that
        came first is not lost: `run()` then returns at once."""
        await self.open()
        while not self._stopping:
            now = self._clock.now()
            due = [d for d in self._dests.values() if d.next_probe_at <= now]
            if due:
                async with asyncio.TaskGroup() as tg:
                    for d in due:
                        tg.create_task(self._probe(d))
            if not self._dests:
                wait = self._interval
            else:
                wait = min(d.next_probe_at for d in self._dests.values()) - self._clock.now()
            await self._sleep(max(wait, 0.05))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return  # a stop() during the probes: its wake-up must not be cleared away
        self._wake.clear()
        await wait_event_or_timeout(self._clock, self._wake, seconds)

    # -- probing -----------------------------------------------------------------------------------
    async def probe_now(self, domain: str) -> DestinationStatus:
        dest = self._dests.get(domain.lower())
        if dest is None:
            raise KeyError(domain)
        await self._probe(dest)
        return dest.status()

    async def _probe(self, dest: _Dest) -> None:
        dcfg = self._config.domain(dest.domain)
        try:
            route = await self._resolver.resolve(dest.domain)
            targets: Sequence[TargetLike] = route.targets
        except Exception as e:
            result = ProbeResult(False, "", f"no route: {e}")
        else:
            if self._prober is not None:
                result = await self._prober(dest.domain, targets)
            else:
                result = await smtp_probe(
                    targets,
                    local_hostname=self._config.server.hostname,
                    timeout=self._timeout,
                    rcpt=dcfg.probe_rcpt if dcfg else None,
                )
        now = self._clock.now()
        dest.last_probe_at = now
        dest.next_probe_at = now + self._interval
        dest.target = result.target or dest.target
        if result.ok:
            if result.extensions is not None and self.on_ehlo is not None:
                await self.on_ehlo(dest.domain, result.extensions)  # mirrored at our door (policy/mirror.py)
            await self._success(dest, now, from_probe=True)
        else:
            await self._failure(dest, now, result.error or "probe failed")

    # -- what deliveries report --------------------------------------------------------------------
    async def report_delivery(self, domain: str, *, ok: bool, error: str | None = None) -> None:
        """A delivery result: a delivered message counts as a successful probe; a refused/timed-out
        connection as a failed one, but at most one per probe interval: parallel workers failing at
        once (a primary restarting) are one observation, not `down_after` of them, so a blip never
        declares an outage; failures spread over time (or the probe's own) do. Unwatched domains are
        ignored."""
        dest = self._dests.get(domain.lower())
        if dest is None:
            return
        now = self._clock.now()
        if ok:
            await self._success(dest, now, from_probe=False)
            return
        last = dest.delivery_failure_at
        if last is not None and 0.0 <= now - last < self._interval:
            dest.last_error = error or "delivery failed"  # the same burst: seen, not counted again
            return
        dest.delivery_failure_at = now
        await self._failure(dest, now, error or "delivery failed")

    # -- drills ------------------------------------------------------------------------------------
    async def force_down(self, domain: str, reason: str) -> None:
        """Hold the destination DOWN (an operator drill) until `clear_force`, whatever probes say."""
        dest = self._dests.get(domain.lower())
        if dest is None:
            raise KeyError(domain)
        async with self._lock(dest):
            dest.forced = reason
            if dest.state is not DestinationState.DOWN:
                await self._enter_down(dest, self._clock.now(), f"forced: {reason}")

    async def clear_force(self, domain: str) -> None:
        """End a drill; a probe right away decides the real state."""
        dest = self._dests.get(domain.lower())
        if dest is None:
            raise KeyError(domain)
        dest.forced = None
        await self._probe(dest)

    # -- transitions -------------------------------------------------------------------------------
    def _lock(self, dest: _Dest) -> asyncio.Lock:
        if dest.lock is None:
            dest.lock = asyncio.Lock()
        return dest.lock

    async def _success(self, dest: _Dest, now: float, *, from_probe: bool) -> None:
        async with self._lock(dest):
            dest.failures = 0
            dest.first_failure_at = None
            dest.last_error = None
            if dest.forced:
                return
            if dest.state is DestinationState.DOWN:
                await self._leave_down(dest, now)
            elif dest.state is DestinationState.UNKNOWN:
                self._transition(dest, DestinationState.UP, now)
            elif dest.state is DestinationState.RECOVERING and from_probe and now > dest.since:
                self._transition(dest, DestinationState.UP, now)  # the probe after the recovery

    async def _failure(self, dest: _Dest, now: float, error: str) -> None:
        async with self._lock(dest):
            dest.failures += 1
            dest.last_error = error
            if dest.first_failure_at is None:
                dest.first_failure_at = now
            if dest.state is not DestinationState.DOWN and dest.failures >= self._down_after:
                await self._enter_down(dest, dest.first_failure_at, error)
            elif dest.state is DestinationState.DOWN and dest.outage_since is None:
                await self._declare(dest, dest.since)  # an earlier declaration failed: try again

    async def _enter_down(self, dest: _Dest, started_at: float, reason: str) -> None:
        await self._declare(dest, started_at)
        self._maillog.event(
            "outage-declared",
            None,
            domain=dest.domain,
            target=dest.target or None,
            failures=dest.failures,
            reason=reason,
        )
        self._transition(dest, DestinationState.DOWN, self._clock.now())

    async def _declare(self, dest: _Dest, started_at: float) -> None:
        try:
            await self._spool.outage_started(dest.domain, started_at)
            dest.outage_since = started_at
        except Exception:
            log.exception("declaring the outage of %s in the spool", dest.domain)
            dest.outage_since = None

    async def _leave_down(self, dest: _Dest, now: float) -> None:
        try:
            await self._spool.outage_ended(dest.domain, now)
        except Exception:
            log.exception("ending the outage of %s in the spool", dest.domain)
        began = dest.outage_since if dest.outage_since is not None else dest.since
        self._maillog.event(
            "primary-back", None, domain=dest.domain, target=dest.target or None, outage=f"{max(now - began, 0.0):.0f}s"
        )
        dest.outage_since = None
        dest.recovered_at = now
        self._transition(dest, DestinationState.RECOVERING, now)

    def _transition(self, dest: _Dest, new: DestinationState, now: float) -> None:
        old = dest.state
        if old is new:
            return
        dest.state = new
        dest.since = now
        log.info("%s: %s -> %s", dest.domain, old.value, new.value)
        for callback in list(self._subscribers):
            try:
                callback(dest.domain, old, new)
            except Exception:
                log.exception("state subscriber failed for %s", dest.domain)
