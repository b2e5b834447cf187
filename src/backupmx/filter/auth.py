"""DKIM and DMARC at the final dot (`[policy] dkim`, `[policy] dmarc`), joined with SPF into one field:

    Authentication-Results: backup.example.net; spf=pass smtp.mailfrom=a@example.org;
        dkim=pass header.d=example.org header.s=sel;
        dmarc=pass (p=reject) header.from=example.org

DKIM signatures are verified with dkimpy (each `DKIM-Signature`, up to MAX_SIGNATURES; messages larger
than MAX_VERIFY are not verified: `dkim=neutral`); keys come through a dnspython resolver that follows
`[dns] nameservers`. DMARC is policy/dmarc.py. SPF's field, written above our Received header when DATA
began (policy/spf.py), is replaced by the joined one. A DNS timeout or SERVFAIL gives temperror, never a
refusal; only `dmarc=fail` with `p=reject` for a recipient domain with `dmarc_reject = true` is refused
(550 5.7.1). Nothing here raises for a message: an internal error stores it as it came.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import dns.exception
import dns.resolver

from backupmx.config import Config, DnsConfig
from backupmx.errors import ConfigError
from backupmx.filter import Refusal, Screening
from backupmx.filter.edit import HeaderEdits, apply_edits
from backupmx.policy import SessionInfo
from backupmx.policy.dmarc import DmarcResult, TempDnsError, evaluate
from backupmx.policy.dnsbl import configure
from backupmx.reply import Reply
from backupmx.spool.body import BodyBuffer

log = logging.getLogger("backupmx.filter")

MAX_VERIFY = 16 * 1024 * 1024
MAX_SIGNATURES = 5
# the fields the ARC-Message-Signature covers (dkimpy refuses to sign DKIM-Signature and ARC fields here)
ARC_SIGNED = [
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
]
DMARC_REJECTED = Reply(550, "5.7.1", "Message rejected by the DMARC policy of its From domain")
_SPF_METHOD = re.compile(rb"spf=\S+ smtp\.(?:mailfrom|helo)=\S+")


class DnsTxt:
    """TXT lookups for dkimpy and DMARC through `[dns] nameservers`; remembers whether one failed for a
    reason that may pass (then the result is temperror, not fail)."""

    def __init__(self, config: DnsConfig) -> None:
        self.resolver = dns.resolver.Resolver(configure=not config.nameservers)
        configure(self.resolver, config)
        self.temporary_failure = False

    def strings(self, name: str) -> list[str] | None:
        try:
            answer = self.resolver.resolve(name, "TXT", search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except (dns.exception.DNSException, OSError) as e:
            self.temporary_failure = True
            raise TempDnsError(type(e).__name__) from e
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    def dkim(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's `dnsfunc`: the TXT record as bytes, None when there is none."""
        try:
            found = self.strings(name.decode() if isinstance(name, bytes) else name)
        except TempDnsError:
            return None
        return found[0].encode() if found else None


def _header_section(message: bytes) -> bytes:
    return message.partition(b"\r\n\r\n")[0]


def from_domain(message: bytes) -> str:
    """The domain of the one RFC5322.From address ("" when there is none or more than one)."""
    fields = [f for f in re.split(rb"\r\n(?![ \t])", _header_section(message)) if f[:5].lower() == b"from:"]
    if len(fields) != 1:
        return ""
    addrs = email.utils.getaddresses([fields[0][5:].decode("utf-8", "replace").replace("\r\n", "")])
    domains = {a.rpartition("@")[2].lower().rstrip(".") for _n, a in addrs if "@" in a}
    return domains.pop() if len(domains) == 1 else ""


def verify_dkim(message: bytes, dns_txt: DnsTxt) -> list[tuple[str, str, str]]:
    """(result, d, s) for each DKIM-Signature (at most MAX_SIGNATURES)."""
    import dkim

    count = len(re.findall(rb"(?im)^dkim-signature:", _header_section(message)))
    out = []
    for idx in range(min(count, MAX_SIGNATURES)):
        dns_txt.temporary_failure = False
        d = dkim.DKIM(message, logger=log)
        try:
            ok = d.verify(idx=idx, dnsfunc=dns_txt.dkim)
        except dkim.DKIMException as e:
            log.debug("dkim signature %d: %s", idx, e)
            ok = False
        domain = (d.domain or b"").decode("utf-8", "replace")
        selector = (d.selector or b"").decode("utf-8", "replace")
        result = "pass" if ok else "temperror" if dns_txt.temporary_failure else "fail"
        if not domain and not ok:
            result = "permerror"
        out.append((result, domain, selector))
    return out


def verify_arc(message: bytes, dns_txt: DnsTxt) -> str:
    """pass, fail or none for the ARC chain the message arrived with."""
    import dkim

    if not re.search(rb"(?im)^arc-seal:", _header_section(message)):
        return "none"
    try:
        cv, _results, _comment = dkim.arc_verify(message, dnsfunc=dns_txt.dkim)
    except dkim.DKIMException:
        return "fail"
    return "pass" if cv == dkim.CV_Pass else "fail"


