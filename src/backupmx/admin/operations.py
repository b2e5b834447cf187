"""What the API and the dashboard read and do, in one place, so both behave exactly alike and change the
spool as the CLI does (`Spool.hold`, `release_held`, `delete`, `flush`), then wake delivery.

It reads the others' parts through narrow Protocols of its own (`HealthView`, `DeliveryControl`,
`SmtpView`) and assembles immutable reports: `NodeSnapshot` (everything a page, a scrape or an alert
needs, read once), `DomainReport` per protected domain, `MessageDetail` per message.
Bad input raises `ActionError` (HTTP 400); unknown IDs and domains raise `NotFound` (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backupmx.admin.mailevents import HistoryEntry, MessageHistory
from backupmx.admin.timeseries import Rates, SeriesPoint, SeriesStore, rates
from backupmx.clock import Clock, iso_time
from backupmx.config import Config, parse_hostport
from backupmx.errors import NotFound, SpoolError
from backupmx.maillog import MailLog
from backupmx.model import MessageRecord, QueueId, RecipientRecord, RecipientState
from backupmx.monitor import DestinationState, DestinationStatus
from backupmx.spool import OutagePeriod, QueueFilter, Spool, SpoolStats

log = logging.getLogger("backupmx.admin")

GUARD_REASON = "recovery-guard"
GUARD_COUNT_TTL = 15.0  # seconds a count of guard holds is reused (actions forget it at once)
# Does the spool's QueueFilter select by held_reason? Until it does, guard holds are found by reading held
# messages page by page, a bounded number of pages.
_FILTER_KNOWS_REASON = "held_reason" in {f.name for f in dataclasses.fields(QueueFilter)}
REROUTE_NS = "admin.reroute"  # spool key/value namespace: domain -> JSON list of "host:port"
HEADER_LIMIT = 64 * 1024
_QUEUE_ID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{14}$")


class ActionError(ValueError):
    """An operator's request that cannot be done as given (bad host:port, unknown state ...)."""


def queue_filter(query: Any) -> QueueFilter:
    """QueueFilter from query arguments (domain, recipient, sender, state, all), shared by the API and the dashboard."""
    state_raw = (query.get("state") or "").strip()
    try:
        state = RecipientState(state_raw) if state_raw else None
    except ValueError:
        raise ActionError(f"state: one of {', '.join(s.value for s in RecipientState)}") from None
    return QueueFilter(
        domain=(query.get("domain") or "").strip().lower() or None,
        recipient=(query.get("recipient") or "").strip() or None,
        sender=(query.get("sender") or "").strip() or None,
        state=state,
        pending_only=query.get("all") not in ("1", "true", "yes", "on"),
    )


# --- what we read from the other parts ------------------------------------------------------------
class HealthView(Protocol):
    """The health monitor (monitor/probe.py), as far as the admin side reads it."""

    def snapshot(self) -> Mapping[str, DestinationStatus]: ...


class DeliveryControl(Protocol):
    """The delivery engine (delivery/), as far as the admin side drives it."""

    def wake(self, domain: str | None = None) -> object: ...

    def set_reroute(self, domain: str, hosts: Any) -> object: ...

    def statistics(self) -> object: ...


class SmtpView(Protocol):
    """The SMTP server (smtp/server.py): `statistics()` with at least `sessions_open`."""

    def statistics(self) -> object: ...


# --- reports ----------------------------------------------------------------------------------------
iso = iso_time  # the name the API and the pages import


def unknown_status(domain: str, now: float) -> DestinationStatus:
    return DestinationStatus(
        domain=domain,
        state=DestinationState.UNKNOWN,
        since=now,
        outage_since=None,
        recovered_at=None,
        last_probe_at=None,
        last_error=None,
        consecutive_failures=0,
    )


