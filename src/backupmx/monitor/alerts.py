"""Alerts: tell a human when a protected primary goes down or comes back, when an outage drags on, when
held mail piles up or ages, when mail is set aside for review (poison, recovery guard),
when the disk fills, when delivery fails for reasons other than the primary
being down, and when the canary finds the path through this node broken. Each `[[alerts]]` entry is one
destination (a webhook, or email through a smarthost) with its own thresholds and the conditions it wants.

`AlertManager` evaluates the conditions every `interval` (and at once on each health transition it
hears through `HealthMonitor.subscribe`), from snapshots: spool stats, health, free disk, the mail
log's delivery failures, and the canary's verdicts (`Canary.broken()`). A condition notifies once when
it starts and once when it ends (the recovery notice); thresholds on levels have a little hysteresis so
a value hovering at the line does not flap.
Active conditions are kept in `data_dir/alerts-state.json`, so a restart during an outage does not
announce it again. Sending never blocks evaluation: each destination has a bounded queue and a sender
that retries with exponential backoff a bounded number of times, then logs and drops the notice.
Email never goes through a protected primary or through this node's own SMTP listener (ConfigError).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Protocol

from backupmx.clock import Clock, format_span, wait_event_or_timeout
from backupmx.config import AlertConfig, Condition, Config, parse_hostport
from backupmx.errors import ConfigError
from backupmx.logfailures import FAILURES, LogName
from backupmx.maillog import MailLog
from backupmx.monitor import DestinationState, DestinationStatus
from backupmx.spool import SpoolStats

log = logging.getLogger("backupmx.alerts")


STATE_FILE = "alerts-state.json"
QUEUE_LIMIT = 1000  # notices waiting per destination; beyond it the oldest is dropped (and logged)
LEVEL_HYSTERESIS = 0.9  # a level alert ends only once the value is back below 90 % of its threshold
SET_ASIDE = ("poison", "recovery-guard")  # held reasons that need a human (an operator's own hold does not)


def check_alerts(config: Config, alerts: Sequence[AlertConfig]) -> None:
    """Refuse email alerts that would travel through what they report on: a protected primary, or this
    node's own SMTP listener (where mail for a protected domain would be held, not delivered)."""
    listen = [parse_hostport(x) for x in config.server.listen]
    for i, a in enumerate(alerts):
        if a.kind != "email" or a.smarthost is None:
            continue
        host, port = parse_hostport(a.smarthost)
        where = f"{config.source}: alerts[{i}].smarthost: {a.smarthost}"
        for d in config.domains:
            for ph, pp in d.primary_hosts or []:
                if (ph.lower(), pp) == (host.lower(), port):
                    raise ConfigError(f"{where} is the primary of {d.name}; alerts must not depend on it")
        for lh, lp in listen:
            if lp == port and (lh == host or lh in ("0.0.0.0", "::") or host in ("localhost", config.server.hostname)):
                raise ConfigError(f"{where} is this node's own SMTP listener")
        for rcpt in a.to:
            if rcpt.rpartition("@")[2].lower() in config.domain_names:
                log.warning(
                    "alerts[%d]: %s is in a protected domain: while its primary is down the alert cannot reach it",
                    i,
                    rcpt,
                )


# --- notices ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Notice:
    condition: Condition
    scope: str  # the domain, or "" for the node
    firing: bool  # True: the problem began; False: it ended (recovery)
    summary: str
    at: float
    details: Mapping[str, object] = field(default_factory=dict)

    def to_json(self, node: str) -> dict[str, object]:
        return {
            "source": "backupmx",
            "node": node,
            "alert": self.condition.value,
            "status": "firing" if self.firing else "resolved",
            "domain": self.scope or None,
            "summary": self.summary,
            "text": f"[backupmx {node}] {self.summary}",  # Slack/Mattermost incoming webhooks show this
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds"),
            "details": dict(self.details),
        }


class Transport(Protocol):
    async def send(self, notice: Notice, alert: AlertConfig, node: str) -> None:
        """Deliver one notice; raise on failure (the sender retries)."""
        ...


class WebhookTransport:
    async def send(self, notice: Notice, alert: AlertConfig, node: str) -> None:
        import aiohttp

        assert alert.url is not None
        timeout = aiohttp.ClientTimeout(total=alert.timeout.total_seconds())
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(alert.url, json=notice.to_json(node), headers=alert.headers) as resp,
        ):
            if resp.status >= 300:
                raise RuntimeError(f"webhook answered {resp.status}")


