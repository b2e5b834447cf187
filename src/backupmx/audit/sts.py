"""MTA-STS (RFC 8461) as `check` sees it: the `_mta-sts` TXT record, the policy fetched over HTTPS from
mta-sts.DOMAIN (certificate verified, text/plain, at most 64 KiB, redirects refused), its parsed fields,
and the marks sts.policy, sts.mx-match and sts.cert, judged from them and from the SMTP probes.
Fetch and lookup failures are recorded on the view (`StsView.error`), never raised.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import aiohttp.abc
import dns.asyncresolver

from backupmx.audit.dnsview import lookup_records, txt_strings
from backupmx.audit.rules import CERT_EXPIRY_WARNING
from backupmx.audit.views import Level, Mark, MxRecord, SmtpProbe

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 §3.3: senders may refuse more; 64 KiB is the usual cap
MIN_MAX_AGE = 86400  # a policy that lapses within a day protects little (RFC 8461 §3.2 suggests weeks)
MAX_MAX_AGE = 31557600  # RFC 8461 §3.2
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


@dataclass(frozen=True, slots=True)
class StsPolicy:
    mode: str  # "enforce" | "testing" | "none"
    mx: tuple[str, ...]
    max_age: int

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "mx": list(self.mx), "max_age": self.max_age}


@dataclass(frozen=True, slots=True)
class StsView:
    domain: str
    txt: tuple[str, ...] = ()  # the TXT strings at _mta-sts.DOMAIN that start with v=STSv1
    txt_error: str | None = None  # the lookup failed (no record at all is not an error)
    url: str = ""
    fetched_from: str | None = None  # "address:port" the policy came from
    policy: StsPolicy | None = None
    error: str | None = None  # TXT present, but no usable policy: why

    @property
    def published(self) -> bool:
        return bool(self.txt)

    def to_json(self) -> dict[str, Any]:
        return {
            "txt": list(self.txt),
            "txt_error": self.txt_error,
            "url": self.url,
            "fetched_from": self.fetched_from,
            "policy": self.policy.to_json() if self.policy else None,
            "error": self.error,
        }


# --- gathering --------------------------------------------------------------------------------------
async def gather_sts(
    domain: str, resolver: dns.asyncresolver.Resolver, *, timeout: float, cafile: str | None, port: int = 443
) -> StsView:
    rdatas, _, txt_error = await lookup_records(resolver, f"_mta-sts.{domain}", "TXT")
    txt = tuple(t for t in txt_strings(rdatas) if t.startswith("v=STSv1"))
    url = f"https://mta-sts.{domain}{'' if port == 443 else f':{port}'}{POLICY_PATH}"
    if txt_error or not txt:
        return StsView(domain, txt, txt_error, url)
    text, fetched_from, error = await fetch_policy(
        f"mta-sts.{domain}", resolver, port=port, timeout=timeout, cafile=cafile
    )
    if text is None:
        return StsView(domain, txt, None, url, fetched_from, None, error)
    try:
        policy = parse_policy(text)
    except ValueError as e:
        return StsView(domain, txt, None, url, fetched_from, None, f"the policy is not valid: {e}")
    return StsView(domain, txt, None, url, fetched_from, policy, None)


class _DnsResolver(aiohttp.abc.AbstractResolver):
    """aiohttp asks this for addresses: the audit's resolver (--nameserver), not the system's."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver
        self.addresses: list[str] = []  # what it answered, for the report

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        out: list[aiohttp.abc.ResolveResult] = []
        errors = []
        for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            rdatas, _, error = await lookup_records(self.resolver, host, rdtype)
            errors += [error] if error else []
            out += [
                {
                    "hostname": host,
                    "host": r.address,
                    "port": port,
                    "family": fam,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
                for r in rdatas
            ]
        if not out:
            raise OSError(f"{host}: " + ("; ".join(errors) if errors else "no A or AAAA record"))
        self.addresses += [r["host"] for r in out]
        return out

    async def close(self) -> None:
        return None


async def fetch_policy(
    host: str, resolver: dns.asyncresolver.Resolver, *, port: int, timeout: float, cafile: str | None
) -> tuple[str | None, str | None, str | None]:
    """(policy text, "address:port", error) from https://HOST/.well-known/mta-sts.txt, as RFC 8461 §3.3 asks:
    a verified certificate for HOST, status 200 (redirects refused), text/plain, at most 64 KiB."""
    context = ssl.create_default_context(cafile=cafile)
    names = _DnsResolver(resolver)
    connector = aiohttp.TCPConnector(resolver=names, ssl=context, use_dns_cache=False)
    url = f"https://{host}{'' if port == 443 else f':{port}'}{POLICY_PATH}"
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False
            ) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            peer = ", ".join(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in names.addresses)
            if 300 <= resp.status < 400:
                return (
                    None,
                    peer,
                    (
                        f"{url} answered {resp.status} redirect to {resp.headers.get('Location', '?')}; "
                        "RFC 8461 §3.3 forbids following redirects"
                    ),
                )
            if resp.status != 200:
                return None, peer, f"{url} answered HTTP {resp.status}"
            if resp.content_type != "text/plain":
                return None, peer, f"{url} has media type {resp.content_type!r}, not text/plain"
            body = b""
            while len(body) <= MAX_POLICY_BYTES:
                chunk = await resp.content.read(MAX_POLICY_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_POLICY_BYTES:
                return None, peer, f"{url} is larger than {MAX_POLICY_BYTES // 1024} KiB"
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return None, None, _fetch_error(url, e, timeout)
    try:
        return body.decode("utf-8"), peer, None
    except UnicodeDecodeError:
        return None, peer, f"{url} is not UTF-8 text"


def _fetch_error(url: str, e: BaseException, timeout: float) -> str:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return f"{url}: certificate not verified ({e.certificate_error})"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"{url}: cannot connect ({e.os_error.strerror or e.os_error})"
    if isinstance(e, TimeoutError):
        return f"{url}: no answer within {timeout:g}s"
    return f"{url}: {str(e) or type(e).__name__}"


def parse_policy(text: str) -> StsPolicy:
    """RFC 8461 §3.2: "key: value" lines (LF or CRLF); version STSv1, a mode, max_age, and mx lines unless
    the mode is none. Unknown keys are ignored. ValueError says what is wrong."""
    fields: dict[str, list[str]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f'line {n} is not "key: value": {line[:60]!r}')
        fields.setdefault(key.strip().lower(), []).append(value.strip())
    version = fields.get("version", [""])[0]
    if version != "STSv1":
        raise ValueError(f"version is {version!r}, not STSv1" if version else "no version line")
    mode = fields.get("mode", [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise ValueError(f"mode is {mode!r}, not enforce, testing or none" if mode else "no mode line")
    age = fields.get("max_age", [""])[0]
    if not age.isdigit() or int(age) > MAX_MAX_AGE:
        raise ValueError(
            f"max_age is {age!r}, not a number of seconds up to {MAX_MAX_AGE}" if age else "no max_age line"
        )
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    if not mx and mode != "none":
        raise ValueError("no mx line")
    return StsPolicy(mode, mx, int(age))


# --- judging ----------------------------------------------------------------------------------------
def mx_matches(host: str, pattern: str) -> bool:
    """RFC 8461 §4.1: exact, or "*." + one more label: *.example.com matches a.example.com, not a.b.example.com."""
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def is_ip_literal(pattern: str) -> bool:
    try:
        ipaddress.ip_address(pattern.strip("[]"))
    except ValueError:
        return False
    return True


def sts_marks(view: StsView, mx: tuple[MxRecord, ...], probes: tuple[SmtpProbe, ...], now: datetime) -> list[Mark]:
    d = view.domain
    if view.txt_error:
        return [
            Mark(
                "sts.policy",
                Level.WARN,
                d,
                f"cannot tell whether an MTA-STS policy is published: _mta-sts.{d} TXT: {view.txt_error}",
                f"check the nameservers that serve _mta-sts.{d}",
            )
        ]
    if not view.txt:
        return [
            Mark(
                "sts.policy",
                Level.OK,
                d,
                "no MTA-STS policy (no v=STSv1 TXT at _mta-sts): senders do not filter MX hosts by policy",
            )
        ]
    if len(view.txt) > 1:
        return [
            Mark(
                "sts.policy",
                Level.WARN,
                d,
                f"{len(view.txt)} v=STSv1 TXT records at _mta-sts.{d}: "
                "RFC 8461 §3.1 makes senders treat that as no policy",
                "keep exactly one",
            )
        ]
    marks: list[Mark] = []
    txt_id = dict(p.strip().partition("=")[::2] for p in view.txt[0].split(";") if "=" in p).get("id", "")
    if not _ID.match(txt_id):
        marks.append(
            Mark(
                "sts.policy",
                Level.WARN,
                d,
                f"_mta-sts.{d} TXT has no valid id= ({view.txt[0]!r}): senders treat it as no policy",
                'publish "v=STSv1; id=20260101T000000" (1-32 '
                "letters and digits; change it whenever the policy changes)",
            )
        )
    p = view.policy
    if p is None:
        marks.append(
            Mark(
                "sts.policy",
                Level.FAIL,
                d,
                f"a TXT record announces MTA-STS, but no policy could be read: {view.error}",
                f"serve the policy at {view.url} (valid certificate for "
                f"mta-sts.{d}, text/plain, no redirect), or remove the _mta-sts TXT record",
            )
        )
        return marks
    marks.append(
        Mark(
            "sts.policy",
            Level.OK,
            d,
            f"mode {p.mode}, max_age {p.max_age}, mx {', '.join(p.mx) or '-'} "
            f"(from {view.url} at {view.fetched_from or '?'})",
        )
    )
    if p.mode == "none":
        marks.append(
            Mark("sts.policy", Level.INFO, d, "mode none: the policy is being withdrawn; senders do not enforce it")
        )
        return marks
    if p.max_age < MIN_MAX_AGE:
        marks.append(
            Mark(
                "sts.policy",
                Level.WARN,
                d,
                f"max_age {p.max_age}s is under a day: senders forget "
                "the policy quickly and an attacker who blocks the fetch strips it",
                "use max_age 604800 (a week) or more once the policy is stable",
            )
        )
    marks.extend(_mx_match_marks(d, p, mx))
    marks.extend(_cert_marks(p, probes, now))
    return marks


def _mx_match_marks(domain: str, p: StsPolicy, mx: tuple[MxRecord, ...]) -> list[Mark]:
    marks = []
    literals = [m for m in p.mx if is_ip_literal(m)]
    if literals:
        marks.append(
            Mark(
                "sts.mx-match",
                Level.FAIL,
                domain,
                f"the policy's mx lists IP literals ({', '.join(literals)}): RFC 8461 §4.1 matches host names only",
                "list the MX host names (or *.zone patterns) instead",
            )
        )
    level = Level.FAIL if p.mode == "enforce" else Level.WARN
    seen: set[str] = set()
    # the backup first: it is what this audit is about
    for r in sorted(mx, key=lambda r: (r.role.value != "backup", r.preference)):
        host = r.host.name
        if host in seen:
            continue
        seen.add(host)
        match = next((pat for pat in p.mx if mx_matches(host, pat)), None)
        if match:
            marks.append(Mark("sts.mx-match", Level.OK, host, f"{r.role.value} covered by mx: {match}"))
            continue
        deeper = [pat for pat in p.mx if pat.startswith("*.") and host.endswith(pat[1:])]
        why = f"; {', '.join(deeper)} matches one label only, and {host} has more" if deeper else ""
        effect = (
            "compliant senders refuse to deliver to it"
            if p.mode == "enforce"
            else "senders deliver, but report failures (mode testing)"
        )
        marks.append(
            Mark(
                "sts.mx-match",
                level,
                host,
                f"{r.role.value} not covered by the policy's mx ({', '.join(p.mx)}){why}: {effect}",
                f'add "mx: {host}" to the policy and change the id in the _mta-sts TXT record',
            )
        )
    return marks


def _cert_marks(p: StsPolicy, probes: tuple[SmtpProbe, ...], now: datetime) -> list[Mark]:
    """RFC 8461 §4.2: the MX's certificate must chain to a trusted root, name the MX host, and be current."""
    level = Level.FAIL if p.mode == "enforce" else Level.WARN
    effect = (
        "enforcing senders will not deliver here"
        if p.mode == "enforce"
        else "senders deliver, but report failures (mode testing)"
    )
    marks = []
    for probe in probes:
        if probe.skipped or (probe.tls is None and probe.error):
            continue  # smtp.connect / smtp.session already say why nothing was seen
        tls = probe.tls
        if tls is None:
            marks.append(
                Mark(
                    "sts.cert",
                    level,
                    probe.label,
                    f"no TLS: {effect}",
                    "offer STARTTLS with a certificate for the MX name",
                )
            )
        elif not tls.verified:
            marks.append(
                Mark(
                    "sts.cert",
                    level,
                    probe.label,
                    f"certificate not valid for {probe.host} ({tls.verify_error}): {effect}",
                    f"use a certificate from a public CA with DNS:{probe.host} in its subjectAltName",
                )
            )
        elif tls.cert is not None and tls.cert.not_after - now < CERT_EXPIRY_WARNING:
            marks.append(
                Mark(
                    "sts.cert",
                    level,
                    probe.label,
                    f"certificate expires {tls.cert.not_after:%Y-%m-%d}, "
                    f"within {CERT_EXPIRY_WARNING.days} days: {effect} from then",
                    "renew it (and automate the renewal)",
                )
            )
        else:
            until = f" until {tls.cert.not_after:%Y-%m-%d}" if tls.cert else ""
            marks.append(Mark("sts.cert", Level.OK, probe.label, f"certificate valid for {probe.host}{until}"))
    return marks
