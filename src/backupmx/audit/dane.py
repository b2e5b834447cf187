"""DANE for SMTP (RFC 7672) as `check` sees it: the TLSA records at `_25._tcp.<mx>` of every MX host, with
the resolver's AD bit (DNSSEC-validated or not), matched against the certificates each MX address
presented over STARTTLS; the marks dane.tlsa and dane.match. Certificates are read with `cryptography`.

SMTP uses only DANE-TA(2) and DANE-EE(3) (RFC 7672 §3.1.3); PKIX-TA(0) and PKIX-EE(1) records are unusable.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from backupmx.audit.dnsview import lookup_records
from backupmx.audit.views import Level, Mark, MxRecord, Role, SmtpProbe

USAGES = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}


@dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int  # 0: the whole certificate, 1: its SubjectPublicKeyInfo
    mtype: int  # 0: exact, 1: SHA-256, 2: SHA-512
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in (0, 1, 2)


@dataclass(frozen=True, slots=True)
class TlsaSet:
    host: str  # the MX host name; the records are at _25._tcp.HOST
    records: tuple[Tlsa, ...] = ()
    secure: bool = False  # the answer carried AD: a validating resolver checked its DNSSEC signatures
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "records": [str(r) for r in self.records],
            "secure": self.secure,
            "error": self.error,
        }


async def gather_tlsa(mx: tuple[MxRecord, ...], resolver: dns.asyncresolver.Resolver) -> tuple[TlsaSet, ...]:
    hosts = list(dict.fromkeys(r.host.name for r in mx))

    async def one(host: str) -> TlsaSet:
        rdatas, secure, error = await lookup_records(resolver, f"_25._tcp.{host}", "TLSA")
        records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in rdatas)
        return TlsaSet(host, records, secure, error)

    return tuple(await asyncio.gather(*(one(h) for h in hosts)))


def association(der: bytes, selector: int, mtype: int) -> bytes:
    """The TLSA certificate-association data for a DER certificate (RFC 6698 §2.1.2, §2.1.3)."""
    if selector == 1:
        key = x509.load_der_x509_certificate(der).public_key()
        der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        return hashlib.sha256(der).digest()
    if mtype == 2:
        return hashlib.sha512(der).digest()
    return der


def matches(record: Tlsa, chain: tuple[bytes, ...]) -> bool:
    """DANE-EE matches the server's own certificate; DANE-TA one of the issuers it presented."""
    candidates = chain[:1] if record.usage == 3 else chain[1:] if record.usage == 2 else ()
    for der in candidates:
        try:
            if association(der, record.selector, record.mtype) == record.data:
                return True
        except ValueError:  # a certificate cryptography cannot read matches nothing
            continue
    return False


def dane_marks(
    domain: str, mx: tuple[MxRecord, ...], sets: tuple[TlsaSet, ...], probes: tuple[SmtpProbe, ...]
) -> list[Mark]:
    if not sets:
        return []
    roles = {r.host.name: r.role for r in mx}
    if not any(s.records or s.error for s in sets):
        return [
            Mark(
                "dane.tlsa",
                Level.OK,
                domain,
                "no TLSA records at _25._tcp of any MX host: DANE is not in use, senders use ordinary STARTTLS",
            )
        ]
    secured = [s.host for s in sets if s.records and s.secure]
    marks: list[Mark] = []
    for s in sets:
        role = roles.get(s.host, Role.BACKUP)
        if s.error:
            marks.append(
                Mark(
                    "dane.tlsa",
                    Level.WARN,
                    s.host,
                    f"cannot read _25._tcp.{s.host} TLSA: {s.error}",
                    "DANE senders that see the same defer mail to this host; check its zone's DNSSEC",
                )
            )
        elif not s.records:
            if secured:
                level = Level.FAIL if role is Role.BACKUP else Level.WARN
                marks.append(
                    Mark(
                        "dane.tlsa",
                        level,
                        s.host,
                        f"{role.value} has no TLSA record while "
                        f"{', '.join(secured)} has: DANE senders will not use the {role.value}",
                        f'publish TLSA records at _25._tcp.{s.host} (e.g. "3 1 1" with the SHA-256 of '
                        "its public key) in a DNSSEC-signed zone",
                    )
                )
        elif not s.secure:
            marks.append(
                Mark(
                    "dane.tlsa",
                    Level.WARN,
                    s.host,
                    f"TLSA at _25._tcp.{s.host} is not DNSSEC-validated (no AD bit): DANE senders ignore it",
                    "sign the zone (and check that the resolver "
                    "used here validates: --nameserver a validating resolver)",
                )
            )
        else:
            listing = ", ".join(f"{r.usage} {r.selector} {r.mtype}" for r in s.records)
            marks.append(Mark("dane.tlsa", Level.OK, s.host, f"TLSA {listing} (DNSSEC-validated)"))
    by_host = {s.host: s for s in sets}
    for probe in probes:
        tlsa = by_host.get(probe.host)
        if tlsa is None or not tlsa.records or probe.skipped or (probe.tls is None and probe.error):
            continue
        marks.append(_match_mark(probe, tlsa))
    return marks


def _match_mark(probe: SmtpProbe, s: TlsaSet) -> Mark:
    usable = [r for r in s.records if r.usable]
    if not usable:
        listing = ", ".join(f"{r.usage} {r.selector} {r.mtype}" for r in s.records)
        return Mark(
            "dane.match",
            Level.FAIL,
            probe.label,
            f"no usable TLSA record ({listing}): SMTP uses only "
            "usages 2 (DANE-TA) and 3 (DANE-EE), selectors 0-1, matching types 0-2 (RFC 7672 §3.1.3)",
            'publish "3 1 1" with the SHA-256 of the server\'s public key',
        )
    tls = probe.tls
    if tls is None or not tls.chain:
        return Mark(
            "dane.match",
            Level.FAIL,
            probe.label,
            "TLSA published but no TLS here: DANE senders will not deliver",
            "offer STARTTLS with the certificate the TLSA records describe",
        )
    hit = next((r for r in usable if matches(r, tls.chain)), None)
    if hit is None:
        leaf = association(tls.chain[0], 1, 1).hex() if _readable(tls.chain[0]) else "?"
        return Mark(
            "dane.match",
            Level.FAIL,
            probe.label,
            f"the {len(tls.chain)} certificate(s) presented match "
            "none of the TLSA records: DANE senders will not deliver here",
            f'publish "3 1 1 {leaf}" (this server\'s key) before switching, or fix the certificate',
        )
    return Mark(
        "dane.match",
        Level.OK,
        probe.label,
        f"matches TLSA {hit.usage} {hit.selector} {hit.mtype} ({USAGES[hit.usage]})",
    )


def _readable(der: bytes) -> bool:
    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return True
