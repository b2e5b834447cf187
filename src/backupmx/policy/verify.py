"""Recipients learned from the primary (`recipients = "verify"`), and `accept = "when_primary_down"`.

VerifyCheck, at RCPT, for a verify domain: a learned answer that is fresh is used as it is; otherwise,
while the primary is not DOWN, the address is probed (EHLO, MAIL FROM:<>, RCPT TO, RSET, QUIT against
the domain's primary): 2xx -> accepted and remembered for `verify_positive_ttl`; 5xx with a 5.1.x
status (or a bare 550/551/553) -> `550 5.1.1` and remembered for `verify_negative_ttl`. While the primary
is DOWN the learned set is frozen: entries are used whatever their age, and a never-seen address
follows the domain's `unknown_while_down` ("defer" answers 450 4.1.1 like Postfix). A probe that times
out, a 4xx, any other 5xx (a policy refusal says nothing about the user), a 5xx while the primary is
RECOVERING or in its recovery guard, or a storage error is "cannot tell": a fresh-enough positive
entry still counts, otherwise `unknown_while_down` applies but "reject" becomes 450 4.1.1 — an unknown
error never rejects. Addresses that deliveries succeeded to are remembered too (`note_delivered`, fed
from the mail log's "delivered" events). Answers live in the spool (learned.py): restarts keep them,
PostgreSQL nodes share them.

PrimaryGate, for `accept = "when_primary_down"` domains: 450 4.3.2 at RCPT while the primary is UP
(UNKNOWN, DOWN and RECOVERING accept), so the backup takes mail only when it is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import aiosmtplib

from backupmx.clock import Clock
from backupmx.config import Config, DomainConfig
from backupmx.maillog import MailLog
from backupmx.monitor import DestinationState, DestinationStatus, RouteLookup, TargetLike
from backupmx.policy import SessionInfo, Stage, Verdict, domain_of
from backupmx.policy.learned import LearnedRecipient, LearnedRecipients, Source, learned_key
from backupmx.policy.recipients import unverified, user_unknown
from backupmx.reply import Reply

log = logging.getLogger("backupmx.policy")

PROBES_PER_DOMAIN = 4  # RCPT probes in flight to one primary at most
PENDING_DELIVERED_MAX = 10_000  # delivered addresses waiting to be written; beyond, dropped (relearned later)
PRIMARY_UP = Reply(450, "4.3.2", "Temporarily not accepting mail for this domain, try again later")


# --- the probe -------------------------------------------------------------------------------------
class ProbeAnswer(StrEnum):
    KNOWN = "known"  # RCPT got 2xx
    UNKNOWN = "unknown"  # RCPT got 5.1.x (user unknown)
    TEMPFAIL = "tempfail"  # anything else: timeout, 4xx, policy 5xx, no route


@dataclass(frozen=True, slots=True)
class ProbeResult:
    answer: ProbeAnswer
    detail: str  # the primary's reply or the error, for the mail log
    answered: bool = False  # the primary replied (even 4xx); False: no session (try the next target)


class RcptProber(Protocol):
    async def probe(self, domain: str, address: str) -> ProbeResult: ...


def classify_rcpt(code: int, message: str) -> ProbeAnswer:
    """The primary's reply to RCPT as an answer about the *user*. Only 5.1.x (or a 550/551/553 without
    an enhanced status) says "no such user"; 5.7.x and the like are policy and say nothing about it."""
    if 200 <= code < 300:
        return ProbeAnswer.KNOWN
    if code >= 500:
        status = message.strip().split(" ", 1)[0]
        if status.count(".") == 2 and status[0] in "245":
            return ProbeAnswer.UNKNOWN if status.startswith("5.1.") else ProbeAnswer.TEMPFAIL
        if code in (550, 551, 553):
            return ProbeAnswer.UNKNOWN
    return ProbeAnswer.TEMPFAIL


class SmtpRcptProber:
    """RCPT probes over SMTP to the domain's primary targets, tried in order until one answers. STARTTLS
    is used when offered (required and verified for `tls_verify` domains); a failed handshake falls back
    to clear text otherwise, as deliveries do. The whole probe is bounded by `timeout`."""

    def __init__(
        self, routes: RouteLookup, *, local_hostname: str, timeout: float, tls_verify: Iterable[str] = ()
    ) -> None:
        self._routes = routes
        self._hostname = local_hostname
        self._timeout = timeout
        self._tls_verify = frozenset(d.lower() for d in tls_verify)

    @classmethod
    def from_config(cls, cfg: Config, routes: RouteLookup) -> SmtpRcptProber:
        return cls(
            routes,
            local_hostname=cfg.server.hostname,
            timeout=cfg.delivery.probe_timeout.total_seconds(),
            tls_verify=[d.name for d in cfg.domains if d.tls_verify],
        )

    async def probe(self, domain: str, address: str) -> ProbeResult:
        try:
            async with asyncio.timeout(self._timeout):
                route = await self._routes.resolve(domain)
                last = ProbeResult(ProbeAnswer.TEMPFAIL, "no route to the primary")
                for target in route.targets:
                    last = await self._probe_target(target, domain, address)
                    if last.answered:
                        return last
                return last
        except TimeoutError:
            return ProbeResult(ProbeAnswer.TEMPFAIL, "probe timed out")
        except Exception as e:  # no route, DNS failure, anything: cannot tell
            return ProbeResult(ProbeAnswer.TEMPFAIL, f"probe failed: {type(e).__name__}: {e}")

    async def _probe_target(self, target: TargetLike, domain: str, address: str) -> ProbeResult:
        verify = domain in self._tls_verify
        for use_tls in (True, False):
            smtp = aiosmtplib.SMTP(
                hostname=target.address or target.host,
                port=target.port,
                local_hostname=self._hostname,
                timeout=self._timeout,
                start_tls=False,
                validate_certs=verify,
            )
            try:
                await smtp.connect()
                await smtp.ehlo()
                if use_tls and smtp.supports_extension("starttls"):
                    try:
                        await smtp.starttls(server_hostname=target.host, validate_certs=verify)
                    except (aiosmtplib.SMTPException, OSError) as e:
                        if verify:
                            return ProbeResult(ProbeAnswer.TEMPFAIL, f"TLS with {target.label} failed: {e}")
                        continue  # opportunistic: try again in clear text
                    await smtp.ehlo()
                elif verify:
                    return ProbeResult(ProbeAnswer.TEMPFAIL, f"{target.label} does not offer STARTTLS")
                await smtp.mail("")
                try:
                    resp = await smtp.rcpt(address)
                    result = ProbeResult(
                        classify_rcpt(resp.code, resp.message), f"{resp.code} {resp.message}", answered=True
                    )
                except aiosmtplib.SMTPRecipientRefused as e:
                    result = ProbeResult(classify_rcpt(e.code, e.message), f"{e.code} {e.message}", answered=True)
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await smtp.rset()
                    await smtp.quit()
                return result
            except aiosmtplib.SMTPResponseException as e:  # a refused banner, EHLO or MAIL FROM:<>
                return ProbeResult(ProbeAnswer.TEMPFAIL, f"{e.code} {e.message}", answered=e.code != 421)
            except (aiosmtplib.SMTPException, OSError) as e:
                return ProbeResult(ProbeAnswer.TEMPFAIL, f"{target.label}: {e or type(e).__name__}")
            finally:
                smtp.close()
        return ProbeResult(ProbeAnswer.TEMPFAIL, f"{target.label}: no usable session")


# --- the verifier ----------------------------------------------------------------------------------
class HealthView(Protocol):
    """backupmx.monitor.probe.HealthMonitor fits."""

    def status(self, domain: str) -> DestinationStatus: ...

    def in_recovery_guard(self, domain: str, now: float | None = None) -> bool: ...


class Verification(StrEnum):
    KNOWN = "known"
    UNKNOWN = "unknown"
    NEVER_SEEN = "never-seen"  # the primary is DOWN and nothing is learned: unknown_while_down applies
    CANNOT_TELL = "cannot-tell"  # probe or storage failed: unknown_while_down, but never a rejection


@dataclass(frozen=True, slots=True)
class Answer:
    verdict: Verification
    why: str  # for the mail log: "learned (probe)", "probe: 550 5.1.1 ...", "primary down" ...


class RecipientVerifier:
    """Answers for the addresses of the verify domains; owns the probes and the learned set."""

    def __init__(
        self,
        domains: Iterable[DomainConfig],
        store: LearnedRecipients,
        prober: RcptProber,
        health: HealthView,
        clock: Clock,
        *,
        maillog: MailLog | None = None,
        probes_per_domain: int = PROBES_PER_DOMAIN,
        probe_wait: float = 30.0,
    ) -> None:
        self._domains = {d.name: d for d in domains if d.recipients == "verify"}
        self._store = store
        self._prober = prober
        self._health = health
        self._clock = clock
        self._maillog = maillog
        self._probe_wait = probe_wait  # a probe's whole time, its wait for a slot included
        self._slots = {name: asyncio.Semaphore(probes_per_domain) for name in self._domains}
        self._busy: dict[str, tuple[asyncio.Lock, int]] = {}  # one probe per address at a time
        self._pending: dict[str, float] = {}  # delivered addresses not yet written, with the time
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._dropped = 0

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._domains)

    def _state(self, domain: str) -> DestinationState:
        try:
            return self._health.status(domain).state
        except KeyError:
            return DestinationState.UNKNOWN

    async def verify(self, address: str) -> Answer:
        domain = domain_of(address)
        dcfg = self._domains.get(domain)
        if dcfg is None:
            return Answer(Verification.KNOWN, "not a verify domain")
        now = self._clock.now()
        state = self._state(domain)
        entry = await self._get(address)
        if entry is not None and (entry.fresh(now) or state is DestinationState.DOWN):
            return self._from_entry(entry, "learned" if entry.fresh(now) else "learned, frozen while down")
        if state is DestinationState.DOWN:
            return Answer(Verification.NEVER_SEEN, "primary down, address never seen")
        key = learned_key(address)
        lock, users = self._busy.get(key, (asyncio.Lock(), 0))
        self._busy[key] = (lock, users + 1)
        try:
            waited = lock.locked()
            async with lock:
                if waited:  # another session just probed this address: its answer is stored
                    again = await self._get(address)
                    if again is not None and again.fresh(self._clock.now()):
                        return self._from_entry(again, "learned")
                return await self._probe(dcfg, address, entry)
        finally:
            lock_, left = self._busy[key]
            if left <= 1:
                del self._busy[key]
            else:
                self._busy[key] = (lock_, left - 1)

    async def _get(self, address: str) -> LearnedRecipient | None:
        try:
            return await self._store.get(address)
        except Exception as e:
            log.warning("learned recipients: cannot read %s: %s", address, e)
            return None

    @staticmethod
    def _from_entry(entry: LearnedRecipient, how: str) -> Answer:
        return Answer(Verification.KNOWN if entry.known else Verification.UNKNOWN, f"{how} ({entry.source})")

    async def _probe(self, dcfg: DomainConfig, address: str, stale: LearnedRecipient | None) -> Answer:
        domain = dcfg.name
        try:
            async with asyncio.timeout(self._probe_wait):
                async with self._slots[domain]:
                    result = await self._prober.probe(domain, address)
        except TimeoutError:
            result = ProbeResult(ProbeAnswer.TEMPFAIL, "too many probes waiting")
        now = self._clock.now()
        self._event(address, result)
        if result.answer is ProbeAnswer.KNOWN:
            await self._put(
                LearnedRecipient(address, True, Source.PROBE, now, now + dcfg.verify_positive_ttl.total_seconds())
            )
            return Answer(Verification.KNOWN, f"probe: {result.detail}")
        if result.answer is ProbeAnswer.UNKNOWN:
            if self._state(domain) is DestinationState.RECOVERING or self._health.in_recovery_guard(domain, now):
                # a primary that just came back may not see its users yet (DESIGN: recovery guard)
                return self._stale_or(stale, f"probe during recovery, not trusted: {result.detail}")
            await self._put(
                LearnedRecipient(address, False, Source.PROBE, now, now + dcfg.verify_negative_ttl.total_seconds())
            )
            return Answer(Verification.UNKNOWN, f"probe: {result.detail}")
        return self._stale_or(stale, f"probe: {result.detail}")

    @staticmethod
    def _stale_or(stale: LearnedRecipient | None, why: str) -> Answer:
        """Cannot tell now: an old positive still counts (stale-if-error), an old negative does not."""
        if stale is not None and stale.known:
            return Answer(Verification.KNOWN, f"{why}; learned earlier ({stale.source})")
        return Answer(Verification.CANNOT_TELL, why)

    async def _put(self, entry: LearnedRecipient) -> None:
        try:
            await self._store.put(entry)
        except Exception as e:
            log.warning("learned recipients: cannot store %s: %s", entry.address, e)

    def _event(self, address: str, result: ProbeResult) -> None:
        if self._maillog is not None:
            self._maillog.event(
                "verify", recipient=f"<{address}>", result=result.answer.value, reply=result.detail[:300]
            )

    # -- learning from deliveries ------------------------------------------------------------------
    def on_maillog(self, event: str, fields: dict[str, object]) -> None:
        """A MailLog listener: "delivered" events of verify domains are remembered as known."""
        if event != "delivered":
            return
        to = str(fields.get("to", "")).strip("<>")
        if to:
            self.note_delivered(to)

    def note_delivered(self, address: str) -> None:
        """Remember later (in `run`) that the primary took mail for `address`. Safe from any thread."""
        if domain_of(address) not in self._domains:
            return
        with self._pending_lock:
            if len(self._pending) >= PENDING_DELIVERED_MAX and address not in self._pending:
                self._dropped += 1
                return
            self._pending[address] = self._clock.now()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    async def run(self) -> None:
        """Write delivered addresses to the learned set until `stop()`; what is pending at the stop is
        written before returning."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            await self.flush()
            if self._stopping:
                return
            self._wake.clear()
            with self._pending_lock:
                idle = not self._pending
            if idle:
                await self._wake.wait()

    def stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    async def flush(self) -> int:
        """Write what deliveries taught us; an address already known for more than half its TTL (or
        for good, by the operator) is not written again. Returns the entries written."""
        with self._pending_lock:
            batch, self._pending = self._pending, {}
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warning("learned recipients: %d delivered addresses not remembered (too many at once)", dropped)
        written = 0
        for address, at in batch.items():
            dcfg = self._domains.get(domain_of(address))
            if dcfg is None:
                continue
            ttl = dcfg.verify_positive_ttl.total_seconds()
            old = await self._get(address)
            if old is not None and old.known and (old.expires_at is None or old.expires_at - at > ttl / 2):
                continue
            await self._put(LearnedRecipient(address, True, Source.DELIVERED, at, at + ttl))
            written += 1
        return written