class EmailTransport:
    async def send(self, notice: Notice, alert: AlertConfig, node: str) -> None:
        import aiosmtplib

        assert alert.smarthost is not None and alert.mail_from is not None
        host, port = parse_hostport(alert.smarthost)
        msg = EmailMessage()
        msg["From"] = alert.mail_from
        msg["To"] = ", ".join(alert.to)
        msg["Subject"] = f"[backupmx {node}] {'PROBLEM' if notice.firing else 'RECOVERED'}: {notice.summary}"
        msg["Date"] = formatdate(notice.at)
        msg["Message-ID"] = make_msgid(domain=node or None)
        msg["Auto-Submitted"] = "auto-generated"
        doc = notice.to_json(node)
        lines = [
            notice.summary,
            "",
            *(f"{k}: {v}" for k, v in doc.items() if k not in ("text", "details")),
            *(f"{k}: {v}" for k, v in notice.details.items()),
        ]
        msg.set_content("\n".join(lines) + "\n")
        await aiosmtplib.send(
            msg, hostname=host, port=port, timeout=alert.timeout.total_seconds(), local_hostname=node or None
        )


def _transport(alert: AlertConfig) -> Transport:
    return WebhookTransport() if alert.kind == "webhook" else EmailTransport()


# --- inputs ----------------------------------------------------------------------------------------
class HealthView(Protocol):
    def snapshot(self) -> Mapping[str, DestinationStatus]: ...


class StatsSource(Protocol):
    async def stats(self) -> SpoolStats: ...


class CanaryView(Protocol):
    """What the manager reads of monitor.canary.Canary."""

    def broken(self) -> Mapping[str, str]:
        """Domains whose backup path is broken now -> why."""
        ...


class FailureLog:
    """Delivery failures per protected domain from the mail log, other than "the primary is unreachable"
    (connect failures and timeouts, enhanced status 4.4.x, are the outage's business). User mail only:
    events with a `kind` (DSNs, canaries: our own mail) neither fail nor clear it; the canary has its
    own condition (backup_path_broken)."""

    def __init__(self, domains: Sequence[str], clock: Clock) -> None:
        self._domains = frozenset(domains)
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, list[tuple[float, str]]] = {}  # domain -> [(at, reply)]
        self._last_ok: dict[str, float] = {}

    def listener(self, event: str, fields: dict[str, object]) -> None:
        if event not in ("delivered", "deferred", "bounced", "held"):
            return
        if fields.get("kind") not in (None, "", "user"):
            return
        to = str(fields.get("to", "")).strip("<>")
        domain = to.rpartition("@")[2].lower()
        if domain not in self._domains:
            return
        now = self._clock.now()
        status = str(fields.get("dsn") or "")
        reply = str(fields.get("reply") or "")
        with self._lock:
            if event == "delivered":
                self._last_ok[domain] = now
                self._failures.pop(domain, None)
                return
            if status.startswith("4.4.") or (event == "held" and not reply):
                return  # unreachable primary, or an operator's hold: not a delivery failure
            bucket = self._failures.setdefault(domain, [])
            bucket.append((now, reply))
            del bucket[:-200]  # bounded; only the recent ones matter

    def recent(self, domain: str, window: float) -> list[tuple[float, str]]:
        since = self._clock.now() - window
        with self._lock:
            return [f for f in self._failures.get(domain, ()) if f[0] >= since]


# --- the manager -----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Destination:
    alert: AlertConfig
    key: str
    transport: Transport
    queue: asyncio.Queue[Notice] | None = None
    active: dict[tuple[Condition, str], Notice] = field(default_factory=dict)
    sent: int = 0
    failed: int = 0


