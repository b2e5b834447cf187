"""Where a destination's mail goes: the configured primary host:port list, or the domain's MX hosts
that rank strictly better than this host (RFC 5321 §5.1), never this host itself.

Protected domains: a DNS failure (timeout, SERVFAIL, even NXDOMAIN) answers with the last good route,
or raises RouteError (defer), never a bounce; being the best MX ourselves is a loop and also RouteError.
Other domains (DSNs to senders): all MX hosts, or the domain's own address when it has no MX
(RFC 5321 §5 implicit MX); NXDOMAIN or a null MX there is permanent (`Route.failure`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from backupmx.config import Config, DnsConfig, parse_hostport
from backupmx.errors import RouteError
from backupmx.reply import Reply

MAX_TARGETS = 20  # addresses tried per attempt at most; the rest wait for the next round

NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Host or domain name not found")
NULL_MX = Reply(556, "5.1.10", "Recipient address has null MX")


class DnsTemporaryError(Exception):
    """Timeout, SERVFAIL, no reachable nameserver: try again later."""


class DnsNoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist (authoritative)."""


class DnsLookup(Protocol):
    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """(preference, exchange) pairs; [] when the domain exists but has no MX records.
        Raises DnsNoSuchDomain or DnsTemporaryError."""
        ...

    async def addresses(self, host: str) -> list[str]:
        """IPv4 and IPv6 addresses of `host`; [] when it has none. Raises DnsNoSuchDomain or
        DnsTemporaryError."""
        ...


class DnsPythonLookup:
    """dnspython against `[dns] nameservers` ("IP" or "IP:PORT"), else the system's resolv.conf.
    Without configured nameservers, host addresses come from the system resolver (getaddrinfo), so
    /etc/hosts is honoured as it is for every other program on the host."""

    def __init__(self, config: DnsConfig) -> None:
        self._timeout = config.timeout.total_seconds()
        self._own_servers = bool(config.nameservers)
        if config.nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for item in config.nameservers:
                host, port = parse_hostport(item, default_port=53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self._resolver.nameservers = servers
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=True)
        self._resolver.lifetime = self._timeout

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        try:
            answer = await self._resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN as e:
            raise DnsNoSuchDomain(domain) from e
        except dns.resolver.NoAnswer:
            return []
        except (dns.exception.DNSException, OSError) as e:
            raise DnsTemporaryError(f"{domain} MX: {type(e).__name__}") from e
        out: list[tuple[int, str]] = []
        for rr in answer:
            out.append((int(rr.preference), rr.exchange.to_text(omit_final_dot=True).lower()))
        return out

    async def addresses(self, host: str) -> list[str]:
        if _ip_literal(host):
            return [host]
        if not self._own_servers:
            return await _getaddrinfo(host, self._timeout)
        found: list[str] = []
        missing = 0
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype, search=False)
            except dns.resolver.NXDOMAIN as e:
                raise DnsNoSuchDomain(host) from e
            except dns.resolver.NoAnswer:
                missing += 1
                continue
            except (dns.exception.DNSException, OSError) as e:
                if found:
                    break  # one family is enough to deliver
                raise DnsTemporaryError(f"{host} {rdtype}: {type(e).__name__}") from e
            found.extend(rr.address for rr in answer)
        return found


async def _getaddrinfo(host: str, timeout: float) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout)
    except TimeoutError as e:
        raise DnsTemporaryError(f"{host}: lookup timed out") from e
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise DnsNoSuchDomain(host) from e
        raise DnsTemporaryError(f"{host}: {e.strerror}") from e
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in out:
            out.append(addr)
    return out


# --- routes ------------------------------------------------------------------------------------------
class RouteSource(StrEnum):
    CONFIG = "config"  # domain.primary host:port list
    MX = "mx"  # MX hosts better than ours / all MX for other domains
    IMPLICIT = "implicit"  # no MX records: the domain's own address (RFC 5321 §5)
    CACHED = "cached"  # the last good answer, used because DNS failed now
    REROUTE = "reroute"  # set by the operator (engine.set_reroute)


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # name for TLS (SNI, certificate checks) and logs
    port: int
    address: str | None = None  # the IP to connect to; None = let the system resolve `host`

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    domain: str
    targets: tuple[Target, ...]
    source: RouteSource
    failure: Reply | None = None  # permanent: no such domain / null MX (never for protected domains)


LAST_GOOD_MAX = 10_000  # last good routes kept; protected domains' are never dropped


