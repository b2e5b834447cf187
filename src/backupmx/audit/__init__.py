"""`backupmx check DOMAIN`: an audit of a domain's MX setup that anyone can run from anywhere.

It reads DNS (dnsview.py), talks SMTP to every MX address without sending mail (smtpview.py), reads the
MTA-STS policy (sts.py), TLSA records (dane.py), the TLS-RPT record (tlsrpt.py) and, when asked, who
announces each MX address (asn.py); judges what it saw with pure rules and returns a `CheckReport`
(report.py) that renders as text or JSON; `report.exit_code` is 1 when any mark is a fail. With a config
it also checks this node's own view. Nothing is raised for what the audit finds; `ValueError` only for
a bad domain, nameserver or ASN file.
"""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime

import dns.asyncresolver
import dns.exception
import dns.resolver

from backupmx.audit.asn import AsnTable, asn_marks, gather_origins
from backupmx.audit.dane import dane_marks, gather_tlsa
from backupmx.audit.dnsview import describe_error, gather_dns, make_resolver, normalize_domain, parse_nameserver
from backupmx.audit.report import CheckReport, Level, Mark, Role, SmtpProbe, render_json, render_text
from backupmx.audit.rules import arc_marks, dns_marks, ehlo_marks, node_marks, site_marks, smtp_marks
from backupmx.audit.smtpview import probe, probe_settings
from backupmx.audit.sts import gather_sts, sts_marks
from backupmx.audit.tlsrpt import gather_tlsrpt, tlsrpt_marks
from backupmx.config import Config

MAX_PARALLEL_SESSIONS = 8

__all__ = ["CheckReport", "Level", "Mark", "parse_nameserver", "render_json", "render_text", "run_check"]


async def run_check(
    domain: str,
    *,
    nameserver: str | None = None,
    config: Config | None = None,
    smtp_port: int = 25,
    timeout: float = 10.0,
    cafile: str | None = None,
    helo: str | None = None,
    asn_db: str | None = None,
    asn_lookup: str | None = None,
    sts_port: int = 443,
) -> CheckReport:
    """Audit `domain`.

    nameserver: "IP", "IP:PORT" or "[IPv6]:PORT"; else `config.dns.nameservers`; else the system resolver.
    config: this node's configuration: adds the node.* checks, and its server.hostname is the EHLO name.
    smtp_port: where to talk SMTP on every MX address (25 on the internet; tests use others).
    timeout: bounds every DNS lookup and every SMTP step (connect, each reply, the TLS handshake).
    cafile: trust only these CA certificates for STARTTLS (default: the system's trust store).
    helo: the EHLO name (default: server.hostname of the config, else this machine's FQDN).
    asn_db: a pyasn IPASN file for the origin AS and prefix of every MX address (site.asn, site.prefix).
    asn_lookup: "dns": ask origin.asn.cymru.com instead (it learns the addresses); else not checked.
    sts_port: where https://mta-sts.DOMAIN/ listens (443; other ports for tests only).
    """
    started, t0 = datetime.now(UTC), time.monotonic()
    name = normalize_domain(domain)
    if asn_lookup not in (None, "dns"):
        raise ValueError(f'--asn-lookup {asn_lookup!r}: the only lookup is "dns"')
    if asn_db:
        AsnTable.check_readable(asn_db)
    asn_source = f"file {asn_db}" if asn_db else "dns (origin.asn.cymru.com)" if asn_lookup else None
    nameservers = [nameserver] if nameserver else list(config.dns.nameservers) if config else []
    resolver, described = make_resolver(nameservers, timeout)
    view = await gather_dns(name, resolver, described)
    mx_ips = {ip for r in view.mx for ip in r.host.ips}
    # read now, keeping only the prefixes of these addresses; a malformed file is a usage error (ValueError)
    table = await asyncio.to_thread(AsnTable.load, asn_db, mx_ips) if asn_db and mx_ips else None
    ehlo_name = helo or (config.server.hostname if config else await _local_fqdn(timeout))
    settings = probe_settings(name, port=smtp_port, helo=ehlo_name, timeout=timeout, cafile=cafile)
    targets: dict[tuple[str, str], Role] = {}
    for r in view.mx:
        for ip in r.host.ips:
            targets.setdefault((r.host.name, ip), r.role)
    gate = asyncio.Semaphore(MAX_PARALLEL_SESSIONS)

    async def one(host: str, ip: str, role: Role) -> SmtpProbe:
        async with gate:
            return await probe(host, ip, role, settings)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(host, ip, role)) for (host, ip), role in targets.items()]
        sts_task = tg.create_task(gather_sts(name, resolver, timeout=timeout, cafile=cafile, port=sts_port))
        tlsa_task = tg.create_task(gather_tlsa(view.mx, resolver))
        tlsrpt_task = tg.create_task(gather_tlsrpt(name, resolver))
        asn_task = tg.create_task(gather_origins(view.mx, table=table, source=asn_source, resolver=resolver))
    probes = tuple(t.result() for t in tasks)
    now = datetime.now(UTC)
    marks = [*dns_marks(view), *site_marks(view)]
    if view.mx:  # no MX: nothing for senders to choose between, the mx.records failure says it all
        marks += asn_marks(name, view.mx, asn_task.result())
        marks += sts_marks(sts_task.result(), view.mx, probes, now)
        marks += dane_marks(name, view.mx, tlsa_task.result(), probes)
        marks += tlsrpt_marks(tlsrpt_task.result())
    if config is not None:
        marks.extend(node_marks(view, config))
        marks.extend(await _arc_key_marks(config, resolver))
        marks.extend(ehlo_marks(config, probes))
    for p in probes:
        marks.extend(smtp_marks(p, now))
    return CheckReport(
        domain=name,
        dns=view,
        smtp=probes,
        marks=tuple(marks),
        smtp_port=smtp_port,
        started_at=started,
        duration_s=time.monotonic() - t0,
        node=config.server.hostname if config else None,
        config_source=config.source if config else None,
        sts=sts_task.result(),
        tlsa=tlsa_task.result(),
        tlsrpt=tlsrpt_task.result(),
        origins=asn_task.result(),
    )


async def _arc_key_marks(config: Config, resolver: dns.asyncresolver.Resolver) -> list[Mark]:
    """node.arc-key: the TXT record of the ARC key (rules.arc_marks judges it)."""
    p = config.policy
    if p.arc_key is None:
        return []
    try:
        key: bytes | None = await asyncio.to_thread(p.arc_key.read_bytes)
    except OSError:
        key = None
    records: list[str] | None = None
    error: str | None = None
    try:
        answer = await resolver.resolve(f"{p.arc_selector}._domainkey.{p.arc_domain}", "TXT", search=False)
        records = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        records = []
    except (dns.exception.DNSException, OSError) as e:
        error = describe_error(e, "TXT")
    return arc_marks(config, key, records, error)


async def _local_fqdn(timeout: float) -> str:
    """socket.getfqdn() may wait on DNS; do not let it hold the audit up."""
    try:
        async with asyncio.timeout(min(timeout, 3.0)):
            name = await asyncio.to_thread(socket.getfqdn)
    except TimeoutError:
        name = socket.gethostname()
    return name or "localhost"
