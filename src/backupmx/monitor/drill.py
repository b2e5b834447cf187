"""The drill: `backupmx drill DOMAIN --for 10m` holds delivery for DOMAIN on the running node as if its primary
were down (SMTP keeps accepting), then releases it, waits for what was accepted in the window to leave, and
writes a report: start, end, accepted in the window (a warning when zero: no sender used the backup),
delivered, still held, bounced. `backupmx drill --report` and `backupmx status` show the last one.

How the CLI reaches `serve`: through the spool's kv, so it works with or without the admin listener and on a
shared PostgreSQL spool. The CLI writes a request under ("drill", "request/NODE/DOMAIN") that expires after a
minute; the `DrillRunner` inside `serve` looks for requests for its own node every second, takes one, answers
under ("drill", "ack/ID"), and keeps the report under ("drill", "report/DOMAIN"). The hold is
`HealthMonitor.force_down`: the outage is declared like a real one (the primary-down alert is part of the drill)
and ends with `clear_force`, which probes at once. On a shared spool only this node holds; others deliver.
A `serve` stopped during a drill releases first; the report says "interrupted".
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from backupmx.clock import Clock, wait_event_or_timeout
from backupmx.config import Config
from backupmx.errors import SpoolError
from backupmx.maillog import MailLog
from backupmx.model import MessageKind, MessageRecord, QueueId, RecipientState
from backupmx.monitor import DestinationState, DestinationStatus
from backupmx.spool import Spool

log = logging.getLogger("backupmx.drill")

KV_NAMESPACE = "drill"
POLL = 1.0  # how often `serve` looks for requests, and for mail leaving after the release
REQUEST_TTL = 60.0  # a request nobody took is void after this (a `serve` started later must not act on it)
ACK_TIMEOUT = 10.0  # how long the CLI waits for `serve` to take the request
DEFAULT_SETTLE = 300.0  # after the release, how long to wait for the window's mail to be delivered
LISTED = 50  # recipients not delivered, named in the report


def request_key(node: str, domain: str) -> str:
    return f"request/{node}/{domain}"


def report_key(domain: str) -> str:
    return f"report/{domain}"


def ack_key(drill_id: str) -> str:
    return f"ack/{drill_id}"


class DrillState(StrEnum):
    RUNNING = "running"  # the window is open: delivery for the domain is held
    SETTLING = "settling"  # released; waiting for the window's mail to be delivered
    DONE = "done"
    INTERRUPTED = "interrupted"  # serve stopped (or failed) during the drill; delivery was released


@dataclass(frozen=True, slots=True)
class DrillRequest:
    id: str
    domain: str
    node: str
    action: str  # "start" | "stop"
    window: float = 0.0  # seconds
    settle: float = DEFAULT_SETTLE
    requested_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "domain": self.domain,
            "node": self.node,
            "action": self.action,
            "window": self.window,
            "settle": self.settle,
            "requested_at": self.requested_at,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DrillRequest:
        return cls(
            str(d["id"]),
            str(d["domain"]),
            str(d["node"]),
            str(d["action"]),
            float(d.get("window", 0)),
            float(d.get("settle", DEFAULT_SETTLE)),
            float(d.get("requested_at", 0)),
        )


@dataclass(frozen=True, slots=True)
class DrillReport:
    id: str
    domain: str
    node: str
    state: DrillState
    started_at: float
    window: float  # seconds asked for
    ends_at: float  # when the window closes (as planned)
    ended_at: float | None = None  # when delivery was released
    finished_at: float | None = None
    accepted_messages: int = 0  # user messages with a recipient in the domain, accepted during the window
    accepted: int = 0  # their recipients in the domain
    delivered: int = 0
    held: int = 0  # still queued or held when the report was written
    bounced: int = 0  # bounced or expired (a DSN went to the sender)
    not_delivered: tuple[dict[str, Any], ...] = ()  # up to LISTED: id, address, state, last_reply
    warnings: tuple[str, ...] = ()
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Finished, and everything accepted in the window was delivered."""
        return self.state is DrillState.DONE and self.held == 0 and self.bounced == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "domain": self.domain,
            "node": self.node,
            "state": self.state.value,
            "ok": self.ok,
            "started_at": self.started_at,
            "window": self.window,
            "ends_at": self.ends_at,
            "ended_at": self.ended_at,
            "finished_at": self.finished_at,
            "accepted_messages": self.accepted_messages,
            "accepted": self.accepted,
            "delivered": self.delivered,
            "held": self.held,
            "bounced": self.bounced,
            "not_delivered": list(self.not_delivered),
            "warnings": list(self.warnings),
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DrillReport:
        def opt(k: str) -> float | None:
            v = d.get(k)
            return None if v is None else float(v)

        return cls(
            str(d["id"]),
            str(d["domain"]),
            str(d["node"]),
            DrillState(d["state"]),
            float(d["started_at"]),
            float(d["window"]),
            float(d["ends_at"]),
            opt("ended_at"),
            opt("finished_at"),
            int(d.get("accepted_messages", 0)),
            int(d.get("accepted", 0)),
            int(d.get("delivered", 0)),
            int(d.get("held", 0)),
            int(d.get("bounced", 0)),
            tuple(d.get("not_delivered") or ()),
            tuple(d.get("warnings") or ()),
            str(d.get("detail") or ""),
        )


