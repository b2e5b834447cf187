"""The canary: proof that the backup path works end to end, while nothing is broken yet.

Every `[[canary]] interval`, while the domain's primary is up, this node hands a small, clearly marked message
for the canary address to its *own* SMTP listener; it is queued and relayed like any mail, and the primary's
reply and the end-to-end time are recorded. The message carries `X-Backupmx-Canary: node=..; domain=..; id=..;
sig=..`, an HMAC under a per-node secret (`data_dir/canary.key`) of a one-time id; the listener's `classify`
hook stores only such a message, with an id this process is waiting for, as kind CANARY, so canaries never
count as user mail and never get a DSN, and a forged or replayed header is plain user mail.

A canary not delivered within `deadline` while the primary is up (refused by our listener, bounced, held, or
still queued) is a failure: the "backup path broken" alert fires once (mail log `canary-alert status=firing`,
the diagnostic log, /metrics, `backupmx status`) and resolves once at the next delivered canary. One canary per
domain is in flight at a time; an undelivered one is removed from the queue when judged, so canaries never pile
up. While the primary is down (a real outage or a drill) no canary is sent, and one caught by the outage is
judged inconclusive. Results live in the spool's kv (namespace "canary", key "NODE/DOMAIN").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import aiosmtplib
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backupmx.clock import Clock, format_span, wait_event_or_timeout
from backupmx.config import CanaryConfig, Config
from backupmx.errors import SpoolError
from backupmx.maillog import MailLog
from backupmx.model import Envelope, MessageKind, QueueId, RecipientState
from backupmx.monitor import DestinationState, DestinationStatus
from backupmx.spool import Spool
from backupmx.spool.body import BodyBuffer

log = logging.getLogger("backupmx.canary")

HEADER = "X-Backupmx-Canary"
KV_NAMESPACE = "canary"
SECRET_FILE = "canary.key"
POLL = 0.5  # seconds between looks at the canary's queue entry
WAIT_FOR_UP = 1.0  # while the primary is not up, look again this often
HEAD_LIMIT = 64 * 1024  # the classifier reads at most this much of a message to find the header
SUBMIT_TIMEOUT = 60.0
_QUEUED_AS = re.compile(r"queued as ([0-9A-Z]{14})")
_UP = (DestinationState.UP, DestinationState.RECOVERING)

# name -> help: the canary's metrics, added to the admin listener's /metrics (admin/metrics.py has the rest)
METRICS: dict[str, str] = {
    "backupmx_backup_path_broken": '1 while the canary\'s "backup path broken" alert fires for the domain.',
    "backupmx_canary_latency_seconds": "End-to-end time of the last delivered canary (listener to primary's 250).",
    "backupmx_canary_last_success_timestamp_seconds": "When the last canary was delivered (0: never).",
    "backupmx_canary_runs_total": "Canaries judged since start, by domain and outcome.",
}


class CanaryOutcome(StrEnum):
    DELIVERED = "delivered"  # the primary said 250 within the deadline
    FAILED = "failed"  # not delivered within the deadline while the primary was up
    INCONCLUSIVE = "inconclusive"  # the primary went down meanwhile: says nothing about the backup path


class CanaryStage(StrEnum):
    """Where a failed canary stopped."""

    NONE = ""
    LISTENER = "listener"  # our own SMTP listener did not accept it
    RELAY = "relay"  # the primary refused it (bounced), or it was held
    DEADLINE = "deadline"  # still queued at the deadline


@dataclass(frozen=True, slots=True)
class CanaryResult:
    domain: str
    outcome: CanaryOutcome
    sent_at: float
    finished_at: float
    stage: CanaryStage = CanaryStage.NONE
    latency: float | None = None  # seconds from the hand-over to our listener to the primary's 250
    queue_id: str | None = None
    reply: str | None = None  # the primary's (or our listener's) last reply
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "outcome": self.outcome.value,
            "sent_at": self.sent_at,
            "finished_at": self.finished_at,
            "stage": self.stage.value,
            "latency": self.latency,
            "queue_id": self.queue_id,
            "reply": self.reply,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CanaryResult:
        latency = d.get("latency")
        return cls(
            str(d["domain"]),
            CanaryOutcome(d["outcome"]),
            float(d["sent_at"]),
            float(d["finished_at"]),
            CanaryStage(d.get("stage") or ""),
            None if latency is None else float(latency),
            d.get("queue_id"),
            d.get("reply"),
            str(d.get("detail") or ""),
        )


@dataclass(frozen=True, slots=True)
class CanaryStatus:
    """One domain's canary as this node last saw it: what status, /metrics and the kv record show."""

    domain: str
    node: str
    last: CanaryResult | None = None
    broken_since: float | None = None  # the "backup path broken" alert fires since then
    broken_reason: str | None = None
    last_success_at: float | None = None
    last_latency: float | None = None
    runs: Mapping[str, int] = field(default_factory=dict)  # outcome -> canaries judged since start

    @property
    def broken(self) -> bool:
        return self.broken_since is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "node": self.node,
            "last": self.last.to_json() if self.last else None,
            "broken_since": self.broken_since,
            "broken_reason": self.broken_reason,
            "last_success_at": self.last_success_at,
            "last_latency": self.last_latency,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CanaryStatus:
        last = d.get("last")
        return cls(
            str(d["domain"]),
            str(d.get("node") or ""),
            CanaryResult.from_json(last) if last else None,
            _opt_float(d.get("broken_since")),
            d.get("broken_reason"),
            _opt_float(d.get("last_success_at")),
            _opt_float(d.get("last_latency")),
        )


