"""What `backupmx check` found, as values: marks (ok/info/warn/fail with a check id), the DNS and SMTP
views they were judged from, and the report that holds them; rendered as text for people and as JSON
for scripts. Nothing here does I/O; the exit code is a property of the report (see `CheckReport`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from backupmx.reply import Reply

if TYPE_CHECKING:  # these modules build on this one; the report only holds and renders their views
    from backupmx.audit.asn import AsnView
    from backupmx.audit.dane import TlsaSet
    from backupmx.audit.sts import StsView
    from backupmx.audit.tlsrpt import TlsRptView


class Level(StrEnum):
    OK = "ok"
    INFO = "info"  # a fact worth knowing, neither good nor bad
    WARN = "warn"  # a risk; the backup path still works
    FAIL = "fail"  # the backup path does not work, or mail is put at risk

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Level.OK: 0, Level.INFO: 1, Level.WARN: 2, Level.FAIL: 3}


class Role(StrEnum):
    PRIMARY = "primary"  # the best (lowest) MX preference
    BACKUP = "backup"


@dataclass(frozen=True, slots=True)
class Mark:
    check: str  # "mx.count", "site.backup", "smtp.relay" ... (docs/check.md lists them all)
    level: Level
    subject: str  # the domain, a host name, "host [address]" or a zone
    text: str  # what was seen, one line
    hint: str = ""  # what to do about it (warn and fail only)

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "level": self.level.value, "subject": self.subject, "text": self.text,
                "hint": self.hint}


# --- the DNS view ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Address:
    ip: str
    ttl: int


@dataclass(frozen=True, slots=True)
class Host:
    """A name and the addresses it resolved to (A and AAAA)."""

    name: str  # lower case, no trailing dot
    addresses: tuple[Address, ...] = ()
    error: str | None = None  # why there is no (or only part of an) answer
    cname: str | None = None  # set when the name is an alias (an MX must not be: RFC 2181 §10.3)

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(a.ip for a in self.addresses)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "addresses": [{"address": a.ip, "ttl": a.ttl} for a in self.addresses],
                "error": self.error, "cname": self.cname}


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    host: Host
    ttl: int
    role: Role


@dataclass(frozen=True, slots=True)
class ZoneView:
    """The zone that holds some name, and its nameservers."""

    name: str
    ns: tuple[Host, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DnsView:
    domain: str
    resolver: str  # "system (10.0.0.53)" or "127.0.0.53:5353"
    mx: tuple[MxRecord, ...] = ()  # best preference first
    mx_error: str | None = None  # no usable MX answer: why
    null_mx: bool = False  # RFC 7505 "0 ." — the domain accepts no mail
    ns: tuple[Host, ...] = ()
    ns_error: str | None = None
    zone_of: dict[str, str] = field(default_factory=dict)  # MX and NS host name -> the zone that holds it
    zones: dict[str, ZoneView] = field(default_factory=dict)  # zone name -> its nameservers

    @property
    def primaries(self) -> tuple[MxRecord, ...]:
        return tuple(r for r in self.mx if r.role is Role.PRIMARY)

    @property
    def backups(self) -> tuple[MxRecord, ...]:
        return tuple(r for r in self.mx if r.role is Role.BACKUP)

    def to_json(self) -> dict[str, Any]:
        return {
            "resolver": self.resolver,
            "mx": [{"preference": r.preference, "host": r.host.name, "ttl": r.ttl, "role": r.role.value,
                    **{k: v for k, v in r.host.to_json().items() if k != "name"}} for r in self.mx],
            "mx_error": self.mx_error,
            "null_mx": self.null_mx,
            "ns": [h.to_json() for h in self.ns],
            "ns_error": self.ns_error,
            "zone_of": dict(sorted(self.zone_of.items())),
            "zones": {name: {"ns": [h.to_json() for h in z.ns], "error": z.error}
                      for name, z in sorted(self.zones.items())},
        }


# --- the SMTP view --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CertInfo:
    subject: str  # "CN=mx1.example.com, O=Example"
    issuer: str
    not_before: datetime
    not_after: datetime
    self_signed: bool  # issuer == subject
    dns_names: tuple[str, ...] = ()  # subjectAltName dNSName entries

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "issuer": self.issuer, "not_before": _iso(self.not_before),
                "not_after": _iso(self.not_after), "self_signed": self.self_signed,
                "dns_names": list(self.dns_names)}


@dataclass(frozen=True, slots=True)
class TlsInfo:
    version: str  # "TLSv1.3"
    cipher: str
    cert: CertInfo | None
    verified: bool  # the chain and the MX name checked out against the trust store
    verify_error: str | None = None  # OpenSSL's reason when not verified ("self-signed certificate" ...)
    chain: tuple[bytes, ...] = ()  # the certificates the server presented, DER, its own first (for DANE)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "cipher": self.cipher, "verified": self.verified,
                "verify_error": self.verify_error, "cert": self.cert.to_json() if self.cert else None,
                "chain_length": len(self.chain)}


@dataclass(frozen=True, slots=True)
class RcptTest:
    kind: str  # "postmaster" | "unknown" | "relay"
    mail_from: str  # "" for <>
    rcpt: str
    mail_reply: Reply | None  # None: not reached
    reply: Reply | None  # the RCPT reply; None when MAIL was refused or the session ended before

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "mail_from": self.mail_from, "rcpt": self.rcpt,
                "mail_reply": _reply_json(self.mail_reply), "reply": _reply_json(self.reply)}


@dataclass(frozen=True, slots=True)
class SmtpProbe:
    """One SMTP session (two when the certificate does not verify) with one address of one MX host."""

    host: str
    address: str
    port: int
    role: Role
    skipped: str | None = None  # not tried from here (e.g. no IPv6 route): why
    error: str | None = None  # where and why the session broke off
    banner: Reply | None = None
    ehlo: Reply | None = None  # the first EHLO, in clear text
    ehlo_tls: Reply | None = None  # the EHLO after STARTTLS
    starttls_offered: bool = False
    starttls: Reply | None = None  # the reply to STARTTLS
    tls: TlsInfo | None = None
    tls_error: str | None = None  # the handshake failed: why
    null_sender_refused: Reply | None = None  # the reply that refused MAIL FROM:<>, if one did
    rcpts: tuple[RcptTest, ...] = ()
    transcript: tuple[str, ...] = ()  # "C: ..." / "S: ..." / "-- ..." lines

    @property
    def label(self) -> str:
        return f"{self.host} [{self.address}]"

    @property
    def extensions(self) -> tuple[str, ...]:
        if self.ehlo is None or not self.ehlo.is_positive:
            return ()
        return tuple(line.split(" ", 1)[0].upper() for line in self.ehlo.lines()[1:] if line)

    def rcpt(self, kind: str) -> RcptTest | None:
        return next((t for t in self.rcpts if t.kind == kind), None)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "address": self.address, "port": self.port, "role": self.role.value,
                "skipped": self.skipped, "error": self.error, "banner": _reply_json(self.banner),
                "ehlo": _reply_json(self.ehlo), "extensions": list(self.extensions),
                "ehlo_tls": _reply_json(self.ehlo_tls),
                "starttls_offered": self.starttls_offered, "starttls": _reply_json(self.starttls),
                "tls": self.tls.to_json() if self.tls else None, "tls_error": self.tls_error,
                "null_sender_refused": _reply_json(self.null_sender_refused),
                "rcpt": [t.to_json() for t in self.rcpts], "transcript": list(self.transcript)}


# --- the report -----------------------------------------------------------------------------------
EXIT_OK = 0  # no failure (warnings allowed, unless strict)
EXIT_FAIL = 1  # at least one fail mark (or, when strict, a warn mark)


@dataclass(frozen=True, slots=True)
class CheckReport:
    """Everything `check` saw and concluded.

    `exit_code` is 0 when no mark is a fail, 1 otherwise: warnings alone do not fail the audit, so that a
    cron job pages on broken backups, not on risks someone already accepted. `strict_exit_code` also
    fails on warnings (`backupmx check --strict`).
    """

    domain: str
    dns: DnsView
    smtp: tuple[SmtpProbe, ...]
    marks: tuple[Mark, ...]
    smtp_port: int
    started_at: datetime
    duration_s: float
    node: str | None = None  # server.hostname of the config checked against, if any
    config_source: str | None = None
    sts: StsView | None = None  # MTA-STS: the TXT record and the policy
    tlsa: tuple[TlsaSet, ...] = ()  # DANE: the TLSA records of every MX host
    tlsrpt: TlsRptView | None = None
    origins: AsnView | None = None  # origin AS and prefix of every MX address

    @property
    def worst(self) -> Level:
        return max((m.level for m in self.marks), key=lambda lv: lv.rank, default=Level.OK)

    @property
    def exit_code(self) -> int:
        return EXIT_FAIL if self.worst is Level.FAIL else EXIT_OK

    @property
    def strict_exit_code(self) -> int:
        return EXIT_FAIL if self.worst.rank >= Level.WARN.rank else EXIT_OK

    def count(self, level: Level) -> int:
        return sum(1 for m in self.marks if m.level is level)

    def pairs(self) -> set[tuple[str, Level]]:
        """{(check id, level)}: what tests and scripts compare."""
        return {(m.check, m.level) for m in self.marks}

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "started_at": _iso(self.started_at),
            "duration_s": round(self.duration_s, 3),
            "node": self.node,
            "config": self.config_source,
            "smtp_port": self.smtp_port,
            "dns": self.dns.to_json(),
            "smtp": [p.to_json() for p in self.smtp],
            "mta_sts": self.sts.to_json() if self.sts else None,
            "tlsa": [s.to_json() for s in self.tlsa],
            "tlsrpt": self.tlsrpt.to_json() if self.tlsrpt else None,
            "asn": self.origins.to_json() if self.origins else None,
            "marks": [m.to_json() for m in self.marks],
            "summary": {lv.value: self.count(lv) for lv in Level},
            "result": self.worst.value,
            "exit_code": self.exit_code,
        }


def render_json(report: CheckReport) -> str:
    return json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"


_TAG = {Level.OK: "[ ok ]", Level.INFO: "[info]", Level.WARN: "[WARN]", Level.FAIL: "[FAIL]"}


def render_text(report: CheckReport) -> str:
    """The human-readable report: what was seen, then every mark, grouped as docs/check.md explains."""
    out: list[str] = []
    when = report.started_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    out.append(f"backupmx check {report.domain}  ({when}, resolver {report.dns.resolver}, "
               f"SMTP port {report.smtp_port}{', node ' + report.node if report.node else ''})")
    out.append("")
    out.extend(_mx_table(report.dns))
    out.append("")
    out.extend(_ns_table(report.dns))
    sections = (("DNS", ("mx.",)), ("Same building", ("site.",)), ("MTA-STS", ("sts.",)),
                ("DANE", ("dane.",)), ("TLS reporting", ("tlsrpt.",)), ("This node", ("node.",)))
    for title, prefixes in sections:
        marks = [m for m in report.marks if m.check.startswith(prefixes)]
        if marks:
            out.append("")
            out.append(title)
            out.extend(_mark_lines(marks, implied=report.domain))
    for probe in report.smtp:
        out.append("")
        out.extend(_probe_lines(probe))
        probe_marks = [m for m in report.marks if m.check.startswith("smtp.") and m.subject == probe.label]
        if probe_marks:
            out.extend(_mark_lines(probe_marks, implied=probe.label))
    known = ("mx.", "site.", "sts.", "dane.", "tlsrpt.", "node.", "smtp.")
    other = [m for m in report.marks if not m.check.startswith(known)]
    if other:
        out.append("")
        out.append("Other")
        out.extend(_mark_lines(other))
    out.append("")
    counts = ", ".join(f"{report.count(lv)} {lv.value}" for lv in Level)
    out.append(f"Result: {report.worst.value.upper()} ({counts}); exit {report.exit_code}")
    return "\n".join(out) + "\n"


def _mx_table(dns: DnsView) -> list[str]:
    if dns.mx_error or not dns.mx:
        return [f"MX records: none ({dns.mx_error or 'no answer'})"]
    rows = [("pref", "host", "ttl", "role", "addresses")]
    for r in dns.mx:
        addrs = ", ".join(f"{a.ip} (ttl {a.ttl})" for a in r.host.addresses) or f"- ({r.host.error})"
        rows.append((str(r.preference), r.host.name, str(r.ttl), r.role.value, addrs))
    return ["MX records (primary = best preference)", *_table(rows)]


def _ns_table(dns: DnsView) -> list[str]:
    if dns.ns_error or not dns.ns:
        return [f"NS records: none ({dns.ns_error or 'no answer'})"]
    rows = [("host", "addresses")]
    rows += [(h.name, ", ".join(h.ips) or f"- ({h.error})") for h in dns.ns]
    return ["NS records", *_table(rows)]


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
            for row in rows]


def _probe_lines(p: SmtpProbe) -> list[str]:
    out = [f"SMTP {p.host} [{p.address}]:{p.port} ({p.role.value})"]
    if p.skipped:
        out.append(f"  skipped   {p.skipped}")
        return out
    if p.banner:
        out.append(f"  banner    {short_reply(p.banner)}")
    if p.ehlo:
        ext = " ".join(p.extensions)
        out.append(f"  ehlo      {p.ehlo.code} {ext}" if p.ehlo.is_positive else f"  ehlo      {short_reply(p.ehlo)}")
    if p.tls:
        out.append(f"  tls       {p.tls.version} {p.tls.cipher}")
        if p.tls.cert:
            c = p.tls.cert
            trust = "verified" if p.tls.verified else f"not verified: {p.tls.verify_error}"
            out.append(f"  cert      subject {c.subject}; issuer {c.issuer}; notAfter {_iso(c.not_after)}; {trust}")
    elif p.tls_error:
        out.append(f"  tls       failed: {p.tls_error}")
    for t in p.rcpts:
        sender = f"<{t.mail_from}>"
        if t.reply is not None:
            out.append(f"  rcpt      {t.rcpt}: {short_reply(t.reply)}")
        elif t.mail_reply is not None and not t.mail_reply.is_positive:
            out.append(f"  mail      MAIL FROM:{sender}: {short_reply(t.mail_reply)}")
    if p.error:
        out.append(f"  error     {p.error}")
    return out


def _mark_lines(marks: list[Mark], implied: str = "") -> list[str]:
    """One line per mark (and one for its hint); the subject is left out where the section names it."""
    width = max(len(m.check) for m in marks)
    out = []
    for m in marks:
        about = "" if m.subject == implied else f"{m.subject}: "
        out.append(f"  {_TAG[m.level]} {m.check.ljust(width)}  {about}{m.text}")
        if m.hint and m.level.rank >= Level.WARN.rank:
            out.append(f"  {' ' * 6} {' ' * width}  -> {m.hint}")
    return out


def short_reply(reply: Reply | None, limit: int = 160) -> str:
    """A reply on one line, "550 5.1.1 User unknown", cut at `limit` characters."""
    if reply is None:
        return "no reply"
    text = " ".join(line for line in reply.lines() if line)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return " ".join(x for x in (str(reply.code), reply.status, text) if x)


def _reply_json(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "status": reply.status, "text": reply.text}


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
