"""The trust hand-off to the primary: SPF for the envelope sender, checked here at the backup (where the
sending client's address is still known) and written into an `Authentication-Results:` header field
(RFC 8601) whose authserv-id is our hostname, above our Received header:

    Authentication-Results: backup.example.net; spf=pass smtp.mailfrom=sender@example.org

The null sender is checked on its HELO name (`smtp.helo=`). Results are RFC 7208's: pass, fail,
softfail, neutral, none, temperror (DNS trouble, or the whole check took too long), permerror. SPF
never refuses mail here: it only reports; the primary decides (docs/edge.md tells how to make Postfix
or rspamd trust this header and ignore their own SPF check for mail from the backup).

RFC 8601 §5: an incoming `Authentication-Results` field that claims our authserv-id did not come from
us (we add ours above the message, never inside it), so it is renamed `X-Forged-Authentication-Results`
as the message streams in (ForgedResultsFilter); the rename keeps the evidence and every other byte.

The evaluation is pyspf's (PyPI `pyspf`, module `spf`), run in a small thread pool of its own (it is
synchronous) with its DNS queries sent through a dnspython resolver that follows `[dns] nameservers`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.resolver

from backupmx.config import Config, DnsConfig
from backupmx.errors import ConfigError
from backupmx.policy import SessionInfo, Stage, Stamp, Verdict
from backupmx.policy.dnsbl import configure
from backupmx.reply import Reply

log = logging.getLogger("backupmx.policy")

HEADER = b"Authentication-Results"
RENAMED = b"X-Forged-Authentication-Results"
RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
WORKERS = 8  # SPF evaluations at once; more wait (and a wait counts in the time budget)
BUDGET_MAX = 20.0  # seconds for one whole evaluation (RFC 7208 §4.6.4 suggests at least 20 s)
MAX_FIELD = 64 * 1024  # an incoming header field longer than this is judged on its first 64 KiB


# --- pyspf, with our resolver -------------------------------------------------------------------------
_RESOLVER: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar("spf_resolver", default=None)
_install_lock = threading.Lock()
_spf: Any = None


def _load_spf() -> Any:
    """Import pyspf once and route its DNS lookups through the resolver of the calling thread's check
    (pyspf looks `DNSLookup` up as a module global; ours falls back to pyspf's own when none is set)."""
    global _spf
    with _install_lock:
        if _spf is not None:
            return _spf
        try:
            import spf  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError as e:
            raise ConfigError("policy.spf: needs the pyspf package (pip install pyspf)") from e
        original: Callable[..., Any] = spf.DNSLookup

        def lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
            resolver = _RESOLVER.get()
            if resolver is None:
                return list(original(name, qtype, strict, timeout))
            return _lookup(spf, resolver, name, qtype, timeout)

        spf.DNSLookup = lookup
        _spf = spf
        return spf


def _lookup(spf: Any, resolver: dns.resolver.Resolver, name: str, qtype: str, timeout: float) -> list[Any]:
    """pyspf's DNSLookup contract: [((name, qtype), value)], [] for NXDOMAIN/NODATA, TempError else."""
    try:
        answer = resolver.resolve(
            name, qtype, lifetime=min(float(timeout), resolver.lifetime), search=False, raise_on_no_answer=False
        )
    except dns.resolver.NXDOMAIN:
        return []
    except (dns.exception.DNSException, OSError) as e:
        raise spf.TempError(f"DNS {type(e).__name__}") from e
    out: list[Any] = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" | "helo"
    subject: str  # the address (mailfrom) or the HELO name checked
    explanation: str = ""  # for the mail log


class SpfChecker:
    """SPF (RFC 7208) of (client IP, envelope sender, HELO name)."""

    def __init__(self, dns_config: DnsConfig, *, workers: int = WORKERS) -> None:
        self._spf = _load_spf()
        resolver = dns.resolver.Resolver(configure=not dns_config.nameservers)
        configure(resolver, dns_config)
        self._resolver = resolver
        self._timeout = dns_config.timeout.total_seconds()
        self._budget = min(BUDGET_MAX, 4 * self._timeout)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spf")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def check(self, client_ip: str, sender: str, helo: str) -> SpfResult:
        identity, subject = ("mailfrom", sender) if sender else ("helo", helo)
        domain = subject.rpartition("@")[2] if identity == "mailfrom" else subject
        try:
            ipaddress.ip_address(client_ip)
        except ValueError:
            return SpfResult("none", identity, subject, "no client address")
        if not domain or domain.startswith("[") or "." not in domain:
            return SpfResult("none", identity, subject, "no domain to check")
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return SpfResult("none", identity, subject, "domain is not a valid IDN")
        s = f"{subject.rpartition('@')[0]}@{ascii_domain}" if identity == "mailfrom" else ""
        h = ascii_domain if identity == "helo" else helo
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._budget + 1.0):
                result, _code, explanation = await loop.run_in_executor(self._pool, self._evaluate, client_ip, s, h)
        except TimeoutError:
            return SpfResult("temperror", identity, subject, "SPF check took too long")
        except Exception as e:  # pyspf raising is a bug of its own or of the record: not the sender's fault
            return SpfResult("temperror", identity, subject, f"SPF check failed: {type(e).__name__}")
        result = str(result).lower()
        if result not in RESULTS:
            result = "temperror" if "temp" in result else "permerror"
        return SpfResult(result, identity, subject, str(explanation))

    def _evaluate(self, ip: str, s: str, h: str) -> tuple[str, int, str]:
        token = _RESOLVER.set(self._resolver)
        try:
            q = self._spf.query(i=ip, s=s, h=h, timeout=self._timeout, querytime=self._budget)
            result, code, explanation = q.check()
            return str(result), int(code), str(explanation)
        finally:
            _RESOLVER.reset(token)