def _opt_float(v: object) -> float | None:
    return None if v is None else float(v)  # type: ignore[arg-type]


def kv_key(node: str, domain: str) -> str:
    return f"{node}/{domain}"


async def read_status(spool: Spool, node: str, domain: str) -> CanaryStatus | None:
    """The last recorded canary status of `domain` on `node` (for `backupmx status`), or None."""
    raw = await spool.kv_get(KV_NAMESPACE, kv_key(node, domain))
    if raw is None:
        return None
    try:
        return CanaryStatus.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        log.warning("canary record of %s on %s is unreadable", domain, node)
        return None


# --- the mark --------------------------------------------------------------------------------------
def load_secret(data_dir: Path) -> bytes:
    """This node's canary key (`data_dir/canary.key`, 0600), made once."""
    path = data_dir / SECRET_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
        if len(text) >= 32:
            return bytes.fromhex(text)
    except (FileNotFoundError, ValueError):
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


def _sign(secret: bytes, node: str, domain: str, canary_id: str) -> str:
    return hmac.new(secret, f"{node}|{domain}|{canary_id}".encode(), hashlib.sha256).hexdigest()[:32]


def mark(secret: bytes, node: str, domain: str, canary_id: str) -> str:
    """The value of the X-Backupmx-Canary header."""
    return f"node={node}; domain={domain}; id={canary_id}; sig={_sign(secret, node, domain, canary_id)}"