class AuthFilter:
    name = "auth"

    def __init__(self, cfg: Config) -> None:
        self._dns = cfg.dns
        self._dmarc = cfg.policy.dmarc
        self._authserv_id = cfg.policy.authserv_id or cfg.server.hostname
        self._reject_domains = frozenset(d.name for d in cfg.domains if d.dmarc_reject)
        p = cfg.policy
        self._arc: tuple[bytes, bytes, bytes] | None = None
        if p.arc_key is not None:
            try:
                key = p.arc_key.read_bytes()
            except OSError as e:
                raise ConfigError(f"{cfg.source}: policy.arc_key: {p.arc_key}: cannot be read ({e.strerror})") from e
            self._arc = (key, p.arc_selector.encode(), p.arc_domain.encode())

    @classmethod
    def from_config(cls, cfg: Config) -> AuthFilter | None:
        p = cfg.policy
        return cls(cfg) if p.dkim or p.dmarc or p.arc_key is not None else None

    async def screen(self, session: SessionInfo, queue_id: str, body: BodyBuffer, tmp_dir: Path | None) -> Screening:
        try:
            return await self._screen(session, body, tmp_dir)
        except Exception:  # a bug of ours or an input dkimpy did not expect: store it as it came
            log.exception("dkim/dmarc for %s failed: stored without their results", queue_id)
            return Screening(body)

    async def _screen(self, session: SessionInfo, body: BodyBuffer, tmp_dir: Path | None) -> Screening:
        if body.size > MAX_VERIFY:
            methods, dmarc = ["dkim=neutral (message too large to verify)"], None
            head = next(body.chunks(64 * 1024), b"")
        else:
            message = body.getvalue()
            head = message[: 64 * 1024]
            methods, dmarc = await asyncio.to_thread(self._evaluate, session, message)
        ours = f"Authentication-Results: {self._authserv_id};".encode()
        spf_field = head.split(b"\r\n", 1)[0] if head.startswith(ours) else b""
        spf = _SPF_METHOD.search(spf_field)
        all_methods = ([spf.group(0).decode("utf-8", "replace")] if spf else []) + methods
        value = f"{self._authserv_id};\r\n\t" + ";\r\n\t".join(all_methods)
        edits = HeaderEdits(
            remove=(("Authentication-Results", 1),) if spf_field else (), add=(("Authentication-Results", value, 0),)
        )
        if (
            dmarc is not None
            and dmarc.result == "fail"
            and dmarc.policy == "reject"
            and self.wants_reject(session.recipients)
        ):
            return Screening(body, Refusal(DMARC_REJECTED, dmarc.method()))
        edited = apply_edits(body, edits, tmp_dir)
        if edited is not body:
            body.close()
        if self._arc is not None and edited.size <= MAX_VERIFY:
            edited = await self._seal(edited, tmp_dir)
        return Screening(edited)

    async def _seal(self, body: BodyBuffer, tmp_dir: Path | None) -> BodyBuffer:
        """ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results (our field) above the message;
        a seal that cannot be made is logged and the message stored unsealed."""
        import dkim

        assert self._arc is not None
        key, selector, domain = self._arc
        message = body.getvalue()
        try:
            fields = await asyncio.to_thread(
                dkim.arc_sign, message, selector, domain, key, self._authserv_id.encode(), include_headers=ARC_SIGNED
            )
        except (dkim.DKIMException, ValueError) as e:
            log.warning("ARC seal failed: %s; stored unsealed", e)
            return body
        sealed = BodyBuffer(tmp_dir)
        try:
            sealed.write(b"".join(fields) + message)
        except BaseException:
            sealed.close()
            raise
        body.close()
        return sealed

    async def close(self) -> None:
        return None

    def wants_reject(self, recipients: Iterable[str]) -> bool:
        return any(r.rpartition("@")[2].lower() in self._reject_domains for r in recipients)

    def _evaluate(self, session: SessionInfo, message: bytes) -> tuple[list[str], DmarcResult | None]:
        dns_txt = DnsTxt(self._dns)
        sigs = verify_dkim(message, dns_txt)
        methods = [f"dkim={r} header.d={d or 'unknown'} header.s={s or 'unknown'}" for r, d, s in sigs] or ["dkim=none"]
        if self._arc is not None:  # the chain we extend: its cv= is this result (RFC 8617 §5.1.1)
            methods.append(f"arc={verify_arc(message, dns_txt)}")
        if not self._dmarc:
            return methods, None
        spf_result, spf_domain = self._spf_of(message, session)
        dmarc = evaluate(
            from_domain(message),
            spf_result=spf_result,
            spf_domain=spf_domain,
            dkim_passes=[d for r, d, _s in sigs if r == "pass"],
            txt=dns_txt.strings,
        )
        return [*methods, dmarc.method()], dmarc

    def _spf_of(self, message: bytes, session: SessionInfo) -> tuple[str, str]:
        """The SPF result our own field at the top carries, and the domain it was for."""
        first = message.split(b"\r\n", 1)[0]
        if not first.startswith(f"Authentication-Results: {self._authserv_id};".encode()):
            return "none", ""
        m = re.search(rb"spf=(\S+) smtp\.(?:mailfrom|helo)=(\S+)", first)
        if m is None:
            return "none", ""
        return m.group(1).decode(), m.group(2).decode("utf-8", "replace").rpartition("@")[2].lower()


__all__ = ["DMARC_REJECTED", "AuthFilter", "from_domain", "verify_dkim"]