# --- the header ---------------------------------------------------------------------------------------
def authentication_results(authserv_id: str, spf: SpfResult) -> bytes:
    """`Authentication-Results: <id>; spf=<result> smtp.mailfrom=<sender>`: one line, as operators grep it
    and as the examples of RFC 8601 show it; folded before `spf=` only past RFC 5322's 998 octets."""
    prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
    method = f"spf={spf.result} {prop}={spf.subject}"
    first = f"{HEADER.decode()}: {authserv_id};"
    line = f"{first} {method}"
    text = line if len(line.encode("utf-8")) <= 998 else f"{first}\r\n\t{method}"
    return text.encode("utf-8") + b"\r\n"


class SpfStamp:
    """The HeaderStamp of `[policy] spf = true`."""

    name = "spf"

    def __init__(self, checker: SpfChecker, authserv_id: str) -> None:
        self._checker = checker
        self.authserv_id = authserv_id

    @classmethod
    def from_config(cls, cfg: Config) -> SpfStamp | None:
        if not cfg.policy.spf:
            return None
        return cls(SpfChecker(cfg.dns), cfg.policy.authserv_id or cfg.server.hostname)

    def close(self) -> None:
        self._checker.close()

    async def stamp(self, session: SessionInfo) -> Stamp:
        spf = await self._checker.check(session.client_ip, session.sender or "", session.helo)
        log.debug("spf %s for %s from %s: %s", spf.result, spf.subject, session.client_ip, spf.explanation)
        return Stamp(authentication_results(self.authserv_id, spf), ForgedResultsFilter(self.authserv_id))


SPF_REJECTED = Reply(550, "5.7.1", "Message rejected: SPF check failed for the sender's domain")


class SpfRejectCheck:
    """`domains[].spf_reject = true`: SPF `fail` is refused with 550 5.7.1. At MAIL when every served domain
    asks for it (the sender is refused before any RCPT); otherwise at RCPT, for those domains' recipients
    only (at MAIL the recipients are not known yet). One evaluation per transaction; any other result
    (softfail, temperror, ...) passes."""

    name = "spf_reject"
    stages = frozenset({Stage.MAIL, Stage.RCPT})

    def __init__(self, checker: SpfChecker, domains: frozenset[str], *, everywhere: bool) -> None:
        self._checker = checker
        self._domains = domains
        self._everywhere = everywhere
        self._last: tuple[tuple[str, str, str], SpfResult] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> SpfRejectCheck | None:
        domains = frozenset(d.name for d in cfg.domains if d.spf_reject)
        if not domains:
            return None
        return cls(SpfChecker(cfg.dns), domains, everywhere=domains == cfg.domain_names)

    def close(self) -> None:
        self._checker.close()

    async def _result(self, session: SessionInfo) -> SpfResult:
        key = (session.client_ip, session.sender or "", session.helo)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        result = await self._checker.check(*key)
        self._last = (key, result)
        return result

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
        if stage is Stage.MAIL and not self._everywhere:
            return Verdict.cont()
        if stage is Stage.RCPT and (
            self._everywhere or address is None or address.rpartition("@")[2].lower() not in self._domains
        ):
            return Verdict.cont()
        spf = await self._result(session)
        if spf.result == "fail":
            return Verdict.reject(SPF_REJECTED, log_reason=f"spf=fail {spf.subject}")
        return Verdict.cont()