async def read_report(spool: Spool, domain: str) -> DrillReport | None:
    """The last drill of `domain` (any node), or None."""
    raw = await spool.kv_get(KV_NAMESPACE, report_key(domain))
    if raw is None:
        return None
    try:
        return DrillReport.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        log.warning("the drill report of %s is unreadable", domain)
        return None


# --- inside serve ------------------------------------------------------------------------------------
class DrillHealth(Protocol):
    """What a drill needs of the health monitor (backupmx.monitor.probe.HealthMonitor)."""

    def snapshot(self) -> Mapping[str, DestinationStatus]: ...
    async def force_down(self, domain: str, reason: str) -> None: ...
    async def clear_force(self, domain: str) -> None: ...


@dataclass(slots=True)
class _Running:
    request: DrillRequest
    stop: asyncio.Event
    queued: list[QueueId] = field(default_factory=list)  # accepted for the domain while the window is open
    collecting: bool = True


class DrillRunner:
    """Inside `serve`: takes drill requests for this node from the spool's kv and runs them.
    `await run()` until `stop()`; tests may call `start_drill()` directly."""

    def __init__(
        self, config: Config, spool: Spool, health: DrillHealth, maillog: MailLog, clock: Clock, *, poll: float = POLL
    ) -> None:
        self._config = config
        self._node = config.server.node
        self._spool = spool
        self._health = health
        self._maillog = maillog
        self._clock = clock
        self._poll = poll
        self._running: dict[str, _Running] = {}
        self._stopping = False
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        maillog.subscribe(self._on_event)

    def _on_event(self, event: str, fields: dict[str, object]) -> None:
        """The mail log's `queued` events name what the listener accepted (called where it logs)."""
        if event != "queued" or not self._running:
            return
        qid = fields.get("queue_id")
        to = str(fields.get("to", "")).lower()
        for domain, r in self._running.items():
            if r.collecting and isinstance(qid, str) and f"@{domain}>" in to:
                r.queued.append(QueueId(qid))

    def running(self) -> dict[str, DrillRequest]:
        return {d: r.request for d, r in self._running.items()}

    # -- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        await self._recover()
        try:
            while not self._stopping:
                for d in self._config.domains:
                    try:
                        await self._take_request(d.name)
                    except SpoolError as e:
                        log.warning("drill: cannot read requests for %s: %s", d.name, e)
                await self._sleep(self._poll, self._wake)
        finally:
            for r in self._running.values():
                r.stop.set()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for r in self._running.values():
            r.stop.set()

    async def _recover(self) -> None:
        """A report this node left running or settling belongs to a drill a stop or crash cut short."""
        for d in self._config.domains:
            try:
                rep = await read_report(self._spool, d.name)
                if (
                    rep is not None
                    and rep.node == self._node
                    and rep.state in (DrillState.RUNNING, DrillState.SETTLING)
                ):
                    await self._save(
                        replace(
                            rep,
                            state=DrillState.INTERRUPTED,
                            finished_at=self._clock.now(),
                            detail="serve stopped during the drill; counts are from before",
                        )
                    )
            except SpoolError as e:
                log.warning("drill: cannot look at the last drill of %s: %s", d.name, e)

    async def _sleep(self, seconds: float, event: asyncio.Event) -> None:
        if event.is_set() or seconds <= 0:
            return
        await wait_event_or_timeout(self._clock, event, seconds)
        if event is self._wake and not self._stopping:
            self._wake.clear()

    # -- requests ----------------------------------------------------------------------------------
    async def _take_request(self, domain: str) -> None:
        raw = await self._spool.kv_get(KV_NAMESPACE, request_key(self._node, domain))
        if raw is None:
            return
        if not await self._spool.kv_delete(KV_NAMESPACE, request_key(self._node, domain)):
            return  # taken meanwhile
        try:
            req = DrillRequest.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            log.warning("drill: unreadable request for %s dropped", domain)
            return
        if req.action == "stop":
            r = self._running.get(domain)
            if r is None:
                await self._ack(req, False, f"no drill of {domain} is running on {self._node}")
            else:
                r.stop.set()
                await self._ack(req, True, f"drill {r.request.id} of {domain} ends now")
            return
        refusal = self.start_drill(req)
        await self._ack(req, refusal is None, refusal or f"drill {req.id} of {domain} started")

    async def _ack(self, req: DrillRequest, accepted: bool, detail: str) -> None:
        doc = json.dumps({"id": req.id, "accepted": accepted, "detail": detail, "node": self._node}).encode()
        await self._spool.kv_put(KV_NAMESPACE, ack_key(req.id), doc, expires_at=self._clock.now() + 3600)

    def start_drill(self, req: DrillRequest) -> str | None:
        """Start the drill in the background; a refusal's reason, or None."""
        domain = req.domain
        if self._config.domain(domain) is None:
            return f"{domain} is not a protected domain of this node"
        if domain in self._running:
            return f"a drill of {domain} is already running ({self._running[domain].request.id})"
        st = self._health.snapshot().get(domain)
        if st is not None and st.state is DestinationState.DOWN:
            return f"the primary of {domain} is down: the backup is in real use, this is no time for a drill"
        if self._stopping:
            return "serve is stopping"
        r = _Running(req, asyncio.Event())
        self._running[domain] = r
        task = asyncio.create_task(self._drill(r), name=f"drill {domain}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    # -- one drill ---------------------------------------------------------------------------------
    async def _drill(self, r: _Running) -> None:
        req = r.request
        domain = req.domain
        started = self._clock.now()
        report = DrillReport(req.id, domain, self._node, DrillState.RUNNING, started, req.window, started + req.window)
        forced = False
        try:
            await self._save(report)
            await self._health.force_down(domain, f"drill {req.id}")
            forced = True
            self._maillog.event(
                "drill-started",
                None,
                domain=domain,
                drill=req.id,
                window=f"{req.window:g}s",
                until=utc_text(report.ends_at),
            )
            while not r.stop.is_set() and self._clock.now() < report.ends_at:
                await self._sleep(min(self._poll, report.ends_at - self._clock.now()), r.stop)
            r.collecting = False
            ended = self._clock.now()
            await self._health.clear_force(domain)
            forced = False
            early = " (stopped early)" if ended < report.ends_at else ""
            self._maillog.event(
                "drill-released",
                None,
                domain=domain,
                drill=req.id,
                accepted=len(r.queued),
                held_for=f"{ended - started:.0f}s{early}",
            )
            report = replace(report, state=DrillState.SETTLING, ended_at=ended, accepted_messages=len(r.queued))
            await self._save(report)
            settle_until = ended + req.settle
            finished: dict[QueueId, MessageRecord | None] = {}
            while True:
                report = await self._count(report, r.queued, finished)
                if report.held == 0 or self._clock.now() >= settle_until or self._stopping:
                    break
                await self._sleep(min(self._poll, settle_until - self._clock.now()), self._wake)
            state = DrillState.INTERRUPTED if self._stopping and report.held else DrillState.DONE
            report = replace(
                report,
                state=state,
                finished_at=self._clock.now(),
                warnings=_warnings(report, req.settle),
                detail="serve stopped while the window's mail was leaving"
                if state is DrillState.INTERRUPTED
                else report.detail,
            )
            await self._save(report)
            self._maillog.event(
                "drill-finished",
                None,
                domain=domain,
                drill=req.id,
                result=report.state.value,
                accepted=report.accepted,
                delivered=report.delivered,
                held=report.held,
                bounced=report.bounced,
                ok="yes" if report.ok else "no",
            )
        except Exception as e:
            log.exception("drill %s of %s failed", req.id, domain)
            report = replace(
                report,
                state=DrillState.INTERRUPTED,
                finished_at=self._clock.now(),
                detail=f"the drill failed: {type(e).__name__}: {e}",
            )
            try:
                await self._save(report)
            except SpoolError:
                log.exception("drill: cannot save the report of %s", req.id)
        finally:
            r.collecting = False
            if forced:  # never leave a domain held down by a drill
                try:
                    await self._health.clear_force(domain)
                except Exception:
                    log.exception("drill %s: releasing %s failed", req.id, domain)
            self._running.pop(domain, None)

    async def _count(
        self, report: DrillReport, ids: list[QueueId], finished: dict[QueueId, MessageRecord | None]
    ) -> DrillReport:
        """Where the window's mail for the domain is now (user mail only: no canaries, no DSNs). Messages
        that are done with the domain go into `finished` and are not read again on the next call."""
        domain = report.domain
        messages = accepted = delivered = held = bounced = 0
        listed: list[dict[str, Any]] = []
        for qid in ids:
            if qid in finished:
                rec = finished[qid]
            else:
                rec = await self._spool.get(qid)
                if rec is None or rec.kind is not MessageKind.USER:
                    finished[qid] = rec = None
            if rec is None:
                continue
            mine = [x for x in rec.recipients if x.domain == domain]
            if not mine:
                finished[qid] = None
                continue
            if all(x.state.is_final for x in mine):
                finished[qid] = rec
            messages += 1
            for x in mine:
                accepted += 1
                if x.state is RecipientState.DELIVERED:
                    delivered += 1
                    continue
                if x.state in (RecipientState.BOUNCED, RecipientState.EXPIRED):
                    bounced += 1
                else:
                    held += 1
                if len(listed) < LISTED:
                    listed.append(
                        {
                            "id": rec.id,
                            "address": x.address,
                            "state": x.state.value,
                            "held_reason": x.held_reason,
                            "last_reply": x.last_reply,
                        }
                    )
        return replace(
            report,
            accepted_messages=messages,
            accepted=accepted,
            delivered=delivered,
            held=held,
            bounced=bounced,
            not_delivered=tuple(listed),
        )

    async def _save(self, report: DrillReport) -> None:
        await self._spool.kv_put(KV_NAMESPACE, report_key(report.domain), json.dumps(report.to_json()).encode())


def _warnings(report: DrillReport, settle: float) -> tuple[str, ...]:
    d = report.domain
    out: list[str] = []
    if report.accepted == 0:
        out.append(
            f"no mail for {d} was accepted during the window: no sender used this backup MX (are the MX "
            f"records in place? `backupmx check {d}`), or the window was too short for the traffic"
        )
    if report.held:
        out.append(
            f"{report.held} recipient(s) still waiting {settle:g}s after the release: "
            f"`backupmx queue list --domain {d}`"
        )
    if report.bounced:
        out.append(f"{report.bounced} recipient(s) bounced after the release (the primary refused them)")
    return tuple(out)


# --- the CLI's side of the request ----------------------------------------------------------------
async def submit_request(spool: Spool, req: DrillRequest) -> tuple[dict[str, Any] | None, bool]:
    """Writes `req` for `serve` to take and waits for its answer: (the ack, taken). Not taken: no `serve` of
    req.node took it within ACK_TIMEOUT and it was withdrawn. Taken with no ack: taken but not answered."""
    key = request_key(req.node, req.domain)
    await spool.kv_put(KV_NAMESPACE, key, json.dumps(req.to_json()).encode(), expires_at=time.time() + REQUEST_TTL)
    ack = await _wait_ack(spool, req.id, ACK_TIMEOUT)
    if ack is None and await spool.kv_delete(KV_NAMESPACE, key):
        return None, False
    if ack is None:  # taken just now: the answer follows
        ack = await _wait_ack(spool, req.id, ACK_TIMEOUT)
    return ack, True


async def wait_report(spool: Spool, req: DrillRequest) -> DrillReport | None:
    """The report of drill `req` once it is done or interrupted, or as it stands when the window, the settling
    and a margin for the last polls have passed; None when there is none of this drill."""
    deadline = time.monotonic() + req.window + req.settle + 30
    report: DrillReport | None = None
    while time.monotonic() < deadline:
        report = await read_report(spool, req.domain)
        if report is not None and report.id == req.id and report.state in (DrillState.DONE, DrillState.INTERRUPTED):
            break
        await asyncio.sleep(0.5)
    if report is None or report.id != req.id:
        return None
    return report


async def _wait_ack(spool: Spool, drill_id: str, timeout: float) -> dict[str, Any] | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw = await spool.kv_get(KV_NAMESPACE, ack_key(drill_id))
        if raw is not None:
            doc: dict[str, Any] = json.loads(raw)
            return doc
        await asyncio.sleep(0.2)
    return None


def new_drill_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def render_report(r: DrillReport) -> str:
    verdict = "ok: everything accepted in the window was delivered" if r.ok else r.state.value
    if r.state is DrillState.DONE and not r.ok:
        verdict = "NOT OK: mail from the window was not delivered"
    end = utc_text(r.ended_at) if r.ended_at else f"{utc_text(r.ends_at)} (planned)"
    lines = [
        f"drill of {r.domain} on {r.node} ({r.id}): {verdict}",
        f"  window     {utc_text(r.started_at)} .. {end} ({r.window:g}s asked)",
    ]
    if r.finished_at:
        lines.append(f"  finished   {utc_text(r.finished_at)}")
    lines += [
        f"  accepted   {r.accepted_messages} message(s), {r.accepted} recipient(s) in {r.domain}",
        f"  delivered  {r.delivered}",
        f"  held       {r.held}",
        f"  bounced    {r.bounced}",
    ]
    for x in r.not_delivered:
        lines.append(f"    {x.get('id')} <{x.get('address')}> {x.get('state')}: {x.get('last_reply') or '-'}")
    lines += [f"  warning: {w}" for w in r.warnings]
    if r.detail:
        lines.append(f"  note: {r.detail}")
    return "\n".join(lines) + "\n"


def utc_text(t: float) -> str:
    """A time for people and logs: "2026-11-24 10:15:01Z"."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


__all__ = [
    "DrillReport",
    "DrillRequest",
    "DrillRunner",
    "DrillState",
    "new_drill_id",
    "read_report",
    "render_report",
    "submit_request",
    "utc_text",
    "wait_report",
]
