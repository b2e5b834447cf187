"""What `backupmx check` looks at and marks, as values: the levels and marks, the DNS view (MX, hosts,
zones) and the SMTP view (banner, EHLO, TLS, RCPT tests) of each MX address. Nothing here does I/O; the
gatherers (dnsview, smtpview, sts, dane, tlsrpt, asn) build these and the report holds and renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from backupmx.reply import Reply


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
        return {
            "check": self.check,
            "level": self.level.value,
            "subject": self.subject,
            "text": self.text,
            "hint": self.hint,
        }


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
        return {
            "name": self.name,
            "addresses": [{"address": a.ip, "ttl": a.ttl} for a in self.addresses],
            "error": self.error,
            "cname": self.cname,
        }


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
            "mx": [
                {
                    "preference": r.preference,
                    "host": r.host.name,
                    "ttl": r.ttl,
                    "role": r.role.value,
                    **{k: v for k, v in r.host.to_json().items() if k != "name"},
                }
                for r in self.mx
            ],
            "mx_error": self.mx_error,
            "null_mx": self.null_mx,
            "ns": [h.to_json() for h in self.ns],
            "ns_error": self.ns_error,
            "zone_of": dict(sorted(self.zone_of.items())),
            "zones": {
                name: {"ns": [h.to_json() for h in z.ns], "error": z.error} for name, z in sorted(self.zones.items())
            },
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
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "not_before": iso_utc(self.not_before),
            "not_after": iso_utc(self.not_after),
            "self_signed": self.self_signed,
            "dns_names": list(self.dns_names),
        }


@dataclass(frozen=True, slots=True)
class TlsInfo:
    version: str  # "TLSv1.3"
    cipher: str
    cert: CertInfo | None
    verified: bool  # the chain and the MX name checked out against the trust store
    verify_error: str | None = None  # OpenSSL's reason when not verified ("self-signed certificate" ...)
    chain: tuple[bytes, ...] = ()  # the certificates the server presented, DER, its own first (for DANE)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "cipher": self.cipher,
            "verified": self.verified,
            "verify_error": self.verify_error,
            "cert": self.cert.to_json() if self.cert else None,
            "chain_length": len(self.chain),
        }


@dataclass(frozen=True, slots=True)
class RcptTest:
    kind: str  # "postmaster" | "unknown" | "relay"
    mail_from: str  # "" for <>
    rcpt: str
    mail_reply: Reply | None  # None: not reached
    reply: Reply | None  # the RCPT reply; None when MAIL was refused or the session ended before

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mail_from": self.mail_from,
            "rcpt": self.rcpt,
            "mail_reply": _reply_json(self.mail_reply),
            "reply": _reply_json(self.reply),
        }


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
        return {
            "host": self.host,
            "address": self.address,
            "port": self.port,
            "role": self.role.value,
            "skipped": self.skipped,
            "error": self.error,
            "banner": _reply_json(self.banner),
            "ehlo": _reply_json(self.ehlo),
            "extensions": list(self.extensions),
            "ehlo_tls": _reply_json(self.ehlo_tls),
            "starttls_offered": self.starttls_offered,
            "starttls": _reply_json(self.starttls),
            "tls": self.tls.to_json() if self.tls else None,
            "tls_error": self.tls_error,
            "null_sender_refused": _reply_json(self.null_sender_refused),
            "rcpt": [t.to_json() for t in self.rcpts],
            "transcript": list(self.transcript),
        }


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


def iso_utc(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