@dataclass(frozen=True, slots=True)
class DomainReport:
    domain: str
    primary: DestinationStatus
    queued: int  # recipients waiting for an attempt
    held: int  # recipients HELD (operator or recovery guard)
    guard_held: int  # of which held by the recovery guard, awaiting review
    messages_pending: int
    oldest_pending_at: float | None
    rates: Rates | None
    drain_eta_seconds: float | None
    reroute: tuple[str, ...] | None
    concurrency: int | None

    @property
    def pending(self) -> int:
        return self.queued + self.held

    def oldest_age(self, now: float) -> float | None:
        return None if self.oldest_pending_at is None else max(0.0, now - self.oldest_pending_at)

    def to_json(self, now: float) -> dict[str, object]:
        p = self.primary
        return {
            "domain": self.domain,
            "primary": {
                "state": p.state.value,
                "since": iso(p.since),
                "last_probe_at": iso(p.last_probe_at),
                "last_error": p.last_error,
                "consecutive_failures": p.consecutive_failures,
                "target": p.target or None,
                "recovered_at": iso(p.recovered_at),
            },
            "outage": {
                "declared": p.outage_declared,
                "since": iso(p.outage_since),
                "duration_seconds": None if p.outage_since is None else round(now - p.outage_since),
            },
            "recipients": {
                "queued": self.queued,
                "held": self.held,
                "guard_held": self.guard_held,
                "pending": self.pending,
            },
            "messages_pending": self.messages_pending,
            "oldest_pending_at": iso(self.oldest_pending_at),
            "oldest_age_seconds": None if self.oldest_pending_at is None else round(now - self.oldest_pending_at),
            "arrivals_per_minute": None if self.rates is None else round(self.rates.arrivals_per_minute, 2),
            "deliveries_per_minute": None if self.rates is None else round(self.rates.deliveries_per_minute, 2),
            "drain_eta_seconds": None if self.drain_eta_seconds is None else round(self.drain_eta_seconds),
            "reroute": list(self.reroute) if self.reroute else None,
            "concurrency": self.concurrency,
        }


def drain_eta(queued: int, held: int, r: Rates | None, state: DestinationState, rerouted: bool) -> float | None:
    """Seconds until the queued mail is gone at the current net rate; None when it is not draining
    (primary down and no reroute, no rates yet, or arrivals outpace deliveries). Held mail waits for
    release and does not count."""
    if queued == 0:
        return 0.0
    if (state is DestinationState.DOWN and not rerouted) or r is None:
        return None
    net = r.deliveries_per_minute - r.arrivals_per_minute
    if net <= 0:
        return None
    return queued / net * 60.0


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    at: float
    node: str
    stats: SpoolStats
    domains: tuple[DomainReport, ...]
    disk_free_bytes: int | None
    disk_total_bytes: int | None
    smtp_sessions_open: int | None
    other_pending: int  # recipients pending for domains we do not protect (DSNs to senders)
    concurrency: Mapping[str, int] = field(default_factory=dict)

    @property
    def outages(self) -> list[DomainReport]:
        return [d for d in self.domains if d.primary.outage_declared]

    def domain(self, name: str) -> DomainReport:
        for d in self.domains:
            if d.domain == name:
                return d
        raise NotFound(f"no protected domain {name}")


@dataclass(frozen=True, slots=True)
class MessageDetail:
    message: MessageRecord
    headers: list[tuple[str, str]]
    header_text: str
    history: list[HistoryEntry]


@dataclass(frozen=True, slots=True)
class GuardHold:
    message: MessageRecord
    recipient: RecipientRecord


def message_json(m: MessageRecord) -> dict[str, Any]:
    """The same shape as `backupmx queue list --json`, plus the domain of each recipient."""
    return m.to_json(with_domains=True)


