"""The rules of `backupmx check`: pure functions from the DNS and SMTP views to marks.

Check ids, by family (docs/check.md says what each means and what to do):
    mx.records  mx.count  mx.address  mx.distinct           the MX set itself
    site.backup  site.ns  site.mx-zone                       "same building" risks
    node.domain  node.mx  node.recipients  node.arc-key  node.ehlo   this node's own view (with --config)
    smtp.connect smtp.ehlo smtp.starttls smtp.tls-cert smtp.null-sender
    smtp.postmaster smtp.unknown-user smtp.relay smtp.session   per MX address, over SMTP
    site.asn  site.prefix                                    origin AS and prefix (asn.py)
    sts.policy  sts.mx-match  sts.cert                       MTA-STS (sts.py)
    dane.tlsa  dane.match                                    DANE (dane.py)
    tlsrpt.record                                            TLS reporting (tlsrpt.py)
Networks: addresses are "near" when they share an IPv4 /24 or IPv6 /48 (fail for a backup: one site),
"close" when they share an IPv4 /16 or IPv6 /32 (warn: one provider or campus, probably).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from backupmx.audit.views import CertInfo, DnsView, Host, Level, Mark, Role, SmtpProbe, short_reply
from backupmx.config import Config
from backupmx.policy.backscatter import ADVICE, backscatter_prone
from backupmx.reply import Reply

NEAR_PREFIX = {4: 24, 6: 48}
CLOSE_PREFIX = {4: 16, 6: 32}
CERT_EXPIRY_WARNING = timedelta(days=14)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CHECK_IDS = (
    "mx.records",
    "mx.count",
    "mx.address",
    "mx.distinct",
    "site.backup",
    "site.ns",
    "site.mx-zone",
    "node.domain",
    "node.mx",
    "node.recipients",
    "node.arc-key",
    "node.ehlo",
    "smtp.connect",
    "smtp.ehlo",
    "smtp.starttls",
    "smtp.tls-cert",
    "smtp.null-sender",
    "smtp.postmaster",
    "smtp.unknown-user",
    "smtp.relay",
    "smtp.session",
    "site.asn",
    "site.prefix",
    "sts.policy",
    "sts.mx-match",
    "sts.cert",
    "dane.tlsa",
    "dane.match",
    "tlsrpt.record",
)


def network(ip: str, prefixes: dict[int, int] = NEAR_PREFIX) -> IPNetwork:
    addr = ipaddress.ip_address(ip)
    return ipaddress.ip_network(f"{addr}/{prefixes[addr.version]}", strict=False)


def distance(ip: str, others: Iterable[str]) -> tuple[int, str | None, str | None]:
    """How far `ip` is from the nearest of `others`: (0 near | 1 close | 2 far, shared network, that other ip).
    Addresses of different families are far from each other."""
    best: tuple[int, str | None, str | None] = (2, None, None)
    for other in others:
        if ipaddress.ip_address(other).version != ipaddress.ip_address(ip).version:
            continue
        if network(ip) == network(other):
            return 0, str(network(ip)), other
        if network(ip, CLOSE_PREFIX) == network(other, CLOSE_PREFIX) and best[0] > 1:
            best = (1, str(network(ip, CLOSE_PREFIX)), other)
    return best


# --- the MX set -----------------------------------------------------------------------------------
def dns_marks(view: DnsView) -> list[Mark]:
    d = view.domain
    if view.null_mx:
        return [
            Mark(
                "mx.records",
                Level.FAIL,
                d,
                "null MX (RFC 7505): the domain says it accepts no mail",
                'remove the "0 ." MX record and publish the primary and the backup',
            )
        ]
    if view.mx_error or not view.mx:
        why = view.mx_error or "empty answer"
        if why == "no MX record":
            return [
                Mark(
                    "mx.records",
                    Level.FAIL,
                    d,
                    "no MX record: senders fall back to the domain's own address, one host and no backup",
                    "publish MX records: the primary at a low preference (10), the backup higher (20)",
                )
            ]
        if "NXDOMAIN" in why:
            return [Mark("mx.records", Level.FAIL, d, f"the domain {why}", "check the name, and its delegation")]
        return [
            Mark(
                "mx.records",
                Level.FAIL,
                d,
                f"the MX lookup failed ({why}): senders that see the same cannot find any MX and keep retrying",
                "check the domain's nameservers, and the resolver used here (--nameserver)",
            )
        ]
    listing = ", ".join(f"{r.preference} {r.host.name}" for r in view.mx)
    marks = [Mark("mx.records", Level.OK, d, f"{len(view.mx)} MX record(s): {listing}")]
    hosts = _unique_hosts(view)
    if len(hosts) == 1:
        marks.append(
            Mark(
                "mx.count",
                Level.FAIL,
                d,
                f"only one MX host ({hosts[0].name}): when it is down senders have nowhere else to go, "
                "queue for a few days, then bounce",
                "add a backup MX in another site and network, at a higher preference number",
            )
        )
    elif not view.backups:
        marks.append(
            Mark(
                "mx.count",
                Level.OK,
                d,
                f"{len(hosts)} MX hosts, all at preference {view.mx[0].preference} (no backup: each is a primary)",
            )
        )
    else:
        marks.append(
            Mark(
                "mx.count",
                Level.OK,
                d,
                f"{len(hosts)} MX hosts: {len(view.primaries)} primary, {len(view.backups)} backup",
            )
        )
    marks.extend(_address_marks(d, hosts))
    marks.extend(_distinct_marks(view, hosts))
    return marks


def _unique_hosts(view: DnsView) -> list[Host]:
    seen: dict[str, Host] = {}
    for r in view.mx:
        seen.setdefault(r.host.name, r.host)
    return list(seen.values())


def _address_marks(domain: str, hosts: Sequence[Host]) -> list[Mark]:
    marks = []
    for h in hosts:
        if not h.addresses:
            marks.append(
                Mark(
                    "mx.address",
                    Level.FAIL,
                    h.name,
                    f"no address: {h.error}; senders skip this MX",
                    "give the MX name an A (and AAAA) record, or remove the MX record",
                )
            )
        elif h.cname:
            marks.append(
                Mark(
                    "mx.address",
                    Level.WARN,
                    h.name,
                    f"is an alias (CNAME to {h.cname}); RFC 2181 §10.3 forbids it and some senders skip it",
                    "point the MX record at the canonical name",
                )
            )
        elif h.error:
            marks.append(
                Mark(
                    "mx.address",
                    Level.WARN,
                    h.name,
                    f"partly resolved ({h.error})",
                    "make every address family of the MX name resolve",
                )
            )
    if not marks:
        marks.append(Mark("mx.address", Level.OK, domain, "every MX host has an address"))
    return marks


def _distinct_marks(view: DnsView, hosts: Sequence[Host]) -> list[Mark]:
    resolved = [h for h in hosts if h.ips]
    if len(hosts) < 2 or len(resolved) < 2:
        return []
    d = view.domain
    sets = {frozenset(h.ips) for h in resolved}
    if len(sets) == 1:
        ips = ", ".join(sorted(next(iter(sets))))
        return [
            Mark(
                "mx.distinct",
                Level.FAIL,
                d,
                f"all MX names resolve to the same address(es) ({ips}): one machine, no backup",
                "run the backup MX on another machine, in another site",
            )
        ]
    primary_ips = {ip for r in view.primaries for ip in r.host.ips}
    backup_ips = {ip for r in view.backups for ip in r.host.ips}
    if backup_ips and backup_ips <= primary_ips:
        return [
            Mark(
                "mx.distinct",
                Level.FAIL,
                d,
                f"the backup MX names resolve only to the primary's addresses ({', '.join(sorted(backup_ips))})",
                "run the backup MX on another machine, in another site",
            )
        ]
    return [Mark("mx.distinct", Level.OK, d, "the MX hosts have distinct addresses")]


# --- same building --------------------------------------------------------------------------------
def site_marks(view: DnsView) -> list[Mark]:
    if not view.mx:
        return []
    return [*_backup_site_marks(view), *_ns_site_marks(view), *_mx_zone_marks(view)]


def _backup_site_marks(view: DnsView) -> list[Mark]:
    primaries = [r.host for r in view.primaries]
    if view.backups:
        pairs = [(r.host, primaries, "the primary") for r in view.backups]
    else:  # equal preferences: each host must survive the loss of the others
        pairs = [(h, [p for p in primaries if p.name != h.name], "the other MX hosts") for h in primaries]
    marks: list[Mark] = []
    seen: set[str] = set()
    for host, refs, what in pairs:
        ref_ips = [ip for r in refs for ip in r.ips]
        if host.name in seen or not host.ips or not ref_ips:
            continue
        seen.add(host.name)
        # a host survives through its farthest address
        far = max(((*distance(ip, ref_ips), ip) for ip in host.ips), key=lambda t: t[0])
        level, net, other, ip = far
        owner = next(r.name for r in refs if other in r.ips) if other else ""
        if level == 0:
            marks.append(
                Mark(
                    "site.backup",
                    Level.FAIL,
                    host.name,
                    f"{ip} shares {net} with {what} {owner} ({other}): one fire, flood or power cut takes both",
                    "move the backup MX to another site and network",
                )
            )
        elif level == 1:
            marks.append(
                Mark(
                    "site.backup",
                    Level.WARN,
                    host.name,
                    f"{ip} shares {net} with {what} {owner} ({other}): probably the same provider or campus",
                    "prefer a backup MX with another provider, in another region",
                )
            )
        else:
            marks.append(
                Mark(
                    "site.backup",
                    Level.OK,
                    host.name,
                    f"no network shared with {what} ({', '.join(host.ips)} vs {', '.join(ref_ips)})",
                )
            )
    return marks


def _inside(host: Host, nets: set[IPNetwork]) -> bool:
    return bool(host.ips) and all(network(ip) in nets for ip in host.ips)


def _ns_site_marks(view: DnsView) -> list[Mark]:
    d = view.domain
    primary_nets = {network(ip) for r in view.primaries for ip in r.host.ips}
    if not primary_nets:
        return []
    if view.ns_error or not view.ns:
        return [
            Mark(
                "site.ns",
                Level.WARN,
                d,
                f"cannot list the nameservers of {d} ({view.ns_error or 'none'}), "
                "so cannot tell whether DNS survives the primary's site",
                "check the NS records of the domain",
            )
        ]
    reasons = []
    for ns in view.ns:
        if _inside(ns, primary_nets):
            reasons.append(f"{ns.name} ({', '.join(ns.ips)}) is in the primary's network")
            continue
        zone = view.zone_of.get(ns.name)
        zv = view.zones.get(zone) if zone else None
        if zv is not None and zv.ns and all(_inside(h, primary_nets) for h in zv.ns):
            reasons.append(f"{ns.name} is in the zone {zone}, served only from the primary's network")
    if len(reasons) == len(view.ns):
        return [
            Mark(
                "site.ns",
                Level.WARN,
                d,
                f"every nameserver of {d} sits in the primary's network or in a zone served from it "
                f"({'; '.join(reasons)}): when the primary's site goes down its DNS goes too, and "
                "senders cannot even find the backup",
                f"add a nameserver for {d} in another network (e.g. a secondary DNS service)",
            )
        ]
    outside = [ns for ns in view.ns if not any(r.startswith(ns.name + " ") for r in reasons)]
    where = ", ".join(f"{ns.name} ({', '.join(ns.ips) or '?'})" for ns in outside)
    return [Mark("site.ns", Level.OK, d, f"nameservers outside the primary's networks: {where}")]


def _mx_zone_marks(view: DnsView) -> list[Mark]:
    by_zone: dict[str, list[str]] = {}
    unknown: list[str] = []
    for h in _unique_hosts(view):
        zone = view.zone_of.get(h.name)
        if zone is None:
            unknown.append(h.name)
        else:
            by_zone.setdefault(zone, []).append(h.name)
    marks = [
        Mark(
            "site.mx-zone",
            Level.WARN,
            name,
            "cannot find the zone that holds this MX name",
            "check that the MX name's zone answers SOA and NS queries",
        )
        for name in unknown
    ]
    for zone, names in sorted(by_zone.items()):
        zv = view.zones.get(zone)
        ips = [ip for h in zv.ns for ip in h.ips] if zv else []
        held = ", ".join(names)
        if not ips:
            why = zv.error if zv and zv.error else "no nameserver address"
            marks.append(
                Mark(
                    "site.mx-zone",
                    Level.WARN,
                    zone,
                    f"the zone {zone} holds {held}; its nameservers are unknown ({why})",
                    f"check the NS records of {zone}",
                )
            )
            continue
        nets = {network(ip) for ip in ips}
        if len(nets) == 1:
            marks.append(
                Mark(
                    "site.mx-zone",
                    Level.WARN,
                    zone,
                    f"the zone {zone} holds {held}, and all its nameservers are in {next(iter(nets))}: "
                    "when that network fails, senders cannot resolve these MX names",
                    f"add a nameserver for {zone} in another network",
                )
            )
        else:
            marks.append(
                Mark("site.mx-zone", Level.OK, zone, f"the zone {zone} holds {held}; served from {len(nets)} networks")
            )
    return marks


# --- this node ------------------------------------------------------------------------------------
def node_marks(view: DnsView, config: Config) -> list[Mark]:
    d = view.domain
    me = config.server.hostname.lower().rstrip(".")
    dom = config.domain(d)
    marks: list[Mark] = []
    if dom is None:
        marks.append(
            Mark(
                "node.domain",
                Level.FAIL,
                d,
                f"not in the [[domains]] of {config.source}: this node answers 554 5.7.1 (relay denied) "
                "to the domain's mail",
                f'add [[domains]] name = "{d}" to {config.source}',
            )
        )
    else:
        primary = "the better MX hosts" if dom.primary == ("mx",) else ", ".join(dom.primary)
        marks.append(Mark("node.domain", Level.OK, d, f"served by this node; held mail goes to {primary}"))
        if backscatter_prone(dom):
            marks.append(
                Mark(
                    "node.recipients",
                    Level.WARN,
                    d,
                    'recipients = "any" with accept = "always": every local part is accepted, and '
                    "what the primary refuses later is bounced to (often forged) senders",
                    ADVICE,
                )
            )
    if not view.mx:
        return marks
    ours = [r for r in view.mx if r.host.name == me]
    others = [r for r in view.mx if r.host.name != me]
    if not ours:
        marks.append(
            Mark(
                "node.mx",
                Level.FAIL,
                me,
                f"server.hostname is not an MX host of {d}: senders never come here",
                f'publish "{d}. MX 20 {me}." (a higher number than the primary\'s), or set '
                "server.hostname to the name the MX record uses",
            )
        )
        return marks
    pref = min(r.preference for r in ours)
    if not others:
        marks.append(
            Mark(
                "node.mx",
                Level.FAIL,
                me,
                f"is the only MX host of {d}: there is no primary to hold mail for",
                "publish the primary's MX record at a lower preference number than this node's",
            )
        )
        return marks
    best = min(r.preference for r in others)
    primary = next(r.host.name for r in others if r.preference == best)
    if pref < best:
        marks.append(
            Mark(
                "node.mx",
                Level.FAIL,
                me,
                f"MX preference {pref} ranks better than the primary {primary} ({best}): all mail comes here first",
                f"give {me} a higher preference number than {best}",
            )
        )
    elif pref == best:
        mx_route = dom is None or dom.primary == ("mx",)
        text = f"MX preference {pref} equals the primary {primary}'s: senders split mail between the two"
        if mx_route:
            text += (
                '; with primary = ["mx"] this node may only deliver to better-ranked MX hosts (RFC 5321 §5.1), '
                "and there are none"
            )
        marks.append(
            Mark(
                "node.mx",
                Level.FAIL if mx_route else Level.WARN,
                me,
                text,
                f"give {me} a higher preference number than {best}",
            )
        )
    else:
        marks.append(Mark("node.mx", Level.OK, me, f"MX preference {pref}, after the primary {primary} ({best})"))
    return marks


def _rsa_modulus(pem_or_der: bytes, *, private: bool) -> int | None:
    """The RSA modulus of a PEM private key or a DER public key (dkimpy's parsers); None when unreadable."""
    import dkim.crypto

    try:
        key = dkim.crypto.parse_pem_private_key(pem_or_der) if private else dkim.crypto.parse_public_key(pem_or_der)
        return int(key["modulus"])
    except Exception:  # any malformed key is simply "not this key"
        return None


def arc_marks(config: Config, key_pem: bytes | None, records: Sequence[str] | None, error: str | None) -> list[Mark]:
    """`[policy] arc_key`: is the key published at <arc_selector>._domainkey.<arc_domain> (the TXT records
    given), so that a primary can verify the backup's ARC seal?"""
    import base64

    p = config.policy
    if p.arc_key is None:
        return []
    name = f"{p.arc_selector}._domainkey.{p.arc_domain}"
    publish = (
        f'publish "{name}. TXT v=DKIM1; k=rsa; p=..." with the public key of {p.arc_key} '
        f"(openssl rsa -in {p.arc_key} -pubout -outform DER | base64 -w0)"
    )
    ours = _rsa_modulus(key_pem, private=True) if key_pem is not None else None
    if ours is None:
        return [
            Mark(
                "node.arc-key",
                Level.FAIL,
                name,
                f"policy.arc_key {p.arc_key} is not a readable RSA private key",
                "point policy.arc_key at an RSA key in PEM (openssl genrsa -traditional)",
            )
        ]
    if error is not None:
        return [Mark("node.arc-key", Level.WARN, name, f"cannot look the ARC key up: {error}", publish)]
    published = []
    for text in records or ():
        tags = dict(part.strip().partition("=")[::2] for part in text.split(";") if "=" in part)
        try:
            published.append(_rsa_modulus(base64.b64decode("".join(tags.get("p", "").split())), private=False))
        except ValueError:
            continue
    if not published:
        return [
            Mark(
                "node.arc-key",
                Level.FAIL,
                name,
                "no key published: primaries cannot verify this node's ARC seal",
                publish,
            )
        ]
    if ours not in published:
        return [
            Mark(
                "node.arc-key",
                Level.FAIL,
                name,
                f"the published key is not the one in {p.arc_key}: every seal fails to verify",
                publish,
            )
        ]
    return [Mark("node.arc-key", Level.OK, name, "the ARC key of policy.arc_key is published")]


def ehlo_marks(config: Config, probes: Sequence[SmtpProbe]) -> list[Mark]:
    """node.ehlo: this node advertises SIZE (server.max_message_size), 8BITMIME and SMTPUTF8; a primary that
    does not offer one of them makes such mail refused at our door (policy/mirror.py) - say so."""
    marks: list[Mark] = []
    ours = config.server.max_message_size
    for p in probes:
        if p.role is not Role.PRIMARY or p.ehlo is None or not p.ehlo.is_positive:
            continue
        missing = [k for k in ("8BITMIME", "SMTPUTF8") if k not in p.extensions]
        size = next(
            (
                line.split()[1]
                for line in p.ehlo.lines()[1:]
                if line.upper().startswith("SIZE ") and line.split()[1:2] and line.split()[1].isdigit()
            ),
            None,
        )
        if size is not None and 0 < int(size) < ours:
            missing.append(f"SIZE {ours} (the primary takes {size})")
        if missing:
            marks.append(
                Mark(
                    "node.ehlo",
                    Level.WARN,
                    p.label,
                    f"this node advertises {', '.join(missing)}, the primary does not: such mail is "
                    "refused at MAIL or RCPT here, from the primary's last EHLO seen while it was up",
                    "make the primary offer it, or set server.max_message_size to the primary's SIZE",
                )
            )
    return marks


# --- per MX address, over SMTP --------------------------------------------------------------------
def smtp_marks(p: SmtpProbe, now: datetime) -> list[Mark]:
    s = p.label
    if p.skipped:
        return [Mark("smtp.connect", Level.INFO, s, f"not tried: {p.skipped}")]
    if p.banner is None:
        return [
            Mark(
                "smtp.connect",
                Level.FAIL,
                s,
                f"unreachable: {p.error or 'no greeting'}",
                "open port 25 on this address to the internet and make sure the MTA runs",
            )
        ]
    if not p.banner.is_positive:
        return [
            Mark(
                "smtp.connect",
                Level.FAIL,
                s,
                f"greeting refuses mail: {_short(p.banner)}",
                "a 4xx/5xx greeting turns every sender away; fix the MTA or its connection limits",
            )
        ]
    marks = [Mark("smtp.connect", Level.OK, s, f"banner {_short(p.banner)}")]
    if p.ehlo is None:
        return [*marks, _session_mark(p)]
    if not p.ehlo.is_positive:
        return [
            *marks,
            Mark(
                "smtp.ehlo",
                Level.FAIL,
                s,
                f"EHLO refused: {_short(p.ehlo)}",
                "accept EHLO from any sender (ESMTP is needed for STARTTLS and SIZE)",
            ),
        ]
    marks.append(Mark("smtp.ehlo", Level.OK, s, "EHLO accepted: " + (" ".join(p.extensions) or "no extensions")))
    marks.extend(_tls_marks(p, now))
    if p.null_sender_refused is not None:
        marks.append(
            Mark(
                "smtp.null-sender",
                Level.FAIL,
                s,
                f"MAIL FROM:<> refused ({_short(p.null_sender_refused)}): bounces and delivery reports to "
                "the domain's users are lost",
                "accept the null sender (RFC 5321 §4.5.5)",
            )
        )
    marks.extend(_rcpt_marks(p))
    if p.error:
        marks.append(_session_mark(p))
    return marks


def _session_mark(p: SmtpProbe) -> Mark:
    return Mark(
        "smtp.session",
        Level.FAIL,
        p.label,
        f"session broke off: {p.error}",
        "see the transcript (--json); a server that drops sessions makes senders retry later",
    )


def _tls_marks(p: SmtpProbe, now: datetime) -> list[Mark]:
    s = p.label
    if not p.starttls_offered:
        return [
            Mark(
                "smtp.starttls",
                Level.FAIL,
                s,
                "STARTTLS not offered: mail to this host travels in clear text",
                "configure a certificate (backupmx: server.tls_cert and server.tls_key)",
            )
        ]
    if p.starttls is not None and p.starttls.code != 220:
        return [
            Mark(
                "smtp.starttls",
                Level.FAIL,
                s,
                f"STARTTLS offered but refused: {_short(p.starttls)}",
                "fix the MTA's TLS configuration (certificate and key readable?)",
            )
        ]
    if p.tls_error:
        return [
            Mark(
                "smtp.starttls",
                Level.FAIL,
                s,
                f"TLS handshake failed ({p.tls_error}): senders fall back to clear text or give up",
                "fix the certificate/key pair and allow TLS 1.2 or newer",
            )
        ]
    if p.tls is None:
        return []  # the session broke off during the handshake: smtp.session says so
    marks = [Mark("smtp.starttls", Level.OK, s, f"{p.tls.version} {p.tls.cipher}")]
    c = p.tls.cert
    if c is None:
        marks.append(
            Mark(
                "smtp.tls-cert",
                Level.WARN,
                s,
                "the certificate could not be read",
                "check the certificate file the MTA serves",
            )
        )
        return marks
    details = _cert_details(c)
    if not p.tls.verified:
        if c.self_signed:
            text, hint = f"self-signed ({details})", "use a certificate from a public CA for the MX name"
        elif c.not_after < now:
            text, hint = f"expired ({details})", "renew the certificate"
        else:
            text, hint = (
                f"not verified: {p.tls.verify_error} ({details})",
                "serve the whole chain, from a public CA, for the MX name",
            )
        marks.append(
            Mark(
                "smtp.tls-cert",
                Level.WARN,
                s,
                text + "; senders that verify (MTA-STS, DANE) will not deliver here",
                hint,
            )
        )
    elif c.not_after - now < CERT_EXPIRY_WARNING:
        days = max(0, (c.not_after - now).days)
        marks.append(
            Mark("smtp.tls-cert", Level.WARN, s, f"expires in {days} day(s) ({details})", "renew the certificate")
        )
    else:
        marks.append(Mark("smtp.tls-cert", Level.OK, s, f"verified ({details})"))
    return marks


def _cert_details(c: CertInfo) -> str:
    until = c.not_after.strftime("%Y-%m-%d")
    return f"{c.subject}, valid until {until}" if c.self_signed else f"{c.subject} by {c.issuer}, valid until {until}"


def _rcpt_marks(p: SmtpProbe) -> list[Mark]:
    s = p.label
    marks: list[Mark] = []
    t = p.rcpt("postmaster")
    if t is not None:
        if t.reply is None and t.mail_reply is not None and t.mail_reply.is_transient:
            marks.append(
                Mark(
                    "smtp.postmaster",
                    Level.WARN,
                    s,
                    f"MAIL FROM:<{t.mail_from}> deferred ({_short(t.mail_reply)}): no mail gets in for now",
                    "fine if it passes; a lasting 4xx at MAIL turns every sender away",
                )
            )
        elif t.reply is None:
            marks.append(
                Mark(
                    "smtp.postmaster",
                    Level.FAIL,
                    s,
                    f"MAIL FROM:<{t.mail_from}> refused ({_short(t.mail_reply)}): no mail gets in",
                    "accept MAIL FROM from any sender at this stage",
                )
            )
        elif t.reply.is_positive:
            marks.append(Mark("smtp.postmaster", Level.OK, s, f"RCPT TO:<{t.rcpt}> accepted ({_short(t.reply)})"))
        elif t.reply.is_transient:
            marks.append(
                Mark(
                    "smtp.postmaster",
                    Level.WARN,
                    s,
                    f"RCPT TO:<{t.rcpt}> deferred ({_short(t.reply)}): greylisting, or a backup that "
                    "accepts only while the primary is down",
                    "fine if intended; otherwise accept the domain's mail",
                )
            )
        else:
            marks.append(
                Mark(
                    "smtp.postmaster",
                    Level.FAIL,
                    s,
                    f"RCPT TO:<{t.rcpt}> refused ({_short(t.reply)}): mail sent here for the domain bounces",
                    "accept the domain's mail here (backupmx: [[domains]]); postmaster must exist (RFC 5321 §4.5.1)",
                )
            )
    t = p.rcpt("unknown")
    if t is not None and t.reply is not None:
        if not t.reply.is_positive:
            marks.append(Mark("smtp.unknown-user", Level.OK, s, f"unknown user refused ({_short(t.reply)})"))
        elif p.role is Role.BACKUP:
            marks.append(
                Mark(
                    "smtp.unknown-user",
                    Level.WARN,
                    s,
                    f"backscatter risk: accepted RCPT TO:<{t.rcpt}> ({_short(t.reply)}); spam to unknown "
                    "users piles up here and bounces to forged senders when the primary refuses it",
                    "give the backup the list of valid recipients (backupmx: domains[].recipients)",
                )
            )
        else:
            marks.append(
                Mark(
                    "smtp.unknown-user",
                    Level.INFO,
                    s,
                    f"the primary accepts unknown users (catch-all?): RCPT TO:<{t.rcpt}> ({_short(t.reply)})",
                )
            )
    t = p.rcpt("relay")
    if t is not None and t.reply is not None:
        if t.reply.is_positive:
            marks.append(
                Mark(
                    "smtp.relay",
                    Level.FAIL,
                    s,
                    f"open relay: accepted RCPT TO:<{t.rcpt}> ({_short(t.reply)})",
                    "accept only the domains this host serves (Postfix: reject_unauth_destination)",
                )
            )
        else:
            marks.append(Mark("smtp.relay", Level.OK, s, f"relaying refused ({_short(t.reply)})"))
    return marks


def _short(reply: Reply | None) -> str:
    return short_reply(reply, limit=100)
