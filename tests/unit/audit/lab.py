"""The `check` lab: a DNS server (tests/support/dnsserver.py) serving each case's zones, SMTP servers
(aiosmtpd) on distinct 127.x.y.z addresses, all on one port per lab, so that the MX records' A records
lead `check` to them, and HTTPS servers for MTA-STS policies on port 443 of random 127.7.x.y addresses.
Certificates come from a small PKI made with the openssl CLI once per session; so does the lab's ASN
file (pyasn format), which every lab check uses unless a case sets `lab.asn_db`.

Addresses: primaries in 127.1.0.0/16, backups in 127.2.0.0/16, nameservers of the shared DNS zones in
127.3.0.0/16 and 127.4.0.0/16 (their addresses are data only: the one DnsServer answers for all zones),
MTA-STS policy servers in 127.7.0.0/16. In the ASN file every 127.1.x.0/24 is announced by AS64501 and
every 127.2.x.0/24 by AS64502: one /24 is one prefix, one /16 one provider.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import random
import socket
import ssl
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from backupmx.audit import CheckReport, run_check
from backupmx.audit.report import Level
from backupmx.config import Config, config_from_dict
from tests.support.dnsserver import DnsServer, ZoneSpec, merge_zones

DNS_ONE, DNS_TWO = "ns1.dns-one.test.", "ns2.dns-two.test."
STD_NS = [DNS_ONE, DNS_TWO]
INFRA_ZONES: dict[str, ZoneSpec] = {
    "dns-one.test": {"@": {"NS": STD_NS}, "ns1": {"A": "127.3.0.53"}},
    "dns-two.test": {"@": {"NS": STD_NS}, "ns2": {"A": "127.4.0.53"}},
}
LAB_HELO = "checker.lab.test"
KNOWN_USERS = frozenset({"postmaster", "alice"})


# --- certificates -----------------------------------------------------------------------------------
class Pki:
    """A lab CA and certificates for MX names, made with the openssl CLI (EC P-256, valid 30 days)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca.pem"
        self._ca_key = root / "ca.key"
        _openssl(
            "req",
            "-x509",
            *_EC,
            "-nodes",
            "-keyout",
            self._ca_key,
            "-out",
            self.ca,
            "-days",
            "30",
            "-subj",
            "/O=backupmx lab/CN=backupmx lab CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        self._issued: dict[tuple[str, str], tuple[Path, Path]] = {}

    def leaf(self, name: str, kind: str = "ca") -> tuple[Path, Path]:
        """(cert, key) for `name`: signed by the lab CA ("ca") or self-signed ("self-signed")."""
        if (name, kind) in self._issued:
            return self._issued[(name, kind)]
        cert, key = self.root / f"{name}.{kind}.pem", self.root / f"{name}.{kind}.key"
        if kind == "self-signed":
            _openssl(
                "req",
                "-x509",
                *_EC,
                "-nodes",
                "-keyout",
                key,
                "-out",
                cert,
                "-days",
                "30",
                "-subj",
                f"/CN={name}",
                "-addext",
                f"subjectAltName=DNS:{name}",
            )
        else:
            csr, ext = self.root / f"{name}.csr", self.root / f"{name}.ext"
            ext.write_text(
                f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
            )
            _openssl("req", "-new", *_EC, "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
            _openssl(
                "x509",
                "-req",
                "-in",
                csr,
                "-CA",
                self.ca,
                "-CAkey",
                self._ca_key,
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                cert,
                "-extfile",
                ext,
            )
        self._issued[(name, kind)] = (cert, key)
        return cert, key

    def fullchain(self, name: str) -> Path:
        """The CA-signed certificate for `name` followed by the lab CA: what a server presents for DANE-TA."""
        out = self.root / f"{name}.fullchain.pem"
        if not out.exists():
            out.write_text(self.leaf(name)[0].read_text() + self.ca.read_text())
        return out

    def tlsa(self, name: str | None, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
        """TLSA rdata for the CA-signed certificate of `name` (None: the lab CA), e.g. "3 1 1 ab12..."."""
        cert = x509.load_pem_x509_certificate((self.leaf(name)[0] if name else self.ca).read_bytes())
        der = (
            cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            if selector == 1
            else cert.public_bytes(Encoding.DER)
        )
        data = hashlib.sha256(der).digest() if mtype == 1 else hashlib.sha512(der).digest() if mtype == 2 else der
        return f"{usage} {selector} {mtype} {data.hex()}"

    @property
    def asn_db(self) -> Path:
        """The lab's ASN file: 127.1.x.0/24 -> AS64501, 127.2.x.0/24 -> AS64502, ::1 -> AS64502."""
        out = self.root / "lab-asn.dat"
        if not out.exists():
            lines = ["; IP-ASN32-DAT file: the check lab's announcements"]
            lines += [f"127.{net}.{x}.0/24\t6450{net}" for net in (1, 2) for x in range(256)]
            lines += ["127.3.0.0/16\t64503", "127.4.0.0/16\t64504", "::1/128\t64502"]
            out.write_text("\n".join(lines) + "\n")
        return out


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


# --- SMTP servers -----------------------------------------------------------------------------------
@dataclass
class LabHandler:
    """aiosmtpd hooks of one lab MX: relay control, recipient list, and a log of what the client did."""

    name: str
    domains: frozenset[str]
    users: frozenset[str] | None = KNOWN_USERS  # None: any local part is accepted (a catch-all)
    open_relay: bool = False
    events: list[tuple[Any, str]] = field(default_factory=list)  # (session peer, command)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        self.events.append((session.peer, "MAIL"))
        envelope.mail_from = address
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        self.events.append((session.peer, "RCPT"))
        local, _, domain = address.rpartition("@")
        if domain.lower() not in self.domains and not self.open_relay:
            return "554 5.7.1 Relay access denied"
        if domain.lower() in self.domains and self.users is not None and local.lower() not in self.users:
            return "550 5.1.1 User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.events.append((session.peer, "RSET"))
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.events.append((session.peer, "QUIT"))
        return "221 2.0.0 Bye"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.events.append((session.peer, "DATA"))
        return "554 5.6.0 the audit must never send DATA"

    def sessions(self) -> dict[Any, list[str]]:
        out: dict[Any, list[str]] = {}
        for peer, cmd in self.events:
            out.setdefault(peer, []).append(cmd)
        return out


@dataclass
class LabMx:
    name: str
    address: str
    handler: LabHandler
    tls: str | None  # "ca" | "self-signed" | "chain" (with the CA) | None (no STARTTLS)
    cert_name: str | None = None  # the name its certificate is for (default: its own)


def pick_port(addresses: list[str], tries: int = 100) -> int:
    """One TCP port free on every address (MX records carry no port, so all lab MX hosts share one)."""
    rng = random.Random()
    for _ in range(tries):
        port = rng.randint(20000, 60000)
        socks: list[socket.socket] = []
        try:
            for addr in addresses:
                s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((addr, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return port
    raise RuntimeError(f"no port free on all of {addresses}")


# --- MTA-STS policy servers -------------------------------------------------------------------------
@dataclass
class PolicyReply:
    status: int = 200
    content_type: str = "text/plain"
    body: str = ""
    location: str | None = None  # for redirects
    cert_name: str | None = None  # the name on the server's certificate (default: mta-sts.DOMAIN)


class PolicyServer:
    """https://mta-sts.DOMAIN/.well-known/mta-sts.txt on ADDRESS:443 (a random 127.7.x.y, bound at once so
    that parallel test runs on this machine cannot collide), with a lab-CA certificate for the name."""

    def __init__(self, pki: Pki, domain: str, reply: PolicyReply) -> None:
        cert, key = pki.leaf(reply.cert_name or f"mta-sts.{domain}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        handler = _policy_handler(reply)
        rng = random.Random()
        port = 443
        for _ in range(50):  # bounded: another run may hold the address
            self.address = f"127.7.{rng.randint(0, 254)}.{rng.randint(1, 254)}"  # 127.7.255.x: nothing listens
            try:
                self.httpd = http.server.ThreadingHTTPServer((self.address, port), handler)
                break
            except PermissionError:  # not root: any port, and `check --sts-port` (test-only) to find it
                port = 0
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
        else:
            raise RuntimeError("no free 127.7.x.y:443 for the MTA-STS policy server")
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


def _policy_handler(reply: PolicyReply) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/.well-known/mta-sts.txt":
                self.send_error(404)
                return
            body = reply.body.encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(body)))
            if reply.location:
                self.send_header("Location", reply.location)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def sts_policy(mode: str, *mx: str, max_age: int = 604800) -> str:
    return "".join([f"version: STSv1\r\nmode: {mode}\r\n", *(f"mx: {m}\r\n" for m in mx), f"max_age: {max_age}\r\n"])


class Lab:
    """One case: zones plus SMTP servers. Use as a context manager, then `await lab.check(domain)`."""

    def __init__(self, pki: Pki, zones: Mapping[str, ZoneSpec] | None = None) -> None:
        self.pki = pki
        self.zones = merge_zones(INFRA_ZONES, zones or {})
        self.mxs: list[LabMx] = []
        self.port = 0
        self.dns = DnsServer(self.zones)
        self.asn_db: Path | None = pki.asn_db  # None: the site.asn/site.prefix checks are not asked for
        self._controllers: list[Controller] = []
        self._policy_servers: list[PolicyServer] = []

    def mx(
        self,
        name: str,
        address: str,
        *,
        domains: set[str] | frozenset[str],
        tls: str | None = "ca",
        users: frozenset[str] | None = KNOWN_USERS,
        open_relay: bool = False,
        cert_name: str | None = None,
    ) -> LabHandler:
        handler = LabHandler(name, frozenset(domains), users, open_relay)
        self.mxs.append(LabMx(name, address, handler, tls, cert_name))
        return handler

    def add_records(self, zone_name: str, records: Mapping[str, Any]) -> None:
        """More owners (relative names) -> {rdtype: rdata} in one of the lab's zones."""
        key = zone_name.lower().rstrip(".") + "."
        current = self.zones[key]
        assert not isinstance(current, str), "add_records works on dict zones"
        spec = dict(current)
        spec.update(records)
        self.zones[key] = spec
        self.dns.set_zone(key, spec)

    def sts(self, domain: str, policy: str | PolicyReply | None, *, txt: str = "v=STSv1; id=20261206") -> None:
        """Publish MTA-STS for `domain`: the TXT record, and the policy served over HTTPS (None: the TXT
        record only, mta-sts.DOMAIN pointing at an address where nothing listens)."""
        address = "127.7.255.254"
        if policy is not None:
            reply = policy if isinstance(policy, PolicyReply) else PolicyReply(body=policy)
            server = PolicyServer(self.pki, domain, reply)
            self._policy_servers.append(server)
            address = server.address
        self.add_records(domain, {"_mta-sts": {"TXT": f'"{txt}"'}, "mta-sts": {"A": address}})

    def __enter__(self) -> Lab:
        self.dns.start()
        try:
            for server in self._policy_servers:
                server.start()
            self.port = pick_port([m.address for m in self.mxs]) if self.mxs else 25
            for m in self.mxs:
                ctx = None
                if m.tls:
                    cert, key = self.pki.leaf(m.cert_name or m.name, "ca" if m.tls == "chain" else m.tls)
                    if m.tls == "chain":
                        cert = self.pki.fullchain(m.cert_name or m.name)
                    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    ctx.load_cert_chain(cert, key)
                controller = Controller(
                    m.handler,
                    hostname=m.address,
                    port=self.port,
                    server_hostname=m.name,
                    tls_context=ctx,
                    require_starttls=False,
                    ready_timeout=5.0,
                    # what a backupmx node offers, so node.ehlo has nothing to say
                    enable_SMTPUTF8=True,
                    data_size_limit=100_000_000,
                )
                controller.start()
                self._controllers.append(controller)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self._controllers:
            c.stop()
        self._controllers.clear()
        for server in self._policy_servers:
            server.stop()
        self._policy_servers.clear()
        self.dns.stop()

    @property
    def sts_port(self) -> int:
        """Where the policy servers listen: 443, unless this run may not bind it."""
        ports = {server.port for server in self._policy_servers} or {443}
        assert len(ports) == 1, "one policy port per lab"
        return ports.pop()

    async def check(self, domain: str, *, config: Config | None = None, timeout: float = 3.0, **kw: Any) -> CheckReport:
        kw.setdefault("asn_db", str(self.asn_db) if self.asn_db else None)
        kw.setdefault("sts_port", self.sts_port)
        return await run_check(
            domain,
            nameserver=self.dns.nameserver,
            config=config,
            smtp_port=self.port,
            timeout=timeout,
            cafile=str(self.pki.ca),
            helo=LAB_HELO,
            **kw,
        )

    def cli_args(self, domain: str) -> list[str]:
        asn = ["--asn-db", str(self.asn_db)] if self.asn_db else []
        asn += ["--sts-port", str(self.sts_port)] if self.sts_port != 443 else []
        return [
            "check",
            domain,
            "--nameserver",
            self.dns.nameserver,
            "--port",
            str(self.port),
            "--timeout",
            "3",
            "--cafile",
            str(self.pki.ca),
            *asn,
        ]

    def assert_clean_sessions(self) -> None:
        """No DATA anywhere; every session that issued a command ended with RSET then QUIT."""
        for m in self.mxs:
            for peer, cmds in m.handler.sessions().items():
                assert "DATA" not in cmds, (m.name, peer, cmds)
                assert cmds[-2:] == ["RSET", "QUIT"], (m.name, peer, cmds)


def problems(report: CheckReport) -> set[tuple[str, Level, str]]:
    """(check, level, subject) of every mark that is not ok."""
    return {(m.check, m.level, m.subject) for m in report.marks if m.level is not Level.OK}


# --- cases shared by the lab tests and the CLI tests -------------------------------------------------
TLSRPT = "v=TLSRPTv1; rua=mailto:tlsrpt@reports.lab.test"


def zone(
    mx: list[str], hosts: dict[str, str], ns: list[str] | None = None, tlsrpt: str | None = TLSRPT, **extra: Any
) -> dict[str, Any]:
    """A case's zone: MX records, A records of the hosts, NS (the two shared nameservers by default) and,
    with MX records, a TLS-RPT record (`tlsrpt`; None: none)."""
    spec: dict[str, Any] = {"@": {"NS": ns or STD_NS, "MX": mx} if mx else {"NS": ns or STD_NS}}
    if mx and tlsrpt is not None:
        spec["_smtp._tls"] = {"TXT": f'"{tlsrpt}"'}
    for name, ip in hosts.items():
        spec[name] = {"A": ip}
    spec.update(extra)
    return spec


def two_mx(domain: str, backup_ip: str = "127.2.0.1", **extra: Any) -> dict[str, Any]:
    return {domain: zone(["10 mx1", "20 mx2"], {"mx1": "127.1.0.1", "mx2": backup_ip}, **extra)}


def node_config(hostname: str, domains: list[str], lab: Lab | None = None, **domain_kw: Any) -> Config:
    # "verify": the default "any" would add a node.recipients warning (backscatter) to every report
    raw: dict[str, Any] = {
        "server": {"hostname": hostname},
        "domains": [{"name": d, "recipients": "verify", **domain_kw} for d in domains],
    }
    if lab is not None:
        raw["dns"] = {"nameservers": [lab.dns.nameserver]}
    return config_from_dict(raw, source="lab.toml")


def worst_lab(pki: Pki) -> Lab:
    """Everything at once: the backup shares the primary's /24 (and so its announced prefix and AS),
    offers no STARTTLS, accepts unknown users and relays; the domain's nameservers sit in the primary's
    network too; the MTA-STS policy (enforce, max_age an hour) lists the primary only; only the primary
    has a TLSA record (in a signed zone); there is no TLS-RPT record."""
    ns = ["ns1.worst.test.", "ns2.worst.test."]
    lab = Lab(
        pki,
        two_mx(
            "worst.test",
            "127.1.0.2",
            ns=ns,
            tlsrpt=None,
            ns1={"A": "127.1.0.53"},
            ns2={"A": "127.1.0.54"},
            **{"_25._tcp.mx1": {"TLSA": pki.tlsa("mx1.worst.test")}},
        ),
    )
    lab.dns.secure("worst.test")
    lab.sts("worst.test", sts_policy("enforce", "mx1.worst.test", max_age=3600))
    lab.mx("mx1.worst.test", "127.1.0.1", domains={"worst.test"})
    lab.mx("mx2.worst.test", "127.1.0.2", domains={"worst.test"}, tls=None, users=None, open_relay=True)
    return lab