class RouteResolver:
    """Routes per destination domain, shared by the engine and the health monitor (one cache of the
    last good answers). `mx_port` exists for tests; MX delivery is to port 25."""

    def __init__(
        self,
        config: Config,
        dns_lookup: DnsLookup | None = None,
        *,
        mx_port: int = 25,
        is_local_address: Callable[[str], bool] | None = None,
    ) -> None:
        self._config = config
        self._dns: DnsLookup = dns_lookup or DnsPythonLookup(config.dns)
        self._mx_port = mx_port
        self._is_local = is_local_address or _is_local_address
        names = {config.server.hostname, config.server.node}
        self._own_names = {n.lower().rstrip(".") for n in names if n}
        self._listen = [parse_hostport(item) for item in config.server.listen]
        self._last_good: dict[str, Route] = {}

    def protected(self, domain: str) -> bool:
        return self._config.domain(domain) is not None

    def last_good(self, domain: str) -> Route | None:
        return self._last_good.get(domain.lower())

    async def resolve(self, domain: str) -> Route:
        """Raises RouteError when there is no usable route right now (defer, never bounce)."""
        domain = domain.lower().rstrip(".")
        dcfg = self._config.domain(domain)
        try:
            if dcfg is not None and dcfg.primary_hosts is not None:
                route = await self._configured(domain, dcfg.primary_hosts)
            else:
                route = await self._via_mx(domain, protected=dcfg is not None)
        except (DnsTemporaryError, DnsNoSuchDomain) as e:
            cached = self._last_good.get(domain)
            if cached is not None:
                return Route(domain, cached.targets, RouteSource.CACHED)
            raise RouteError(f"{domain}: DNS lookup failed ({e}) and no earlier answer is known") from e
        if route.targets:
            self._last_good[domain] = route
            if len(self._last_good) > LAST_GOOD_MAX:  # senders' domains (DSNs) come and go: bounded
                for name in [n for n in self._last_good if self._config.domain(n) is None][: LAST_GOOD_MAX // 10]:
                    del self._last_good[name]  # the oldest answers of unprotected domains (insertion order)
        return route

    # -- configured primaries ----------------------------------------------------------------------
    async def _configured(self, domain: str, hosts: Sequence[tuple[str, int]]) -> Route:
        targets: list[Target] = []
        for host, port in hosts:
            try:
                addrs = [host] if _ip_literal(host) else await self._dns.addresses(host)
            except (DnsTemporaryError, DnsNoSuchDomain):
                targets.append(Target(host, port, None))  # try by name; the connection decides
                continue
            for addr in addrs:
                if not self.is_self(addr, port):
                    targets.append(Target(host, port, addr))
        if not targets:
            raise RouteError(f"{domain}: every configured primary is this host (mail loop)")
        return Route(domain, tuple(targets[:MAX_TARGETS]), RouteSource.CONFIG)

    # -- MX ----------------------------------------------------------------------------------------
    async def _via_mx(self, domain: str, *, protected: bool) -> Route:
        try:
            records = await self._dns.mx(domain)
        except DnsNoSuchDomain:
            if protected:
                raise  # -> last good answer or RouteError: never bounce our own domain's mail
            return Route(domain, (), RouteSource.MX, failure=NO_SUCH_DOMAIN)
        if len(records) == 1 and records[0][1] in ("", "."):
            if protected:
                raise RouteError(f"{domain}: null MX")
            return Route(domain, (), RouteSource.MX, failure=NULL_MX)
        source = RouteSource.MX
        if not records:
            records = [(0, domain)]  # implicit MX
            source = RouteSource.IMPLICIT
        records = sorted(records, key=lambda r: (r[0], r[1]))

        resolved: list[tuple[int, str, list[str] | None]] = []
        temporary: Exception | None = None
        for pref, host in records:
            try:
                addrs: list[str] | None = [host] if _ip_literal(host) else await self._dns.addresses(host)
            except DnsNoSuchDomain:
                addrs = []
            except DnsTemporaryError as e:
                addrs, temporary = None, e
            resolved.append((pref, host.lower().rstrip("."), addrs))

        ours: int | None = None
        for pref, host, addrs in resolved:
            if host in self._own_names or any(self.is_self(a, self._mx_port) for a in addrs or ()):
                ours = pref if ours is None else min(ours, pref)

        targets: list[Target] = []
        for pref, host, addrs in resolved:
            if ours is not None and pref >= ours:
                continue  # RFC 5321 §5.1: never to an MX of equal or worse preference than ours
            if addrs is None:
                targets.append(Target(host, self._mx_port, None))
                continue
            targets.extend(Target(host, self._mx_port, a) for a in addrs if not self.is_self(a, self._mx_port))
        if not targets:
            if temporary is not None:
                raise temporary
            if ours is not None:
                raise RouteError(f"{domain}: no MX host ranks better than this host (mail loop)")
            if protected:
                raise RouteError(f"{domain}: no MX host has an address")
            return Route(domain, (), source, failure=NO_SUCH_DOMAIN)
        return Route(domain, tuple(targets[:MAX_TARGETS]), source)

    # -- ourselves ---------------------------------------------------------------------------------
    def is_self(self, address: str, port: int) -> bool:
        """True when (address, port) is one of our own listening sockets."""
        for lhost, lport in self._listen:
            if lport != port:
                continue
            if lhost in ("", "0.0.0.0", "::", "*"):
                if self._is_local(address):
                    return True
            elif _same_ip(lhost, address):
                return True
        return False


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


_local_cache: dict[str, bool] = {}


def _is_local_address(address: str) -> bool:
    """Whether `address` belongs to this machine: loopback, or an address we can bind to."""
    if address in _local_cache:
        return _local_cache[address]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    local = ip.is_loopback or ip.is_unspecified
    if not local:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((address, 0))
            local = True
        except OSError:
            local = False
    _local_cache[address] = local
    return local
