"""What `backupmx check` found, as values: marks (ok/info/warn/fail with a check id), the DNS and SMTP
views they were judged from, and the report that holds them; rendered as text for people and as JSON
for scripts. Nothing here does I/O; the exit code is a property of the report (see `CheckReport`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from backupmx.audit.asn import AsnView
from backupmx.audit.dane import TlsaSet
from backupmx.audit.sts import StsView
from backupmx.audit.tlsrpt import TlsRptView
from backupmx.audit.views import (
    Address,
    CertInfo,
    DnsView,
    Host,
    Level,
    Mark,
    MxRecord,
    RcptTest,
    Role,
    SmtpProbe,
    TlsInfo,
    ZoneView,
    iso_utc,
    short_reply,
)

__all__ = [
    "EXIT_FAIL",
    "EXIT_OK",
    "Address",
    "CertInfo",
    "CheckReport",
    "DnsView",
    "Host",
    "Level",
    "Mark",
    "MxRecord",
    "RcptTest",
    "Role",
    "SmtpProbe",
    "TlsInfo",
    "ZoneView",
    "render_json",
    "render_text",
    "short_reply",
]

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
            "started_at": iso_utc(self.started_at),
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
    out.append(
        f"backupmx check {report.domain}  ({when}, resolver {report.dns.resolver}, "
        f"SMTP port {report.smtp_port}{', node ' + report.node if report.node else ''})"
    )
    out.append("")
    out.extend(_mx_table(report.dns))
    out.append("")
    out.extend(_ns_table(report.dns))
    sections = (
        ("DNS", ("mx.",)),
        ("Same building", ("site.",)),
        ("MTA-STS", ("sts.",)),
        ("DANE", ("dane.",)),
        ("TLS reporting", ("tlsrpt.",)),
        ("This node", ("node.",)),
    )
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
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]


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
            out.append(f"  cert      subject {c.subject}; issuer {c.issuer}; notAfter {iso_utc(c.not_after)}; {trust}")
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
