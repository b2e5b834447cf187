"""A small authoritative DNS server for tests: UDP and TCP on one loopback address and port.

It serves zones given as zone-file text or as dicts, answers like an authoritative server (AA, CNAME
chains inside its zones, NXDOMAIN/NODATA with the SOA in the authority section, referrals below a
delegation) and can be told to misbehave per name (SERVFAIL or any rcode, silence, delay). It is a
stub resolver's only upstream in tests, so it answers every query it can, whatever the RD bit says;
names outside its zones get REFUSED. Every query is logged in `server.queries`. `secure(zone)` makes
its answers carry the AD bit, as a validating resolver's would for a DNSSEC-signed zone (no signatures).

    with DnsServer({"example.test": {"@": {"MX": ["10 mx1", "20 mx2.other.test."]},
                                     "mx1": {"A": "127.1.0.1"}}}) as dns:
        resolver.nameservers = [dns.host]; resolver.port = dns.port   # or: dns.nameserver == "IP:PORT"

Dict zones: owner ("@", relative or absolute with a trailing dot) -> rdtype -> rdata text or a list of
them; a "$TTL" key sets the zone's TTL (default 300). An SOA is added when none is given; NS is never
invented. Runs in two daemon threads (socketserver); stop() or leaving the `with` stops them.
"""

from __future__ import annotations

import errno
import random
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

ZoneSpec = str | Mapping[str, Any]

_MAX_CNAME_CHAIN = 8
_TCP_IDLE_S = 5.0  # a TCP client that says nothing for this long is dropped
_TCP_MAX_MESSAGES = 100  # per connection


@dataclass(frozen=True, slots=True)
class Query:
    qname: str  # lower case, no trailing dot
    rdtype: str  # "MX", "A", ...
    transport: str  # "udp" | "tcp"
    client: str


@dataclass(frozen=True, slots=True)
class _Fault:
    rcode: int | None = None  # answer with this rcode and no records
    drop: bool = False  # never answer
    delay: float = 0.0  # seconds before answering (or before dropping)


def build_zone(origin: str, spec: ZoneSpec, *, default_ttl: int = 300) -> dns.zone.Zone:
    """A dnspython zone from zone-file text (relative names are relative to `origin`) or a dict."""
    text = spec if isinstance(spec, str) else _dict_to_text(origin, spec, default_ttl)
    if "SOA" not in text.upper():
        text = f"@ {default_ttl} IN SOA ns.invalid. hostmaster.invalid. 1 3600 600 86400 {default_ttl}\n" + text
    if "$TTL" not in text.upper():
        text = f"$TTL {default_ttl}\n" + text
    return dns.zone.from_text(text, origin=_abs(origin), relativize=False, check_origin=False)


def _dict_to_text(origin: str, spec: Mapping[str, Any], default_ttl: int) -> str:
    ttl = int(spec.get("$TTL", default_ttl))
    lines: list[str] = []
    for owner, rrsets in spec.items():
        if owner == "$TTL":
            continue
        if not isinstance(rrsets, Mapping):
            raise TypeError(f"zone {origin}: {owner}: expected a mapping of rdtype -> rdata")
        for rdtype, values in rrsets.items():
            items = [values] if isinstance(values, str) else list(values)
            for value in items:
                lines.append(f"{owner} {ttl} IN {rdtype.upper()} {value}")
    return "\n".join(lines) + "\n"