# --- the checks ------------------------------------------------------------------------------------
class VerifyCheck:
    """RCPT for verify domains (after RelayControl and RecipientCheck, which accepts postmaster)."""

    name = "verify"
    stages = frozenset({Stage.RCPT})

    def __init__(self, domains: Iterable[DomainConfig], verifier: RecipientVerifier) -> None:
        self._domains = {d.name: d for d in domains if d.recipients == "verify"}
        self._verifier = verifier

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
        if address is None:
            return Verdict.cont()
        dcfg = self._domains.get(domain_of(address))
        if dcfg is None or address.rpartition("@")[0].lower() == "postmaster":
            return Verdict.cont()
        answer = await self._verifier.verify(address)
        if answer.verdict is Verification.KNOWN:
            return Verdict.cont()
        if answer.verdict is Verification.UNKNOWN:
            return Verdict.reject(user_unknown(address), log_reason=f"user unknown: {answer.why}")
        mode = dcfg.unknown_while_down
        if mode == "accept":
            return Verdict.cont()
        if mode == "reject" and answer.verdict is Verification.NEVER_SEEN:
            return Verdict.reject(user_unknown(address), log_reason=f"recipient not verifiable: {answer.why}")
        return Verdict.defer(unverified(address), log_reason=f"recipient not verifiable: {answer.why}")


class PrimaryGate:
    """`accept = "when_primary_down"`: 450 4.3.2 at RCPT while the domain's primary is UP."""

    name = "accept-when-down"
    stages = frozenset({Stage.RCPT})

    def __init__(self, domains: Iterable[DomainConfig], health: HealthView) -> None:
        self._gated = frozenset(d.name for d in domains if d.accept == "when_primary_down")
        self._health = health

    @property
    def active(self) -> bool:
        return bool(self._gated)

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
        if address is None:
            return Verdict.cont()
        domain = domain_of(address)
        if domain not in self._gated:
            return Verdict.cont()
        try:
            state = self._health.status(domain).state
        except KeyError:
            return Verdict.cont()
        if state is DestinationState.UP:
            return Verdict.defer(PRIMARY_UP, log_reason="primary is up (accept = when_primary_down)")
        return Verdict.cont()


__all__ = [
    "Answer",
    "PrimaryGate",
    "ProbeAnswer",
    "ProbeResult",
    "RecipientVerifier",
    "SmtpRcptProber",
    "Verification",
    "VerifyCheck",
    "classify_rcpt",
]