# --- RFC 8601 §5: foreign fields claiming our authserv-id ---------------------------------------------
def _skip_cfws(value: bytes, i: int) -> int:
    """Past folding white space and (nested) comments."""
    depth = 0
    while i < len(value):
        c = value[i : i + 1]
        if depth:
            if c == b"\\":
                i += 2
                continue
            depth += {b"(": 1, b")": -1}.get(c, 0)
        elif c == b"(":
            depth = 1
        elif c not in (b" ", b"\t", b"\r", b"\n"):
            return i
        i += 1
    return i


def authserv_id_of(field: bytes) -> str:
    """The authserv-id of a whole `Authentication-Results:` field (first line and continuations)."""
    _, _, value = field.partition(b":")
    i = _skip_cfws(value, 0)
    if value[i : i + 1] == b'"':
        end = value.find(b'"', i + 1)
        token = value[i + 1 : end if end > 0 else len(value)]
    else:
        j = i
        while j < len(value) and value[j : j + 1] not in (b" ", b"\t", b"\r", b"\n", b";", b"("):
            j += 1
        token = value[i:j]
    return token.decode("utf-8", "replace").strip().lower().rstrip(".")


def _is_results_field(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and name.rstrip(b" \t").lower() == HEADER.lower()


class ForgedResultsFilter:
    """Renames `Authentication-Results:` fields of the incoming header section that claim `authserv_id`
    (to `X-Forged-Authentication-Results:`); every other byte passes unchanged. Streams: holds back at
    most one field (up to MAX_FIELD) and the partial line at a chunk's end; after the header section
    (the first empty line) everything passes at once."""

    def __init__(self, authserv_id: str, *, max_field: int = MAX_FIELD) -> None:
        self._id = authserv_id.strip().lower().rstrip(".")
        self._max = max_field
        self._buf = bytearray()  # input not yet looked at (a partial line)
        self._field = bytearray()  # an Authentication-Results field being collected
        self._in_header = True
        self._passing = False  # in the middle of an over-long line that was already let through
        self.renamed = 0

    def feed(self, data: bytes) -> bytes:
        if not self._in_header:
            return data
        self._buf += data
        out = bytearray()
        while self._in_header:
            nl = self._buf.find(b"\r\n")
            if nl < 0:
                if len(self._buf) > self._max:  # a huge line: decide on what we have, let the rest through
                    out += self._overlong()
                break
            line = bytes(self._buf[: nl + 2])
            del self._buf[: nl + 2]
            if self._passing:
                self._passing = False
                out += line
                continue
            if self._field and line[:1] in (b" ", b"\t"):
                self._field += line
                if len(self._field) > self._max:
                    out += self._decide()  # judged on its first MAX_FIELD bytes; the rest passes as it is
                continue
            if self._field:
                out += self._decide()
            if line == b"\r\n":
                self._in_header = False
                out += line + self._buf
                self._buf.clear()
            elif _is_results_field(line):
                self._field += line
            else:
                out += line
        return bytes(out)

    def finish(self) -> bytes:
        out = self._decide() if self._field else b""
        rest = bytes(self._buf)
        self._buf.clear()
        if self._in_header and not self._passing and _is_results_field(rest):
            rest = self._rename(rest)
        self._in_header = False
        return out + rest

    def _overlong(self) -> bytes:
        chunk = bytes(self._buf)
        self._buf.clear()
        if self._passing:
            return chunk
        out = self._decide() if self._field else b""
        self._passing = True
        if _is_results_field(chunk):
            chunk = self._rename(chunk)  # cannot be judged whole: obscured, to be safe
        return out + chunk

    def _decide(self) -> bytes:
        field = bytes(self._field)
        self._field.clear()
        if authserv_id_of(field) == self._id:
            return self._rename(field)
        return field

    def _rename(self, field: bytes) -> bytes:
        self.renamed += 1
        return RENAMED + field[len(HEADER) :]


__all__ = [
    "ForgedResultsFilter",
    "SpfChecker",
    "SpfResult",
    "SpfStamp",
    "authentication_results",
    "authserv_id_of",
]
