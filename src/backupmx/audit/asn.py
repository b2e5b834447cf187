"""Who announces each MX address: its origin AS and BGP prefix, from a local IP-to-AS file (`--asn-db`,
pyasn's IPASN format) or, when the operator opts in, from Team Cymru's DNS service (`--asn-lookup dns`,
which then learns the addresses); and the marks site.asn and site.prefix: is the backup announced by the
primary's network? Lookup failures are recorded per address (`Origin.error`), never raised.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver

from backupmx.audit.dnsview import lookup_records, txt_strings
from backupmx.audit.views import Host, Level, Mark, MxRecord

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Origin:
    ip: str
    asn: int | None = None
    prefix: str | None = None
    error: str | None = None  # not found, or the lookup failed

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "asn": self.asn, "prefix": self.prefix, "error": self.error}


@dataclass(frozen=True, slots=True)
class AsnView:
    source: str | None  # "file PATH" | "dns (origin.asn.cymru.com)" | None: not checked
    origins: dict[str, Origin] = field(default_factory=dict)  # by address

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "origins": [o.to_json() for o in self.origins.values()]}


class AsnTable:
    """A pyasn IPASN file: "prefix/len<TAB>ASN" lines, ";" comments, looked up by longest prefix.

    Read by hand rather than with pyasn: pyasn is a C extension whose last release predates the Python
    versions we run on, and all `check` needs is a longest-prefix match over a few addresses. Given
    `only` (the addresses to look up), just the prefixes that cover them are kept: a full table has a
    million lines, and keeping them all would cost this short-lived command some 150 MB.
    """

    def __init__(self, lines: Iterable[str], name: str = "ASN file", only: Iterable[str] | None = None) -> None:
        self._by_len: dict[tuple[int, int], dict[int, int]] = {}  # (version, length) -> {network int: ASN}
        wanted = None if only is None else _covering_keys(only)
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith(";"):
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError('expected "prefix/len<TAB>ASN"')
                net = ipaddress.ip_network(parts[0], strict=False)
                asn = int(parts[1])
                if not 0 <= asn < 2**32:
                    raise ValueError(f"AS number {asn} out of range")
            except ValueError as e:
                raise ValueError(f"{name}: line {n}: {e}") from None
            key = (net.version, net.prefixlen)
            if wanted is None or (*key, int(net.network_address)) in wanted:
                self._by_len.setdefault(key, {})[int(net.network_address)] = asn
        self._lengths = sorted(self._by_len, key=lambda k: -k[1])

    @classmethod
    def load(cls, path: str, only: Iterable[str] | None = None) -> AsnTable:
        """ValueError (with the file and line) for a file that is missing or not in the format."""
        name = f"--asn-db {path}"
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return cls(f, name, only)
        except OSError as e:
            raise ValueError(f"{name}: {e.strerror}") from None

    @staticmethod
    def check_readable(path: str) -> None:
        """Fail early, before any lookup, on the usual mistake: a wrong path."""
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ValueError(f"--asn-db {path}: {e.strerror}") from None

    def lookup(self, ip: str) -> Origin:
        addr = ipaddress.ip_address(ip)
        bits = addr.max_prefixlen
        for version, length in self._lengths:
            if version != addr.version:
                continue
            key = int(addr) >> (bits - length) << (bits - length)
            asn = self._by_len[(version, length)].get(key)
            if asn is not None:
                net = (ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((key, length))
                return Origin(ip, asn, str(net))
        return Origin(ip, error="not in the ASN file (unannounced?)")


def _covering_keys(ips: Iterable[str]) -> set[tuple[int, int, int]]:
    """(version, length, network int) of every prefix that contains one of `ips`."""
    keys: set[tuple[int, int, int]] = set()
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        bits = addr.max_prefixlen
        for length in range(bits + 1):
            keys.add((addr.version, length, int(addr) >> (bits - length) << (bits - length)))
    return keys


def cymru_name(ip: str) -> str:
    """The question for Team Cymru's origin service: reversed octets (IPv4) or nibbles (IPv6)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ".".join(reversed(str(addr).split("."))) + ".origin.asn.cymru.com"
    return ".".join(reversed(addr.exploded.replace(":", ""))) + ".origin6.asn.cymru.com"


