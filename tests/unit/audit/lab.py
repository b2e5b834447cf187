"""The `check` lab: a DNS server (tests/support/dnsserver.py) serving each case's zones, and SMTP servers
(aiosmtpd) on distinct 127.x.y.z addresses, all on one port per lab, so that the MX records' A records
lead `check` to them. Certificates come from a small PKI made with the openssl CLI once per session.

Addresses: primaries in 127.1.0.0/16, backups in 127.2.0.0/16, nameservers of the shared DNS zones in
127.3.0.0/16 and 127.4.0.0/16 (their addresses are data only: the one DnsServer answers for all zones).
"""

from __future__ import annotations

import random
import socket
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

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
        _openssl("req", "-x509", *_EC, "-nodes", "-keyout", self._ca_key, "-out", self.ca, "-days", "30",
                 "-subj", "/O=backupmx lab/CN=backupmx lab CA",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self._issued: dict[tuple[str, str], tuple[Path, Path]] = {}

    def leaf(self, name: str, kind: str = "ca") -> tuple[Path, Path]:
        """(cert, key) for `name`: signed by the lab CA ("ca") or self-signed ("self-signed")."""
        if (name, kind) in self._issued:
            return self._issued[(name, kind)]
        cert, key = self.root / f"{name}.{kind}.pem", self.root / f"{name}.{kind}.key"
        if kind == "self-signed":
            _openssl("req", "-x509", *_EC, "-nodes", "-keyout", key, "-out", cert, "-days", "30",
                     "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}")
        else:
            csr, ext = self.root / f"{name}.csr", self.root / f"{name}.ext"
            ext.write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                           "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
            _openssl("req", "-new", *_EC, "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
            _openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self._ca_key, "-CAcreateserial",
                     "-days", "30", "-out", cert, "-extfile", ext)
        self._issued[(name, kind)] = (cert, key)
        return cert, key


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
    tls: str | None  # "ca" | "self-signed" | None (no STARTTLS)


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


class Lab:
    """One case: zones plus SMTP servers. Use as a context manager, then `await lab.check(domain)`."""

    def __init__(self, pki: Pki, zones: Mapping[str, ZoneSpec] | None = None) -> None:
        self.pki = pki
        self.zones = merge_zones(INFRA_ZONES, zones or {})
        self.mxs: list[LabMx] = []
        self.port = 0
        self.dns = DnsServer(self.zones)
        self._controllers: list[Controller] = []

    def mx(self, name: str, address: str, *, domains: set[str] | frozenset[str], tls: str | None = "ca",
           users: frozenset[str] | None = KNOWN_USERS, open_relay: bool = False) -> LabHandler:
        handler = LabHandler(name, frozenset(domains), users, open_relay)
        self.mxs.append(LabMx(name, address, handler, tls))
        return handler

    def __enter__(self) -> Lab:
        self.dns.start()
        try:
            self.port = pick_port([m.address for m in self.mxs]) if self.mxs else 25
            for m in self.mxs:
                ctx = None
                if m.tls:
                    cert, key = self.pki.leaf(m.name, m.tls)
                    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    ctx.load_cert_chain(cert, key)
                controller = Controller(m.handler, hostname=m.address, port=self.port, server_hostname=m.name,
                                        tls_context=ctx, require_starttls=False, ready_timeout=5.0,
                                        # what a backupmx node offers, so node.ehlo has nothing to say
                                        enable_SMTPUTF8=True, data_size_limit=100_000_000)
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
        self.dns.stop()

    async def check(self, domain: str, *, config: Config | None = None, timeout: float = 3.0) -> CheckReport:
        return await run_check(domain, nameserver=self.dns.nameserver, config=config, smtp_port=self.port,
                               timeout=timeout, cafile=str(self.pki.ca), helo=LAB_HELO)

    def cli_args(self, domain: str) -> list[str]:
        return ["check", domain, "--nameserver", self.dns.nameserver, "--port", str(self.port),
                "--timeout", "3", "--cafile", str(self.pki.ca)]

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
def zone(mx: list[str], hosts: dict[str, str], ns: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A case's zone: MX records, A records of the hosts, NS (the two shared nameservers by default)."""
    spec: dict[str, Any] = {"@": {"NS": ns or STD_NS, "MX": mx} if mx else {"NS": ns or STD_NS}}
    for name, ip in hosts.items():
        spec[name] = {"A": ip}
    spec.update(extra)
    return spec


def two_mx(domain: str, backup_ip: str = "127.2.0.1", **extra: Any) -> dict[str, Any]:
    return {domain: zone(["10 mx1", "20 mx2"], {"mx1": "127.1.0.1", "mx2": backup_ip}, **extra)}


def node_config(hostname: str, domains: list[str], lab: Lab | None = None, **domain_kw: Any) -> Config:
    # "verify": the default "any" would add a node.recipients warning (backscatter) to every report
    raw: dict[str, Any] = {"server": {"hostname": hostname},
                           "domains": [{"name": d, "recipients": "verify", **domain_kw} for d in domains]}
    if lab is not None:
        raw["dns"] = {"nameservers": [lab.dns.nameserver]}
    return config_from_dict(raw, source="lab.toml")


def worst_lab(pki: Pki) -> Lab:
    """Everything at once: the backup shares the primary's /24, offers no STARTTLS, accepts unknown users
    and relays; the domain's nameservers sit in the primary's network too."""
    ns = ["ns1.worst.test.", "ns2.worst.test."]
    lab = Lab(pki, two_mx("worst.test", "127.1.0.2", ns=ns, ns1={"A": "127.1.0.53"}, ns2={"A": "127.1.0.54"}))
    lab.mx("mx1.worst.test", "127.1.0.1", domains={"worst.test"})
    lab.mx("mx2.worst.test", "127.1.0.2", domains={"worst.test"}, tls=None, users=None, open_relay=True)
    return lab
