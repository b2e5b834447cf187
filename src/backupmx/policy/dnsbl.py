"""DNS blocklists (RFC 5782), asked when a client connects: `[policy] dnsbl = ["zone", ...]`.

The client's address is looked up in every zone at once (reversed octets for IPv4, nibbles for IPv6);
an A record in 127.0.0.0/8 means listed, and the client gets `554 5.7.1 Service unavailable; Client
host [ip] blocked` instead of the banner. The zone is named only in the mail log, never to the client.
A timeout, SERVFAIL, a refused query or any DNS error skips that zone: a DNS problem never rejects
and never crashes a session. The 127.255.255.0/24 answers some lists give for a refused or
over-quota query (Spamhaus: 252, 254, 255) are errors too, logged, never "listed". Lookups use
`[dns] nameservers` when set (also how tests point it at a local server), else the system's resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from backupmx.config import Config, DnsConfig, parse_hostport
from backupmx.policy import SessionInfo, Stage, Verdict
from backupmx.reply import Reply

log = logging.getLogger("backupmx.policy")

_LISTED = ipaddress.ip_network("127.0.0.0/8")
_ERRORS = ipaddress.ip_network("127.255.255.0/24")


def blocked(client_ip: str) -> Reply:
    return Reply(554, "5.7.1", f"Service unavailable; Client host [{client_ip}] blocked")


def configure(resolver: dns.resolver.BaseResolver, config: DnsConfig) -> None:
    """Point a dnspython resolver (sync or async) at `[dns] nameservers` ("IP" or "IP:PORT")."""
    if config.nameservers:
        servers: list[str | dns.nameserver.Nameserver] = []
        for item in config.nameservers:
            host, port = parse_hostport(item, default_port=53)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    resolver.lifetime = config.timeout.total_seconds()
    resolver.timeout = min(resolver.lifetime, 2.0)  # per try; another server or a retry may follow


def async_resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
    configure(resolver, config)
    return resolver


def query_name(ip: str, zone: str) -> str | None:
    """ "192.0.2.1" -> "1.2.0.192.<zone>"; IPv6 as 32 nibbles; None for something that is no address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split("."))) + "." + zone
    return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + zone


class DnsblCheck:
    name = "dnsbl"
    stages = frozenset({Stage.CONNECT})

    def __init__(self, zones: Sequence[str], resolver: dns.asyncresolver.Resolver, *, timeout: float) -> None:
        self.zones = tuple(zones)
        self._resolver = resolver
        self._timeout = timeout

    @classmethod
    def from_config(cls, cfg: Config) -> DnsblCheck | None:
        if not cfg.policy.dnsbl:
            return None
        return cls(cfg.policy.dnsbl, async_resolver(cfg.dns), timeout=cfg.dns.timeout.total_seconds())

    async def listed_in(self, ip: str) -> list[str]:
        """The zones that list `ip` (in configured order); zones that failed to answer are left out."""
        names = [(zone, query_name(ip, zone)) for zone in self.zones]
        results = await asyncio.gather(*(self._lookup(zone, name) for zone, name in names if name))
        return [zone for zone, hit in zip((z for z, n in names if n), results, strict=True) if hit]

    async def _lookup(self, zone: str, name: str) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._resolver.resolve(name, "A", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return False
        except (TimeoutError, dns.exception.DNSException, OSError) as e:
            log.info("dnsbl %s: lookup failed (%s); skipped", zone, type(e).__name__)
            return False
        hit = False
        for rr in answer:
            try:
                addr = ipaddress.ip_address(rr.address)
            except ValueError:
                continue
            if addr in _ERRORS:
                log.warning("dnsbl %s: answered %s (the list refuses our queries); skipped", zone, addr)
                return False
            if addr in _LISTED:
                hit = True
        return hit

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
        zones = await self.listed_in(session.client_ip)
        if not zones:
            return Verdict.cont()
        return Verdict.reject(blocked(session.client_ip), log_reason=f"dnsbl {','.join(zones)}")


__all__ = ["DnsblCheck", "async_resolver", "blocked", "configure", "query_name"]