class AlertManager:
    """Evaluates alert conditions and sends notices. `start()`/`stop()`, or `await run()`; tests call
    `evaluate()` and `drain()` directly."""

    def __init__(
        self,
        alerts: Sequence[AlertConfig],
        *,
        config: Config,
        spool: StatsSource,
        health: HealthView | None,
        clock: Clock,
        maillog: MailLog | None = None,
        transports: Mapping[int, Transport] | None = None,
        canary: CanaryView | None = None,
    ) -> None:
        check_alerts(config, alerts)
        self.config = config
        self.spool = spool
        self.health = health
        self.canary = canary
        self.clock = clock
        self.node = config.server.node
        self.domains = tuple(d.name for d in config.domains)
        self.failures = FailureLog(self.domains, clock)
        if maillog is not None:
            maillog.subscribe(self.failures.listener)
        self._dests = [
            _Destination(a, f"{i}:{a.kind}:{a.url or a.smarthost}", (transports or {}).get(i) or _transport(a))
            for i, a in enumerate(alerts)
        ]
        self.interval = min((a.interval.total_seconds() for a in alerts), default=30.0)
        self._state_file = config.server.data_dir / STATE_FILE
        self._transitions: list[tuple[str, DestinationState, DestinationState, float]] = []
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._parts: list[asyncio.Task[None]] = []  # the evaluator and the senders, while run() runs
        self._stopping = False  # sticky: a stop() before run() makes run() return at once
        self._load_state()

    # -- inputs ---------------------------------------------------------------------------------
    def on_health_change(self, domain: str, old: object, new: object) -> None:
        """For `HealthMonitor.subscribe`: remember the transition (so a quick down-and-up between two
        evaluations is still told) and evaluate now."""
        old_s, new_s = _state(old), _state(new)
        if old_s is None or new_s is None:
            return
        with self._lock:
            self._transitions.append((domain.lower(), old_s, new_s, self.clock.now()))
            del self._transitions[:-1000]
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def firing(self) -> list[dict[str, object]]:
        """The conditions active now (for the API and the dashboard), one entry per condition and scope."""
        seen: dict[tuple[Condition, str], Notice] = {}
        for d in self._dests:
            for key, notice in d.active.items():
                seen.setdefault(key, notice)
        return [
            {
                "alert": n.condition.value,
                "domain": n.scope or None,
                "summary": n.summary,
                "since": datetime.fromtimestamp(n.at, UTC).isoformat(timespec="seconds"),
            }
            for n in seen.values()
        ]

    # -- evaluation -----------------------------------------------------------------------------
    async def evaluate(self) -> list[tuple[AlertConfig, Notice]]:
        """One pass over every condition of every destination; returns (and queues) the new notices."""
        now = self.clock.now()
        health: Mapping[str, DestinationStatus] = {}
        if self.health is not None:
            try:
                health = self.health.snapshot()
            except Exception as e:
                log.warning("alerts: health snapshot failed: %s", e)
        stats: SpoolStats | None = None
        try:
            stats = await self.spool.stats()
        except Exception as e:
            log.warning("alerts: spool stats failed: %s", e)
        broken: Mapping[str, str] | None = None  # None: no canary, or it could not say
        if self.canary is not None:
            try:
                broken = dict(self.canary.broken())
            except Exception as e:
                log.warning("alerts: canary state unreadable: %s", e)
        free = _disk_free(self.config.server.data_dir)
        with self._lock:
            transitions, self._transitions = self._transitions, []
        out: list[tuple[AlertConfig, Notice]] = []
        for dest in self._dests:
            for notice in self._evaluate_one(dest, now, health, stats, free, transitions, broken):
                out.append((dest.alert, notice))
                self._enqueue(dest, notice)
        if out:
            self._save_state()
        return out

    def _evaluate_one(
        self,
        dest: _Destination,
        now: float,
        health: Mapping[str, DestinationStatus],
        stats: SpoolStats | None,
        free: int | None,
        transitions: Sequence[tuple[str, DestinationState, DestinationState, float]],
        broken: Mapping[str, str] | None = None,
    ) -> list[Notice]:
        a = dest.alert
        wanted = set(a.on)
        notices: list[Notice] = []

        def change(
            cond: Condition,
            scope: str,
            active: bool | None,
            firing_text: str,
            resolved_text: str,
            at: float = now,
            **details: object,
        ) -> None:
            """active None = no information: keep the current state."""
            if cond not in wanted or active is None:
                return
            key = (cond, scope)
            was = key in dest.active
            if active and not was:
                n = Notice(cond, scope, True, firing_text, at, details)
                dest.active[key] = n
                notices.append(n)
            elif was and not active:
                del dest.active[key]
                notices.append(Notice(cond, scope, False, resolved_text, at, details))

        # primary down / back: every transition heard, in order, then the snapshot (catches a restart)
        for domain, old, new, at in transitions:
            if new is DestinationState.DOWN:
                change(
                    Condition.PRIMARY_DOWN,
                    domain,
                    True,
                    _down_text(domain, health.get(domain)),
                    f"primary of {domain} is back",
                    at=at,
                    state=new.value,
                )
            elif old is DestinationState.DOWN:
                change(
                    Condition.PRIMARY_DOWN,
                    domain,
                    False,
                    "",
                    _back_text(domain, dest.active, at),
                    at=at,
                    state=new.value,
                )
        by_domain = {d.domain: d for d in stats.domains} if stats else {}
        for domain in self.domains:
            st = health.get(domain)
            state = st.state if st else DestinationState.UNKNOWN
            known = state is not DestinationState.UNKNOWN
            down = state is DestinationState.DOWN
            change(
                Condition.PRIMARY_DOWN,
                domain,
                down if known else None,
                _down_text(domain, st),
                _back_text(domain, dest.active, now),
                state=state.value,
                last_error=st.last_error if st else None,
            )

            outage_age = (now - st.outage_since) if st and st.outage_since is not None else None
            limit = a.outage_longer_than.total_seconds()
            change(
                Condition.OUTAGE_LONG,
                domain,
                None if not known else bool(outage_age and outage_age >= limit),
                f"outage of {domain} has lasted {format_span(outage_age or 0.0)} (alert after {format_span(limit)})",
                f"outage of {domain} is over",
                outage_seconds=round(outage_age or 0),
            )

            if stats is not None:
                ds = by_domain.get(domain)
                waiting = (ds.by_state.get("queued", 0) + ds.by_state.get("held", 0)) if ds else 0
                key = (Condition.HELD_MAIL, domain)
                over = waiting > a.held_above if key not in dest.active else waiting > a.held_above * LEVEL_HYSTERESIS
                change(
                    Condition.HELD_MAIL,
                    domain,
                    over,
                    f"{waiting} recipients of {domain} are waiting (alert above {a.held_above})",
                    f"mail waiting for {domain} is back to {waiting} recipients",
                    recipients=waiting,
                )
                oldest = ds.oldest_pending_at if ds else None
                age = now - oldest if oldest is not None else 0.0
                change(
                    Condition.OLDEST_MESSAGE,
                    domain,
                    age > a.oldest_older_than.total_seconds(),
                    f"the oldest message for {domain} has waited {format_span(age)} "
                    f"(alert after {format_span(a.oldest_older_than.total_seconds())})",
                    f"no message for {domain} is older than {format_span(a.oldest_older_than.total_seconds())} now",
                    oldest_seconds=round(age),
                )

                set_aside = {r: n for r, n in (ds.held_by_reason.items() if ds else ()) if r in SET_ASIDE and n}
                held_at = min((ds.held_since[r] for r in set_aside if ds and r in ds.held_since), default=now)
                change(
                    Condition.MAIL_SET_ASIDE,
                    domain,
                    bool(set_aside),
                    f"{sum(set_aside.values())} recipients of {domain} are set aside "
                    f"({', '.join(f'{r}: {n}' for r, n in sorted(set_aside.items()))}), the longest for "
                    f"{format_span(max(now - held_at, 0.0))}: review them (`backupmx queue list --state held`),"
                    " then release or delete; at retention_cap they expire with a DSN",
                    f"no recipient of {domain} is set aside any more",
                    recipients=sum(set_aside.values()),
                    reasons=dict(set_aside),
                    held_seconds=round(max(now - held_at, 0.0)),
                )

            window = a.failure_window.total_seconds()
            recent = self.failures.recent(domain, window)
            key = (Condition.DELIVERY_FAILING, domain)
            failing: bool | None = len(recent) >= a.delivery_failures if key not in dest.active else bool(recent)
            if down or not known:
                failing = None  # while the primary is down, failures are the outage's; keep the state
            last = recent[-1][1] if recent else ""
            change(
                Condition.DELIVERY_FAILING,
                domain,
                failing,
                f"deliveries to {domain} are failing although its primary answers: {len(recent)} "
                f"in {format_span(window)}, last: {last}",
                f"deliveries to {domain} succeed again",
                failures=len(recent),
                last_reply=last or None,
            )

        if broken is not None:  # the canary judges the path; this only tells its state changes
            scopes = set(broken) | {s for c, s in dest.active if c is Condition.BACKUP_PATH_BROKEN}
            for domain in sorted(scopes):
                why = broken.get(domain)
                began = dest.active.get((Condition.BACKUP_PATH_BROKEN, domain))
                after = f" after {format_span(now - began.at)} broken" if began else ""
                change(
                    Condition.BACKUP_PATH_BROKEN,
                    domain,
                    why is not None,
                    why or f"backup path broken for {domain}",
                    f"backup path for {domain} works again: a canary was delivered{after}",
                    reason=why,
                )

        if free is not None:
            key = (Condition.FREE_DISK, "")
            threshold = a.free_disk_below if key not in dest.active else a.free_disk_below / LEVEL_HYSTERESIS
            change(
                Condition.FREE_DISK,
                "",
                free < threshold,
                f"free disk on {self.node} is {_bytes(free)} (alert below {_bytes(a.free_disk_below)})",
                f"free disk on {self.node} is back to {_bytes(free)}",
                free_bytes=free,
            )
        return notices

    # -- sending ----------------------------------------------------------------------------------
    def _enqueue(self, dest: _Destination, notice: Notice) -> None:
        log.warning("alert %s: %s %s", dest.alert.label, "FIRING" if notice.firing else "RESOLVED", notice.summary)
        if dest.queue is None:
            dest.queue = asyncio.Queue()
        if dest.queue.qsize() >= QUEUE_LIMIT:
            dropped = dest.queue.get_nowait()
            log.error("alert %s: queue full, dropped: %s", dest.alert.label, dropped.summary)
        dest.queue.put_nowait(notice)

    async def _send_with_retries(self, dest: _Destination, notice: Notice) -> bool:
        a = dest.alert
        delay = a.retry_min.total_seconds()
        for attempt in range(1, a.attempts + 1):
            try:
                await dest.transport.send(notice, a, self.node)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if attempt == a.attempts:
                    dest.failed += 1
                    log.error("alert %s: giving up after %d attempts: %s (%s)", a.label, attempt, notice.summary, e)
                    return False
                log.warning("alert %s: attempt %d failed (%s); again in %.0fs", a.label, attempt, e, delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, a.retry_max.total_seconds())
            else:
                dest.sent += 1
                return True
        return False

    async def drain(self) -> None:
        """Send everything queued now, in order (tests; `run` does this continuously)."""
        for dest in self._dests:
            while dest.queue is not None and not dest.queue.empty():
                await self._send_with_retries(dest, dest.queue.get_nowait())

    async def _sender(self, dest: _Destination) -> None:
        if dest.queue is None:
            dest.queue = asyncio.Queue()
        while True:
            notice = await dest.queue.get()
            await self._send_with_retries(dest, notice)

    async def _evaluator(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self.evaluate()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alerts: evaluation failed")
            self._wake.clear()
            await wait_event_or_timeout(self.clock, self._wake, self.interval)

    async def run(self) -> None:
        """Evaluate and send until `stop()` (or cancellation); after a `stop()`, returns at once."""
        if self._stopping:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                self._parts = [tg.create_task(self._sender(dest)) for dest in self._dests]
                self._parts.append(tg.create_task(self._evaluator()))
        finally:
            self._parts = []

    async def start(self) -> None:
        if self._task is None and self._dests and not self._stopping:
            self._task = asyncio.create_task(self.run(), name="alerts")

    async def stop(self) -> None:
        self._stopping = True
        for part in self._parts:  # a run() awaited directly (not through start) ends too
            part.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- state across restarts ----------------------------------------------------------------------
    def _save_state(self) -> None:
        doc = {d.key: [[c.value, s, n.summary, n.at] for (c, s), n in d.active.items()] for d in self._dests}
        tmp = self._state_file.with_suffix(".tmp")
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            os.replace(tmp, self._state_file)
        except OSError as e:  # kept in memory; written again at the next change (logfailures reports it)
            FAILURES.failed(LogName.ALERT_STATE, e, self._state_file)
        else:
            FAILURES.succeeded(LogName.ALERT_STATE, self._state_file)

    def _load_state(self) -> None:
        try:
            doc = json.loads(self._state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("alerts: %s unreadable, starting afresh: %s", self._state_file, e)
            return
        if not isinstance(doc, dict):
            return
        for dest in self._dests:
            for item in doc.get(dest.key, []):
                try:
                    cond, scope, summary, at = Condition(item[0]), str(item[1]), str(item[2]), float(item[3])
                except (ValueError, IndexError, TypeError):
                    continue
                dest.active[(cond, scope)] = Notice(cond, scope, True, summary, at)


def _disk_free(path: Path) -> int | None:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def _state(value: object) -> DestinationState | None:
    v = getattr(value, "state", value)
    if isinstance(v, DestinationState):
        return v
    try:
        return DestinationState(str(v))
    except ValueError:
        return None


def _down_text(domain: str, st: DestinationStatus | None) -> str:
    why = f" ({st.last_error})" if st and st.last_error else ""
    return f"primary of {domain} is down{why}: an outage is declared and its mail is held"


def _back_text(domain: str, active: Mapping[tuple[Condition, str], Notice], at: float) -> str:
    began = active.get((Condition.PRIMARY_DOWN, domain))
    after = f" after {format_span(at - began.at)}" if began else ""
    return f"primary of {domain} is back{after}; held mail is being delivered"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.0f} B"