def split_headers(head: bytes) -> list[tuple[str, str]]:
    """Header block -> [(name, unfolded value)], tolerant of damage (a line without a colon is kept)."""
    out: list[tuple[str, str]] = []
    for raw in head.decode("utf-8", "replace").split("\r\n"):
        if not raw:
            continue
        if raw[:1] in (" ", "\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + " " + raw.strip())
            continue
        name, sep, value = raw.partition(":")
        out.append((name.strip(), value.strip()) if sep else ("", raw))
    return out


def parse_reroute_hosts(hosts: object) -> list[tuple[str, int]]:
    if isinstance(hosts, str):
        hosts = [h for h in re.split(r"[\s,]+", hosts) if h]
    if not isinstance(hosts, list | tuple) or not hosts:
        raise ActionError("hosts: give one or more host:port")
    if len(hosts) > 10:
        raise ActionError("hosts: at most 10")
    out: list[tuple[str, int]] = []
    for h in hosts:
        if not isinstance(h, str):
            raise ActionError('hosts: each one is a "host:port" string')
        try:
            host, port = parse_hostport(h)
        except ValueError:
            raise ActionError(f"hosts: {h!r} is not host:port") from None
        if not host or not 0 < port < 65536 or any(c in host for c in " /@<>\"'"):
            raise ActionError(f"hosts: {h!r} is not host:port")
        out.append((host, port))
    return out


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Operations:
    """Reads and actions shared by the API and the dashboard."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        health: HealthView | None,
        engine: DeliveryControl | None,
        smtp: SmtpView | None,
        maillog: MailLog,
        clock: Clock,
        *,
        series: SeriesStore | None = None,
        history: MessageHistory | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.health = health
        self.engine = engine
        self.smtp = smtp
        self.maillog = maillog
        self.clock = clock
        self.series = series
        self.history = history or MessageHistory()
        self.domain_names = tuple(d.name for d in config.domains)
        self._reroutes: dict[str, tuple[str, ...]] = {}
        self._guard_cache: tuple[float, dict[str, int]] | None = None

    # -- reading ---------------------------------------------------------------------------------
    def health_snapshot(self) -> dict[str, DestinationStatus]:
        now = self.clock.now()
        snap: Mapping[str, DestinationStatus] = {}
        if self.health is not None:
            try:
                snap = self.health.snapshot()
            except Exception as e:  # a broken monitor must not take the dashboard with it
                log.warning("health snapshot failed: %s", e)
        return {d: snap.get(d) or unknown_status(d, now) for d in self.domain_names}

    def concurrency(self) -> dict[str, int]:
        if self.engine is None:
            return {}
        try:
            return destination_concurrency(self.engine.statistics())
        except Exception as e:
            log.warning("delivery statistics failed: %s", e)
            return {}

    def smtp_sessions_open(self) -> int | None:
        if self.smtp is None:
            return None
        try:
            value = getattr(self.smtp.statistics(), "sessions_open", None)
        except Exception as e:
            log.warning("smtp statistics failed: %s", e)
            return None
        return value if isinstance(value, int) else None

    def disk_usage(self) -> tuple[int | None, int | None]:
        try:
            du = shutil.disk_usage(self.config.server.data_dir)
        except OSError:
            return None, None
        return du.free, du.total

    async def series_points(self, domain: str | None = None, *, hours: float = 24.0) -> list[SeriesPoint]:
        if self.series is None:
            return []
        since = self.clock.now() - hours * 3600.0
        try:
            return await asyncio.to_thread(self.series.points, domain, since=since)
        except Exception as e:
            log.warning("reading metrics series failed: %s", e)
            return []

    async def guard_holds(
        self, domain: str | None = None, *, limit: int = 200, max_pages: int = 100
    ) -> list[GuardHold]:
        """Recipients HELD by the recovery guard (awaiting review), oldest message first, at most `limit`,
        looking at no more than `max_pages` pages of 200 held messages."""
        out: list[GuardHold] = []
        after: QueueId | None = None
        wanted: dict[str, Any] = {"domain": domain, "state": RecipientState.HELD}
        if _FILTER_KNOWS_REASON:  # the spool can select the guard's holds itself: no scan of other holds
            wanted["held_reason"] = GUARD_REASON
        flt = QueueFilter(**wanted)
        for _ in range(max_pages):
            page = await self.spool.list_messages(flt, limit=200, after=after)
            for m in page:
                for r in m.recipients:
                    if (
                        r.state is RecipientState.HELD
                        and r.held_reason == GUARD_REASON
                        and (domain is None or r.domain == domain)
                    ):
                        out.append(GuardHold(m, r))
                        if len(out) >= limit:
                            return out
            if len(page) < 200:
                break
            after = page[-1].id
        return out

    async def _guard_counts(self) -> dict[str, int]:
        """Guard holds per domain among the oldest 1000 held messages (the spool counts holds, not their
        reasons), remembered for a few seconds so that page loads do not rescan."""
        now = self.clock.now()
        if self._guard_cache is not None and 0 <= now - self._guard_cache[0] < GUARD_COUNT_TTL:
            return self._guard_cache[1]
        counts: dict[str, int] = {}
        for g in await self.guard_holds(limit=100_000, max_pages=5):
            counts[g.recipient.domain] = counts.get(g.recipient.domain, 0) + 1
        self._guard_cache = (now, counts)
        return counts

    async def snapshot(self, *, guard: bool = True) -> NodeSnapshot:
        """Everything about the node, read once: spool stats, health, rates, disk, sessions (and, unless
        `guard` is False, the recovery-guard holds per domain)."""
        stats = await self.spool.stats()
        now = self.clock.now()
        health = self.health_snapshot()
        conc = self.concurrency()
        guard_counts = await self._guard_counts() if guard and stats.recipients_by_state.get("held") else {}
        points = await self.series_points(hours=0.5)
        by_domain = {d.domain: d for d in stats.domains}
        reports = []
        for name in self.domain_names:
            ds = by_domain.get(name)
            by_state = ds.by_state if ds else {}
            queued, held = by_state.get("queued", 0), by_state.get("held", 0)
            r = rates([p for p in points if p.domain == name], now=now)
            status = health[name]
            reroute = self._reroutes.get(name)
            reports.append(
                DomainReport(
                    domain=name,
                    primary=status,
                    queued=queued,
                    held=held,
                    guard_held=guard_counts.get(name, 0),
                    messages_pending=ds.messages_pending if ds else 0,
                    oldest_pending_at=ds.oldest_pending_at if ds else None,
                    rates=r,
                    drain_eta_seconds=drain_eta(queued, held, r, status.state, reroute is not None),
                    reroute=reroute,
                    concurrency=conc.get(name),
                )
            )
        other = sum(
            d.by_state.get("queued", 0) + d.by_state.get("held", 0)
            for d in stats.domains
            if d.domain not in self.domain_names
        )
        free, total = self.disk_usage()
        return NodeSnapshot(
            at=now,
            node=self.config.server.node,
            stats=stats,
            domains=tuple(reports),
            disk_free_bytes=free,
            disk_total_bytes=total,
            smtp_sessions_open=self.smtp_sessions_open(),
            other_pending=other,
            concurrency=conc,
        )

    def require_domain(self, domain: str) -> str:
        d = domain.strip().lower().rstrip(".")
        if d not in self.domain_names:
            raise NotFound(f"no protected domain {domain}")
        return d

    async def outages(self, domain: str, *, hours: float = 24.0) -> list[OutagePeriod]:
        """Outages of `domain` that overlap the last `hours` (an open one has ended_at None)."""
        start = self.clock.now() - hours * 3600.0
        return [p for p in await self.spool.outages(domain, since=start) if p.ended_at is None or p.ended_at >= start]

    async def queue_page(
        self, flt: QueueFilter, *, after: QueueId | None = None, limit: int = 50
    ) -> tuple[list[MessageRecord], QueueId | None]:
        limit = max(1, min(limit, 500))
        page = await self.spool.list_messages(flt, limit=limit, after=after)
        return page, (page[-1].id if len(page) == limit else None)

    async def message(self, queue_id: str) -> MessageRecord:
        if not _QUEUE_ID_RE.match(queue_id):
            raise NotFound(f"no message {queue_id}")
        m = await self.spool.get(QueueId(queue_id))
        if m is None:
            raise NotFound(f"no message {queue_id}")
        return m

    async def message_detail(self, queue_id: str) -> MessageDetail:
        m = await self.message(queue_id)
        try:
            head = await self._read_head(m.id)
        except NotFound:
            raise
        except SpoolError as e:  # a damaged body: the spool has set it aside; show the envelope anyway
            return MessageDetail(m, [("", f"(the stored message is damaged: {e})")], "", self.history.of(m.id))
        return MessageDetail(m, split_headers(head), head.decode("utf-8", "replace"), self.history.of(m.id))

    async def _read_head(self, queue_id: QueueId) -> bytes:
        """The header block, reading at most HEADER_LIMIT bytes of the body."""
        buf = b""
        chunks = self.spool.iter_body(queue_id, chunk_size=16 * 1024)
        try:
            async for chunk in chunks:
                buf += chunk
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    return buf[:end]
                if len(buf) >= HEADER_LIMIT:
                    return buf[:HEADER_LIMIT]
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        return buf

    # -- actions (as the CLI does them; each is logged, and delivery is woken) ----------------------
    async def flush(self, domain: str | None = None, *, actor: str = "admin") -> int:
        if domain is not None:
            domain = self.require_domain(domain)
        n = await self.spool.flush(domain, now=self.clock.now())
        self._audit("flushed", None, actor, domain=domain or "*", recipients=n)
        await self._wake(domain)
        return n

    async def hold_message(self, queue_id: str, *, actor: str = "admin") -> int:
        m = await self.message(queue_id)
        n = await self.spool.hold(m.id, reason="operator", now=self.clock.now())
        self._audit("held", m.id, actor, reason="operator", recipients=n)
        return n

    async def release_message(self, queue_id: str, *, actor: str = "admin") -> int:
        m = await self.message(queue_id)
        n = await self.spool.release_held(m.id, now=self.clock.now())
        self._audit("released", m.id, actor, recipients=n)
        for d in sorted({r.domain for r in m.recipients if r.state is RecipientState.HELD}):
            await self._wake(d)
        return n

    async def delete_message(self, queue_id: str, *, actor: str = "admin") -> bool:
        m = await self.message(queue_id)
        ok = await self.spool.delete(m.id)
        if ok:
            self._audit(
                "deleted",
                m.id,
                actor,
                sender=f"<{m.envelope.sender}>",
                nrcpt=len([r for r in m.recipients if not r.state.is_final]),
            )
        return ok

    async def hold_domain(self, domain: str, *, actor: str = "admin") -> int:
        d = self.require_domain(domain)
        n = await self.spool.hold(None, reason="operator", domain=d, now=self.clock.now())
        self._audit("held", None, actor, domain=d, reason="operator", recipients=n)
        return n

    async def release_domain(self, domain: str, *, reason: str | None = None, actor: str = "admin") -> int:
        d = self.require_domain(domain)
        if reason is not None and reason not in (GUARD_REASON, "operator"):
            raise ActionError('reason: "operator" or "recovery-guard"')
        n = await self.spool.release_held(None, domain=d, reason=reason, now=self.clock.now())
        self._audit("released", None, actor, domain=d, reason=reason, recipients=n)
        await self._wake(d)
        return n

    def reroutes(self) -> dict[str, tuple[str, ...]]:
        return dict(self._reroutes)

    async def reroute(
        self, domain: str, hosts: object, *, release_held: bool = False, actor: str = "admin"
    ) -> tuple[int, int]:
        """Send `domain`'s mail to other host:port(s) instead of its primary, then flush it (and release
        held mail if asked). Returns (recipients flushed, recipients released)."""
        d = self.require_domain(domain)
        if self.engine is None:
            raise ActionError("delivery is not running on this node")
        targets = parse_reroute_hosts(hosts)
        self._refuse_ourselves(targets)
        labels = tuple(format_hostport(h, p) for h, p in targets)
        # saved first: a reroute the spool does not know would silently end at the next restart
        await self.spool.kv_put(REROUTE_NS, d, json.dumps(list(labels)).encode(), now=self.clock.now())
        await _maybe_await(self.engine.set_reroute(d, targets))
        self._reroutes[d] = labels
        self._audit("rerouted", None, actor, domain=d, to=",".join(self._reroutes[d]))
        released = 0
        if release_held:
            released = await self.spool.release_held(None, domain=d, now=self.clock.now())
        flushed = await self.spool.flush(d, now=self.clock.now())
        await self._wake(d)
        return flushed, released

    async def clear_reroute(self, domain: str, *, actor: str = "admin") -> bool:
        d = self.require_domain(domain)
        if self.engine is None:
            raise ActionError("delivery is not running on this node")
        await self.spool.kv_delete(REROUTE_NS, d)
        was = self._reroutes.pop(d, None)
        await _maybe_await(self.engine.set_reroute(d, None))
        self._audit("reroute-cleared", None, actor, domain=d)
        await self._wake(d)
        return was is not None

    async def sync_reroutes(self) -> None:
        """Apply the reroutes kept in the spool to this node's engine: at start (a restart must not
        silently undo a reroute) and every minute (with a shared spool, a reroute set on one node reaches
        the others)."""
        if self.engine is None:
            return
        for domain in self.domain_names:
            try:
                raw = await self.spool.kv_get(REROUTE_NS, domain)
            except Exception as e:
                log.warning("reading the reroute of %s failed: %s", domain, e)
                continue
            targets: list[tuple[str, int]] | None = None
            if raw is not None:
                try:
                    targets = parse_reroute_hosts(json.loads(raw))
                except (ValueError, ActionError) as e:
                    log.warning("the saved reroute of %s is unreadable, ignored: %s", domain, e)
            labels = tuple(format_hostport(h, p) for h, p in targets) if targets else None
            if labels == self._reroutes.get(domain):
                continue
            await _maybe_await(self.engine.set_reroute(domain, targets))
            if labels:
                self._reroutes[domain] = labels
                log.warning("reroute in force: %s -> %s", domain, ", ".join(labels))
            else:
                self._reroutes.pop(domain, None)
                log.warning("reroute of %s ended", domain)

    def _refuse_ourselves(self, targets: Sequence[tuple[str, int]]) -> None:
        """Never reroute into our own SMTP listener: the mail would loop back into the queue."""
        ours = [parse_hostport(x) for x in self.config.server.listen]
        for host, port in targets:
            for lhost, lport in ours:
                if port == lport and (
                    host == lhost
                    or lhost in ("0.0.0.0", "::", "")
                    or host in ("localhost", self.config.server.hostname)
                ):
                    raise ActionError(f"hosts: {format_hostport(host, port)} is this node's own SMTP listener")

    async def _wake(self, domain: str | None) -> None:
        if self.engine is None:
            return
        try:
            await _maybe_await(self.engine.wake(domain))
        except Exception as e:  # the spool change is done; the scheduler will find it on its own
            log.warning("waking delivery for %s failed: %s", domain or "all domains", e)

    def _audit(self, event: str, queue_id: str | None, actor: str, **fields: object) -> None:
        self._guard_cache = None  # every action may change what awaits review
        self.maillog.event(event, queue_id, via=actor, **fields)
        log.info(
            "admin action: %s %s by %s %s",
            event,
            queue_id or "",
            actor,
            " ".join(f"{k}={v}" for k, v in fields.items() if v is not None),
        )


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


def destination_concurrency(stats: object) -> dict[str, int]:
    """Per-destination concurrency from the engine's statistics, read structurally: a mapping (or a
    sequence) of per-destination records with `concurrency` (or `active`)."""
    dests = getattr(stats, "destinations", None)
    if dests is None and isinstance(stats, Mapping):
        dests = stats.get("destinations")
    items: list[tuple[str, object]] = []
    if isinstance(dests, Mapping):
        items = [(str(k), v) for k, v in dests.items()]
    elif isinstance(dests, list | tuple):
        items = [(str(getattr(v, "domain", "")), v) for v in dests]
    out: dict[str, int] = {}
    for name, rec in items:
        for attr in ("concurrency", "active", "active_connections"):
            value = rec.get(attr) if isinstance(rec, Mapping) else getattr(rec, attr, None)
            if isinstance(value, int):
                out[name] = value
                break
    return out