async def cymru_origin(ip: str, resolver: dns.asyncresolver.Resolver) -> Origin:
    """TXT "ASN [ASN...] | PREFIX | CC | REGISTRY | DATE"; the first origin AS is taken."""
    rdatas, _, error = await lookup_records(resolver, cymru_name(ip), "TXT")
    if error:
        return Origin(ip, error=error)
    for text in txt_strings(rdatas):
        fields = [f.strip() for f in text.split("|")]
        try:
            asn = int(fields[0].split()[0])
            prefix = str(ipaddress.ip_network(fields[1], strict=False))
        except (ValueError, IndexError):
            continue
        return Origin(ip, asn, prefix)
    return Origin(ip, error="no origin known (unannounced?)")


async def gather_origins(
    mx: tuple[MxRecord, ...], *, table: AsnTable | None, source: str | None, resolver: dns.asyncresolver.Resolver
) -> AsnView:
    if source is None:
        return AsnView(None)
    ips = list(dict.fromkeys(ip for r in mx for ip in r.host.ips))
    if not ips:
        return AsnView(source)
    if table is not None:
        return AsnView(source, {ip: table.lookup(ip) for ip in ips})
    found = await asyncio.gather(*(cymru_origin(ip, resolver) for ip in ips))
    return AsnView(source, {o.ip: o for o in found})


def asn_marks(domain: str, mx: tuple[MxRecord, ...], view: AsnView) -> list[Mark]:
    if not mx:
        return []
    if view.source is None:
        return [
            Mark(
                "site.asn",
                Level.INFO,
                domain,
                "origin AS and prefix not checked: give --asn-db FILE "
                "(pyasn format) or --asn-lookup dns to see whether the backup shares the primary's network",
            )
        ]
    primaries = [r.host for r in mx if r.role.value == "primary"]
    backups = [r.host for r in mx if r.role.value == "backup"]
    pairs: list[tuple[Host, list[Host]]] = (
        [(b, primaries) for b in backups]
        if backups
        else [(h, [p for p in primaries if p.name != h.name]) for h in primaries]
    )
    marks: list[Mark] = []
    seen: set[str] = set()
    for host, refs in pairs:
        if host.name in seen or not host.ips:
            continue
        seen.add(host.name)
        ref = [view.origins[ip] for r in refs for ip in r.ips if ip in view.origins]
        mine = [view.origins[ip] for ip in host.ips if ip in view.origins]
        unknown = [o for o in mine + ref if o.asn is None]
        known_ref = [o for o in ref if o.asn is not None]
        known = [o for o in mine if o.asn is not None]
        if unknown:
            listing = "; ".join(f"{o.ip}: {o.error}" for o in unknown)
            marks.append(Mark("site.asn", Level.INFO, host.name, f"origin unknown for {listing} ({view.source})"))
        if not known or not known_ref:
            continue
        # a host escapes through its best address: it is fine when one address is elsewhere
        shared_prefix = all(any(o.prefix == r.prefix for r in known_ref) for o in known)
        shared_asn = all(any(o.asn == r.asn for r in known_ref) for o in known)
        ours = ", ".join(f"{o.ip} AS{o.asn} {o.prefix}" for o in known)
        theirs = ", ".join(sorted({f"AS{o.asn} {o.prefix}" for o in known_ref}))
        if shared_prefix:
            marks.append(
                Mark(
                    "site.prefix",
                    Level.FAIL,
                    host.name,
                    f"{ours}: announced in the same prefix as "
                    f"the primary ({theirs}): one routing failure cuts both off",
                    "move the backup MX to another provider's network",
                )
            )
        else:
            marks.append(Mark("site.prefix", Level.OK, host.name, f"{ours}: not in the primary's prefix ({theirs})"))
        if shared_asn:
            marks.append(
                Mark(
                    "site.asn",
                    Level.WARN,
                    host.name,
                    f"same provider: {ours} is in the primary's AS "
                    f"({theirs}), often one data center or one network outage away",
                    "prefer a backup MX with another provider (another AS)",
                )
            )
        else:
            marks.append(Mark("site.asn", Level.OK, host.name, f"{ours}: another AS than the primary ({theirs})"))
    return marks