def parse_mark(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in value.split(";"):
        k, eq, v = part.strip().partition("=")
        if eq:
            out[k.strip().lower()] = v.strip()
    return out


def header_value(head: bytes, name: str) -> str | None:
    """The first `name:` field of the header section at the start of `head` (unfolded), or None."""
    end = head.find(b"\r\n\r\n")
    section = head if end < 0 else head[:end]
    want = name.lower().encode() + b":"
    lines = section.split(b"\r\n")
    for i, line in enumerate(lines):
        if line[: len(want)].lower() == want:
            value = line[len(want) :]
            for cont in lines[i + 1 :]:
                if cont[:1] not in (b" ", b"\t"):
                    break
                value += cont
            return value.decode("ascii", "replace").strip()
    return None


def build_message(
    *, node: str, hostname: str, domain: str, sender: str, to: str, at: float, canary_id: str, mark_value: str
) -> bytes:
    lines = [
        f"From: backupmx canary <{sender or f'mailer-daemon@{hostname}'}>",
        f"To: <{to}>",
        f"Subject: backupmx canary for {domain} via {node}",
        f"Date: {formatdate(at, usegmt=True)}",
        f"Message-ID: <canary.{canary_id}@{hostname}>",
        f"{HEADER}: {mark_value}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"A test message from the backup MX {node}: it checks that mail for {domain} reaches its primary",
        "through this backup MX (its listener, its queue, its relay). It may be deleted.",
        "",
    ]
    return "\r\n".join(lines).encode("ascii", "replace")


# --- the canary ----------------------------------------------------------------------------------
class HealthView(Protocol):
    def snapshot(self) -> Mapping[str, DestinationStatus]: ...


class Listener(Protocol):
    """This node's SMTP server (backupmx.smtp.server.SmtpServer): where it listens."""

    @property
    def bound(self) -> Sequence[tuple[str, int]]: ...


@dataclass(slots=True)
class _Domain:
    cfg: CanaryConfig
    last: CanaryResult | None = None
    broken_since: float | None = None
    broken_reason: str | None = None
    last_success_at: float | None = None
    last_latency: float | None = None
    runs: dict[str, int] = field(default_factory=dict)


class Canary:
    """One per process, for every `[[canary]]`. `await open()`, then `await run()` until `stop()`;
    `run_once(domain)` sends one canary and judges it (tests). Set `SmtpServer.classify = canary.classify`."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        health: HealthView,
        maillog: MailLog,
        clock: Clock,
        listener: Listener,
        *,
        secret: bytes | None = None,
        poll: float = POLL,
    ) -> None:
        self._config = config
        self._node = config.server.node
        self._hostname = config.server.hostname
        self._spool = spool
        self._health = health
        self._maillog = maillog
        self._clock = clock
        self._listener = listener
        self._secret = secret if secret is not None else load_secret(config.server.data_dir)
        self._poll = poll
        self._domains = {c.domain: _Domain(c) for c in config.canary}
        self._addresses = frozenset(c.to.lower() for c in config.canary)
        self._outstanding: dict[str, str] = {}  # canary id -> domain, while its message is being handed over
        self._stopping = False
        self._wake = asyncio.Event()

    # -- the listener's hook ----------------------------------------------------------------------
    def classify(self, envelope: Envelope, body: BodyBuffer) -> Envelope:
        """Kind CANARY for our own canary (valid mark, an id we are waiting for); anything else as it is.
        User mail costs a dictionary look-up: the body is read only while a canary is being handed over."""
        if not self._outstanding or len(envelope.recipients) != 1:
            return envelope
        if envelope.recipients[0].address.lower() not in self._addresses:
            return envelope
        head = next(body.chunks(HEAD_LIMIT), b"")
        value = header_value(head, HEADER)
        if value is None:
            return envelope
        m = parse_mark(value)
        node, domain, canary_id, sig = m.get("node", ""), m.get("domain", ""), m.get("id", ""), m.get("sig", "")
        if node != self._node or self._outstanding.get(canary_id) != domain:
            return envelope
        if not hmac.compare_digest(sig, _sign(self._secret, node, domain, canary_id)):
            return envelope
        if envelope.recipients[0].domain != domain:
            return envelope
        del self._outstanding[canary_id]  # one message per id: a replay is user mail
        return dataclasses.replace(envelope, kind=MessageKind.CANARY)

    # -- reading ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, CanaryStatus]:
        return {
            name: CanaryStatus(
                name,
                self._node,
                d.last,
                d.broken_since,
                d.broken_reason,
                d.last_success_at,
                d.last_latency,
                dict(d.runs),
            )
            for name, d in self._domains.items()
        }

    def broken(self) -> dict[str, str]:
        """Domains whose "backup path broken" alert fires now -> why (for an alert manager)."""
        return {
            name: d.broken_reason or "backup path broken"
            for name, d in self._domains.items()
            if d.broken_since is not None
        }

    def collector(self) -> CanaryCollector:
        """For the admin listener's Prometheus registry (`registry.register(canary.collector())`)."""
        return CanaryCollector(self)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def open(self) -> None:
        """Take up the state recorded before a restart, so an alert already told is not told again."""
        for name, d in self._domains.items():
            try:
                st = await read_status(self._spool, self._node, name)
            except SpoolError as e:
                log.warning("canary: cannot read the last state of %s: %s", name, e)
                continue
            if st is not None:
                d.last, d.broken_since, d.broken_reason = st.last, st.broken_since, st.broken_reason
                d.last_success_at, d.last_latency = st.last_success_at, st.last_latency

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for name in self._domains:
                tg.create_task(self._loop(name), name=f"canary {name}")

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _loop(self, domain: str) -> None:
        d = self._domains[domain]
        next_at = self._clock.now()
        while not self._stopping:
            now = self._clock.now()
            if now >= next_at:
                if self._primary_up(domain):
                    await self.run_once(domain)
                    next_at = now + d.cfg.interval.total_seconds()
                else:
                    next_at = now + min(d.cfg.interval.total_seconds(), WAIT_FOR_UP)
            await self._sleep(max(next_at - self._clock.now(), 0.0))

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        self._wake.clear()
        await wait_event_or_timeout(self._clock, self._wake, seconds)

    def _primary_up(self, domain: str) -> bool:
        try:
            st = self._health.snapshot().get(domain)
        except Exception:
            log.exception("canary: health snapshot failed")
            return False
        return st is not None and st.state in _UP

    # -- one canary --------------------------------------------------------------------------------
    async def run_once(self, domain: str) -> CanaryResult:
        """Send one canary for `domain` through our listener, wait for it (at most `deadline`), judge it,
        record it, and fire or resolve the alert."""
        d = self._domains[domain]
        c = d.cfg
        sent_at = self._clock.now()
        canary_id = f"{int(sent_at)}-{secrets.token_hex(6)}"
        message = build_message(
            node=self._node,
            hostname=self._hostname,
            domain=domain,
            sender=c.mail_from,
            to=c.to,
            at=sent_at,
            canary_id=canary_id,
            mark_value=mark(self._secret, self._node, domain, canary_id),
        )
        self._outstanding[canary_id] = domain
        try:
            qid, reply = await self._submit(c, message, timeout=min(c.deadline.total_seconds(), SUBMIT_TIMEOUT))
        finally:
            self._outstanding.pop(canary_id, None)
        if qid is None:
            result = CanaryResult(
                domain,
                CanaryOutcome.FAILED,
                sent_at,
                self._clock.now(),
                CanaryStage.LISTENER,
                reply=reply,
                detail="this node's SMTP listener did not accept the canary",
            )
        else:
            result = await self._follow(domain, qid, sent_at, sent_at + c.deadline.total_seconds())
        await self._record(d, result)
        return result

    def _endpoint(self) -> tuple[str, int]:
        bound = list(self._listener.bound)
        if not bound:
            raise OSError("the SMTP listener is not bound")
        loopback = [b for b in bound if b[0] in ("127.0.0.1", "::1")]
        host, port = (loopback or bound)[0]
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port

    async def _submit(self, c: CanaryConfig, message: bytes, *, timeout: float) -> tuple[QueueId | None, str]:
        """Hand the canary to our own listener: (queue ID, its reply), or (None, why not)."""
        try:
            host, port = self._endpoint()
        except OSError as e:
            return None, str(e)
        smtp = aiosmtplib.SMTP(
            hostname=host, port=port, local_hostname=self._hostname, timeout=timeout, start_tls=False
        )
        try:
            await smtp.connect()
            await smtp.ehlo()
            await smtp.mail(c.mail_from)
            await smtp.rcpt(c.to)
            resp = await smtp.data(message)
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
        except aiosmtplib.SMTPResponseException as e:
            return None, f"{e.code} {e.message}".strip()
        except (aiosmtplib.SMTPException, OSError) as e:
            if isinstance(e.__cause__, ConnectionRefusedError):
                return None, "connection refused"
            return None, str(e) or type(e).__name__
        finally:
            smtp.close()
        reply = f"{resp.code} {resp.message}".strip()
        m = _QUEUED_AS.search(resp.message)
        if m is None:
            return None, f"no queue ID in the reply: {reply}"
        return QueueId(m.group(1)), reply

    async def _follow(self, domain: str, qid: QueueId, sent_at: float, deadline_at: float) -> CanaryResult:
        """Watch the queued canary until it is delivered, fails, or the deadline passes; an undelivered one
        is removed from the queue."""
        while True:
            try:
                rec = await self._spool.get(qid)
            except SpoolError as e:
                rec, error = None, f"spool: {e}"
            else:
                error = "the canary left the queue without being delivered"
            now = self._clock.now()
            if rec is None:
                if now < deadline_at and error.startswith("spool"):
                    await self._clock.sleep(min(self._poll, deadline_at - now))
                    continue
                return CanaryResult(
                    domain, CanaryOutcome.FAILED, sent_at, now, CanaryStage.RELAY, queue_id=qid, detail=error
                )
            if rec.kind is not MessageKind.CANARY:
                log.error("canary %s was stored as %s mail: the listener's classify hook is not set", qid, rec.kind)
            r = rec.recipients[0]
            if r.state is RecipientState.DELIVERED:
                done = r.last_attempt_at if r.last_attempt_at is not None else now
                return CanaryResult(
                    domain,
                    CanaryOutcome.DELIVERED,
                    sent_at,
                    now,
                    latency=max(done - sent_at, 0.0),
                    queue_id=qid,
                    reply=r.last_reply,
                )
            if r.state in (RecipientState.BOUNCED, RecipientState.EXPIRED, RecipientState.HELD):
                what = f"held ({r.held_reason})" if r.state is RecipientState.HELD else r.state.value
                await self._remove(rec.id, r.state)
                return CanaryResult(
                    domain,
                    CanaryOutcome.FAILED,
                    sent_at,
                    now,
                    CanaryStage.RELAY,
                    queue_id=qid,
                    reply=r.last_reply,
                    detail=f"the canary was {what}",
                )
            if now >= deadline_at or self._stopping:
                await self._remove(rec.id, r.state)
                if not self._primary_up(domain) or self._stopping:
                    return CanaryResult(
                        domain,
                        CanaryOutcome.INCONCLUSIVE,
                        sent_at,
                        now,
                        queue_id=qid,
                        reply=r.last_reply,
                        detail="the primary went down (or we stopped) meanwhile",
                    )
                return CanaryResult(
                    domain,
                    CanaryOutcome.FAILED,
                    sent_at,
                    now,
                    CanaryStage.DEADLINE,
                    queue_id=qid,
                    reply=r.last_reply,
                    detail=f"not delivered within {deadline_at - sent_at:.0f}s ({r.attempts} attempt(s))",
                )
            await self._clock.sleep(min(self._poll, deadline_at - now))

    async def _remove(self, qid: QueueId, state: RecipientState) -> None:
        if state.is_final:
            return  # finished entries go with the ordinary purge
        try:
            await self._spool.delete(qid)
        except SpoolError as e:
            log.warning("canary: cannot remove %s from the queue: %s", qid, e)

    async def _record(self, d: _Domain, result: CanaryResult) -> None:
        domain = d.cfg.domain
        d.last = result
        d.runs[result.outcome.value] = d.runs.get(result.outcome.value, 0) + 1
        self._maillog.event(
            "canary",
            result.queue_id,
            domain=domain,
            result=result.outcome.value,
            stage=result.stage.value or None,
            latency=f"{result.latency:.3f}s" if result.latency is not None else None,
            reply=result.reply,
            detail=result.detail or None,
        )
        if result.outcome is CanaryOutcome.DELIVERED:
            d.last_success_at, d.last_latency = result.finished_at, result.latency
            if d.broken_since is not None:
                summary = (
                    f"backup path for {domain} works again: canary delivered in {result.latency or 0.0:.1f}s "
                    f"after {format_span(result.finished_at - d.broken_since, minute_seconds=True)} broken"
                )
                d.broken_since, d.broken_reason = None, None
                log.warning("%s", summary)
                self._maillog.event("canary-alert", result.queue_id, domain=domain, status="resolved", summary=summary)
        elif result.outcome is CanaryOutcome.FAILED and d.broken_since is None:
            why = f"{result.detail}: {result.reply}" if result.reply else result.detail
            d.broken_since, d.broken_reason = result.finished_at, f"backup path broken for {domain}: {why}"
            log.error("%s", d.broken_reason)
            self._maillog.event(
                "canary-alert", result.queue_id, domain=domain, status="firing", summary=d.broken_reason
            )
        status = CanaryStatus(
            domain, self._node, d.last, d.broken_since, d.broken_reason, d.last_success_at, d.last_latency
        )
        try:
            await self._spool.kv_put(KV_NAMESPACE, kv_key(self._node, domain), json.dumps(status.to_json()).encode())
        except SpoolError as e:
            log.warning("canary: cannot record the result for %s: %s", domain, e)


class CanaryCollector(Collector):
    """The canary's metrics, read at scrape time from `Canary.snapshot()`."""

    def __init__(self, canary: Canary) -> None:
        self.canary = canary

    def collect(self) -> Iterator[Metric]:
        snap = self.canary.snapshot()
        broken = GaugeMetricFamily(
            "backupmx_backup_path_broken", METRICS["backupmx_backup_path_broken"], labels=["domain"]
        )
        latency = GaugeMetricFamily(
            "backupmx_canary_latency_seconds", METRICS["backupmx_canary_latency_seconds"], labels=["domain"]
        )
        success = GaugeMetricFamily(
            "backupmx_canary_last_success_timestamp_seconds",
            METRICS["backupmx_canary_last_success_timestamp_seconds"],
            labels=["domain"],
        )
        runs = CounterMetricFamily(
            "backupmx_canary_runs", METRICS["backupmx_canary_runs_total"], labels=["domain", "outcome"]
        )
        for name, st in sorted(snap.items()):
            broken.add_metric([name], 1 if st.broken else 0)
            if st.last_latency is not None:
                latency.add_metric([name], st.last_latency)
            success.add_metric([name], st.last_success_at or 0.0)
            for outcome in CanaryOutcome:
                runs.add_metric([name, outcome.value], st.runs.get(outcome.value, 0))
        yield from (broken, latency, success, runs)


__all__ = [
    "HEADER",
    "Canary",
    "CanaryCollector",
    "CanaryOutcome",
    "CanaryResult",
    "CanaryStage",
    "CanaryStatus",
    "load_secret",
    "read_status",
]