def _abs(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


class DnsServer:
    """An authoritative server for test zones on `host`:`port` (UDP and TCP, same port)."""

    def __init__(
        self,
        zones: Mapping[str, ZoneSpec] | None = None,
        *,
        host: str = "127.0.0.53",
        port: int = 0,
        default_ttl: int = 300,
        force_tcp: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.default_ttl = default_ttl
        self.force_tcp = force_tcp  # answer every UDP query with TC=1, so clients retry over TCP
        self.queries: list[Query] = []
        self._zones: dict[dns.name.Name, dns.zone.Zone] = {}
        self._faults: dict[tuple[dns.name.Name, int | None], _Fault] = {}
        self._secure: set[dns.name.Name] = set()
        self._lock = threading.Lock()
        self._udp: socketserver.BaseServer | None = None
        self._tcp: socketserver.BaseServer | None = None
        self._threads: list[threading.Thread] = []
        for name, spec in (zones or {}).items():
            self.set_zone(name, spec)

    # --- what is served ----------------------------------------------------------------------
    @property
    def nameserver(self) -> str:
        """ "IP:PORT" (or "[IPv6]:PORT"), the form `[dns] nameservers` and `--nameserver` take."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def set_zone(self, name: str, spec: ZoneSpec) -> None:
        """Add or replace a zone; takes effect for the next query."""
        zone = build_zone(name, spec, default_ttl=self.default_ttl)
        with self._lock:
            self._zones[zone.origin] = zone

    def secure(self, name: str) -> None:
        """Answers from zone `name` carry AD=1 (authenticated data), as if it were signed and validated."""
        with self._lock:
            self._secure.add(_abs(name))

    def remove_zone(self, name: str) -> None:
        with self._lock:
            self._zones.pop(_abs(name), None)

    def fail(self, name: str, rdtype: str | None = None, rcode: str = "SERVFAIL", *, delay: float = 0.0) -> None:
        """Answer queries for `name` (of `rdtype`, or any type) with `rcode` and no records."""
        self._set_fault(name, rdtype, _Fault(rcode=dns.rcode.from_text(rcode), delay=delay))

    def drop(self, name: str, rdtype: str | None = None) -> None:
        """Never answer queries for `name` (of `rdtype`, or any type): the client times out."""
        self._set_fault(name, rdtype, _Fault(drop=True))

    def delay(self, name: str, seconds: float, rdtype: str | None = None) -> None:
        """Answer queries for `name` correctly, but only after `seconds`."""
        self._set_fault(name, rdtype, _Fault(delay=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def queried(self, name: str, rdtype: str | None = None) -> int:
        """How many queries for `name` (and `rdtype`) arrived so far."""
        key = name.lower().rstrip(".")
        with self._lock:
            return sum(1 for q in self.queries if q.qname == key and (rdtype is None or q.rdtype == rdtype.upper()))

    def _set_fault(self, name: str, rdtype: str | None, fault: _Fault) -> None:
        key = (_abs(name), dns.rdatatype.from_text(rdtype) if rdtype else None)
        with self._lock:
            self._faults[key] = fault

    # --- life cycle -------------------------------------------------------------------------
    def start(self) -> DnsServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        handler_udp, handler_tcp = _udp_handler(self), _tcp_handler(self)
        last_error: OSError | None = None
        for _ in range(50):  # bounded: find one port free for both UDP and TCP
            port = self.port or random.randint(20000, 60000)
            udp = tcp = None
            try:
                udp = _server_class(socketserver.ThreadingUDPServer, family)((self.host, port), handler_udp)
                tcp = _server_class(socketserver.ThreadingTCPServer, family)((self.host, port), handler_tcp)
            except OSError as e:
                for s in (udp, tcp):
                    if s is not None:
                        s.server_close()
                last_error = e
                if self.port or e.errno != errno.EADDRINUSE:
                    raise
                continue
            self.port = port
            self._udp, self._tcp = udp, tcp
            break
        else:
            raise RuntimeError(f"no free port for DNS on {self.host}: {last_error}")
        for srv in (self._udp, self._tcp):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._udp = self._tcp = None
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- answering --------------------------------------------------------------------------
    def handle(self, wire: bytes, transport: str, client: str) -> bytes | None:
        """One query in, one response out (None: say nothing)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS; a real server would FORMERR when it can, silence is fine here
        if not query.question:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        self._log(
            Query(
                question.name.to_text(omit_final_dot=True).lower(),
                dns.rdatatype.to_text(question.rdtype),
                transport,
                client,
            )
        )
        fault = self._fault_for(question.name, question.rdtype)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.drop:
            return None
        response = dns.message.make_response(query)
        response.flags &= ~dns.flags.RA
        if fault is not None and fault.rcode is not None:
            response.set_rcode(fault.rcode)
        else:
            self._answer(response, question.name, question.rdtype)
            zone = self._zone_for(question.name)
            with self._lock:
                if zone is not None and zone.origin in self._secure:
                    response.flags |= dns.flags.AD
        return self._to_wire(query, response, transport)

    def _log(self, q: Query) -> None:
        with self._lock:
            self.queries.append(q)

    def _fault_for(self, name: dns.name.Name, rdtype: int) -> _Fault | None:
        with self._lock:
            return self._faults.get((name, rdtype)) or self._faults.get((name, None))

    def _zone_for(self, name: dns.name.Name) -> dns.zone.Zone | None:
        with self._lock:
            best: dns.zone.Zone | None = None
            for origin, zone in self._zones.items():
                if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                    best = zone
            return best

    def _answer(self, response: dns.message.Message, qname: dns.name.Name, rdtype: int) -> None:
        name = qname
        for _ in range(_MAX_CNAME_CHAIN):
            zone = self._zone_for(name)
            if zone is None:
                if name == qname:
                    response.set_rcode(dns.rcode.REFUSED)
                return  # a CNAME out of our zones: the client follows it on its own
            if name == qname:
                response.flags |= dns.flags.AA
            cut = _delegation(zone, name)
            if cut is not None and not (rdtype == dns.rdatatype.DS and cut[0] == name):
                if name == qname:
                    response.flags &= ~dns.flags.AA
                    self._referral(response, zone, *cut)
                return
            node = zone.get_node(name)
            if node is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(response, zone)
                return
            rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rdataset is not None:
                response.answer.append(_rrset(name, rdataset))
                return
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None:
                self._add_soa(response, zone)  # NODATA
                return
            response.answer.append(_rrset(name, cname))
            name = cname[0].target

    def _referral(
        self, response: dns.message.Message, zone: dns.zone.Zone, cut: dns.name.Name, ns: dns.rdataset.Rdataset
    ) -> None:
        response.authority.append(_rrset(cut, ns))
        for rdata in ns:
            glue = zone.get_node(rdata.target) if rdata.target.is_subdomain(zone.origin) else None
            for rdt in (dns.rdatatype.A, dns.rdatatype.AAAA):
                rds = glue.get_rdataset(dns.rdataclass.IN, rdt) if glue is not None else None
                if rds is not None:
                    response.additional.append(_rrset(rdata.target, rds))

    def _add_soa(self, response: dns.message.Message, zone: dns.zone.Zone) -> None:
        soa = zone.find_rdataset(zone.origin, dns.rdatatype.SOA)
        rrset = _rrset(zone.origin, soa)
        rrset.ttl = min(soa.ttl, soa[0].minimum)  # RFC 2308: the negative TTL
        response.authority.append(rrset)

    def _to_wire(self, query: dns.message.Message, response: dns.message.Message, transport: str) -> bytes:
        if transport == "tcp":
            return response.to_wire()
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            if self.force_tcp:
                raise dns.exception.TooBig
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | (response.flags & dns.flags.AA)
            truncated.flags &= ~dns.flags.RA
            return truncated.to_wire()


def _delegation(zone: dns.zone.Zone, name: dns.name.Name) -> tuple[dns.name.Name, dns.rdataset.Rdataset] | None:
    """The highest zone cut below the zone's apex, at or above `name`, if any."""
    for k in range(len(zone.origin) + 1, len(name) + 1):
        candidate = dns.name.Name(name.labels[len(name) - k :])
        node = zone.get_node(candidate)
        ns = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NS) if node is not None else None
        if ns is not None:
            return candidate, ns
    return None


def _rrset(name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, rdataset.rdclass, rdataset.rdtype)
    rrset.update(rdataset)
    return rrset


def _server_class(base: type[socketserver.BaseServer], family: int) -> Any:
    return type(
        f"Lab{base.__name__}",
        (base,),
        {"address_family": family, "daemon_threads": True, "allow_reuse_address": True, "block_on_close": False},
    )


def _udp_handler(server: DnsServer) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            out = server.handle(data, "udp", self.client_address[0])
            if out is not None:
                sock.sendto(out, self.client_address)

    return Handler


def _tcp_handler(server: DnsServer) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(_TCP_IDLE_S)
            for _ in range(_TCP_MAX_MESSAGES):
                try:
                    head = _recv_exactly(sock, 2)
                    wire = _recv_exactly(sock, struct.unpack("!H", head)[0])
                except (OSError, EOFError):
                    return
                out = server.handle(wire, "tcp", self.client_address[0])
                if out is None:
                    return
                try:
                    sock.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    return

    return Handler


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def merge_zones(*parts: Mapping[str, ZoneSpec]) -> dict[str, ZoneSpec]:
    """Later parts win per zone name; handy to add a case's zones to a shared base."""
    out: dict[str, ZoneSpec] = {}
    for part in parts:
        for name, spec in part.items():
            out[_abs(name).to_text().lower()] = spec
    return out


__all__: Sequence[str] = ("DnsServer", "Query", "ZoneSpec", "build_zone", "merge_zones")
