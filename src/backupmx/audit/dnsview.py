"""Gathers the DNS view `check` judges: the domain's MX records with their A/AAAA addresses, its NS
hosts, and, for every MX and NS host name, the zone that holds the name and that zone's nameservers.

Lookups go through the system resolver or the given nameservers ("IP", "IP:PORT", "[IPv6]:PORT"), run
concurrently, are each asked once per run, and are bounded by the resolver lifetime. Failures are not
raised: they are recorded on the view (`mx_error`, `Host.error`, `ZoneView.error`) for the rules to judge.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from backupmx.audit.views import Address, DnsView, Host, MxRecord, Role, ZoneView
from backupmx.config import parse_hostport

MAX_MX = 20  # MX records considered; more is a misconfiguration, and every one costs SMTP sessions
MAX_NS = 20
MAX_ADDRESSES = 16  # per host name

T = TypeVar("T")


def parse_nameserver(value: str) -> tuple[str, int]:
    """ "192.0.2.53", "192.0.2.53:5353", "[2001:db8::53]:53", "2001:db8::53" -> (ip, port). ValueError else."""
    text = value.strip()
    try:
        ipaddress.ip_address(text)  # a bare IPv6 address has colons but no port
    except ValueError:
        host, port = parse_hostport(text, default_port=53)
    else:
        host, port = text, 53
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: a nameserver is an IP address, optionally with :PORT") from None
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port out of range")
    return host, port


def make_resolver(nameservers: Sequence[str], timeout: float) -> tuple[dns.asyncresolver.Resolver, str]:
    """A resolver for the given nameservers (the system's when empty) and a description of it."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        targets = [parse_nameserver(ns) for ns in nameservers]
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in targets]
        described = ", ".join(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in targets)
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise ValueError("no system resolver is configured (no /etc/resolv.conf): give a nameserver") from None
        described = "system (" + ", ".join(str(ns) for ns in resolver.nameservers) + ")"
    resolver.lifetime = timeout
    # AD in the query asks a validating resolver to say whether the answer is DNSSEC-authenticated
    # (RFC 6840 §5.7); DANE needs that for TLSA records
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.timeout = max(0.5, timeout / 3)  # per try: a lost UDP packet gets retried within the lifetime
    resolver.cache = dns.resolver.Cache()
    return resolver, described


def normalize_domain(domain: str) -> str:
    """ "Example.COM." -> "example.com"; internationalized names in their A-label form. ValueError else."""
    text = domain.strip().rstrip(".")
    if not text or "@" in text or any(c.isspace() for c in text) or text.startswith("."):
        raise ValueError(f"{domain!r} is not a domain name")
    try:
        name = dns.name.from_unicode(text + ".")
    except (dns.exception.DNSException, UnicodeError) as e:
        raise ValueError(f"{domain!r} is not a domain name: {e}") from None
    return name.to_text(omit_final_dot=True).lower()


async def gather_dns(domain: str, resolver: dns.asyncresolver.Resolver, described: str) -> DnsView:
    lookup = _Lookup(resolver)
    mx_task = asyncio.ensure_future(lookup.mx(domain))
    ns_task = asyncio.ensure_future(lookup.ns(domain))
    (mx_records, mx_error, null_mx), (ns_hosts, ns_error) = await asyncio.gather(mx_task, ns_task)
    names = sorted({r.host.name for r in mx_records} | {h.name for h in ns_hosts})
    zone_names = await asyncio.gather(*(lookup.zone_of(n) for n in names))
    zone_of = {n: z for n, z in zip(names, zone_names, strict=True) if z is not None}
    zones_list = sorted(set(zone_of.values()))
    zone_views = await asyncio.gather(*(lookup.zone_view(z) for z in zones_list))
    return DnsView(
        domain=domain,
        resolver=described,
        mx=mx_records,
        mx_error=mx_error,
        null_mx=null_mx,
        ns=ns_hosts,
        ns_error=ns_error,
        zone_of=zone_of,
        zones=dict(zip(zones_list, zone_views, strict=True)),
    )


async def lookup_records(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> tuple[list[Any], bool, str | None]:
    """(rdatas, authenticated, error) for one question. No such record (NXDOMAIN, NODATA) is ([], False, None);
    `authenticated` is the AD bit of the answer (only a validating resolver sets it)."""
    try:
        answer = await resolver.resolve(name, rdtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], False, None
    except dns.exception.DNSException as e:
        return [], False, describe_error(e, rdtype)
    return list(answer), bool(answer.response.flags & dns.flags.AD), None


def txt_strings(rdatas: Sequence[Any]) -> list[str]:
    """TXT rdatas as text: the character-strings of one record joined without separator (RFC 7208 §3.3)."""
    return [b"".join(r.strings).decode("utf-8", "replace") for r in rdatas]


def describe_error(e: BaseException, rdtype: str = "") -> str:
    """One line for a failed lookup, the same wording everywhere in the report."""
    if isinstance(e, dns.resolver.NXDOMAIN):
        return "does not exist (NXDOMAIN)"
    if isinstance(e, dns.resolver.NoAnswer):
        return f"no {rdtype} record" if rdtype else "no answer"
    if isinstance(e, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return "DNS timeout"
    if isinstance(e, dns.resolver.NoNameservers):
        return "no nameserver answered (SERVFAIL or REFUSED)"
    if isinstance(e, dns.resolver.NoResolverConfiguration):
        return "no resolver configured (no /etc/resolv.conf; use --nameserver)"
    return f"{type(e).__name__}: {e}"


class _Lookup:
    """Each question asked once per run; concurrent askers share the answer."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver
        self._memo: dict[tuple[str, str], asyncio.Future[Any]] = {}

    def _once(self, key: tuple[str, str], make: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        fut = self._memo.get(key)
        if fut is None:
            fut = asyncio.ensure_future(make())
            self._memo[key] = fut
        return fut

    async def mx(self, domain: str) -> tuple[tuple[MxRecord, ...], str | None, bool]:
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.exception.DNSException as e:
            return (), describe_error(e, "MX"), False
        rrset = answer.rrset
        assert rrset is not None
        rdatas = sorted(rrset, key=lambda r: (r.preference, r.exchange.to_text().lower()))[:MAX_MX]
        if len(rdatas) == 1 and rdatas[0].exchange == dns.name.root:
            return (), "null MX (RFC 7505): the domain says it accepts no mail", True
        hosts = await asyncio.gather(*(self.host(r.exchange.to_text(omit_final_dot=True)) for r in rdatas))
        best = rdatas[0].preference
        records = tuple(
            MxRecord(r.preference, h, rrset.ttl, Role.PRIMARY if r.preference == best else Role.BACKUP)
            for r, h in zip(rdatas, hosts, strict=True)
        )
        return records, None, False

    async def ns(self, domain: str) -> tuple[tuple[Host, ...], str | None]:
        names, error = await self.ns_names(domain)
        hosts = await asyncio.gather(*(self.host(n) for n in names))
        return tuple(hosts), error

    def ns_names(self, zone: str) -> Awaitable[tuple[tuple[str, ...], str | None]]:
        async def ask() -> tuple[tuple[str, ...], str | None]:
            try:
                answer = await self.resolver.resolve(zone, "NS")
            except dns.exception.DNSException as e:
                return (), describe_error(e, "NS")
            names = sorted({r.target.to_text(omit_final_dot=True).lower() for r in answer})
            return tuple(names[:MAX_NS]), None

        return self._once((zone, "NS"), ask)

    def host(self, name: str) -> Awaitable[Host]:
        name = name.lower().rstrip(".")

        async def ask() -> Host:
            results = await asyncio.gather(self._addresses(name, "A"), self._addresses(name, "AAAA"))
            addresses = tuple(a for addrs, _, _ in results for a in addrs)[:MAX_ADDRESSES]
            cname = next((c for _, _, c in results if c), None)
            failures = [
                (rdtype, e)
                for (_, e, _), rdtype in zip(results, ("A", "AAAA"), strict=True)
                if e is not None and not isinstance(e, dns.resolver.NoAnswer)
            ]
            error = None
            nxdomain = [e for _, e in failures if isinstance(e, dns.resolver.NXDOMAIN)]
            if nxdomain:
                error = describe_error(nxdomain[0])
            elif failures:  # timeouts or SERVFAIL: maybe only one family is missing
                error = "; ".join(f"{rdtype}: {describe_error(e)}" for rdtype, e in failures)
            elif not addresses:
                error = "no A or AAAA record"
            return Host(name, addresses, error, cname)

        return self._once((name, "host"), ask)

    async def _addresses(self, name: str, rdtype: str) -> tuple[list[Address], Exception | None, str | None]:
        try:
            answer = await self.resolver.resolve(name, rdtype)
        except dns.exception.DNSException as e:
            return [], e, None
        rrset = answer.rrset
        assert rrset is not None
        canonical = answer.canonical_name.to_text(omit_final_dot=True).lower()
        cname = canonical if canonical != name else None
        return [Address(r.address, rrset.ttl) for r in rrset], None, cname

    def zone_of(self, name: str) -> Awaitable[str | None]:
        async def ask() -> str | None:
            try:
                zone = await dns.asyncresolver.zone_for_name(
                    name, resolver=self.resolver, lifetime=self.resolver.lifetime
                )
            except dns.exception.DNSException:
                return None
            return zone.to_text(omit_final_dot=True).lower() or "."

        return self._once((name, "zone"), ask)

    def zone_view(self, zone: str) -> Awaitable[ZoneView]:
        async def ask() -> ZoneView:
            names, error = await self.ns_names(zone)
            hosts = await asyncio.gather(*(self.host(n) for n in names))
            return ZoneView(zone, tuple(hosts), error)

        return self._once((zone, "zone-view"), ask)
