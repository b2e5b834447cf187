"""SMTP TLS reporting (RFC 8460) as `check` sees it: the `_smtp._tls.DOMAIN` TXT record, parsed, and the
tlsrpt.record mark. Without it, senders that fail to reach an MX over TLS (MTA-STS, DANE) tell nobody.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dns.asyncresolver

from backupmx.audit.dnsview import lookup_records, txt_strings
from backupmx.audit.views import Level, Mark


@dataclass(frozen=True, slots=True)
class TlsRptView:
    domain: str
    txt: tuple[str, ...] = ()  # TXT strings at _smtp._tls.DOMAIN starting v=TLSRPT (any version: a typo is a finding)
    error: str | None = None  # the lookup failed

    def to_json(self) -> dict[str, Any]:
        return {"txt": list(self.txt), "error": self.error}


async def gather_tlsrpt(domain: str, resolver: dns.asyncresolver.Resolver) -> TlsRptView:
    rdatas, _, error = await lookup_records(resolver, f"_smtp._tls.{domain}", "TXT")
    return TlsRptView(domain, tuple(t for t in txt_strings(rdatas) if t.lower().startswith("v=tlsrpt")), error)


def parse_tlsrpt(text: str) -> tuple[str, ...]:
    """RFC 8460 §3: "v=TLSRPTv1; rua=URI[,URI]" -> the rua URIs (mailto: or https:). ValueError says why not."""
    parts = [p.strip() for p in text.split(";")]
    if parts[0] != "v=TLSRPTv1":
        raise ValueError("it does not start with v=TLSRPTv1")
    fields: dict[str, str] = {}
    for part in parts[1:]:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r} is not key=value")
        fields[key.strip().lower()] = value.strip()
    if not fields.get("rua"):
        raise ValueError("no rua= (where reports go)")
    uris = tuple(u.strip() for u in fields["rua"].split(","))
    bad = [u for u in uris if not (u.startswith("mailto:") and "@" in u) and not u.startswith("https://")]
    if bad:
        raise ValueError(f"rua {', '.join(bad)!r} is neither mailto:ADDRESS nor https://")
    return uris


def tlsrpt_marks(view: TlsRptView) -> list[Mark]:
    d = view.domain
    record = f'_smtp._tls.{d}. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{d}"'
    if view.error:
        return [
            Mark(
                "tlsrpt.record",
                Level.WARN,
                d,
                f"cannot read _smtp._tls.{d} TXT: {view.error}",
                f"check the nameservers that serve _smtp._tls.{d}",
            )
        ]
    if not view.txt:
        return [
            Mark(
                "tlsrpt.record",
                Level.INFO,
                d,
                f"no TLS-RPT record: senders that cannot reach an MX over "
                f"TLS tell nobody; to get their reports, publish {record}",
            )
        ]
    if len(view.txt) > 1:
        return [
            Mark(
                "tlsrpt.record",
                Level.WARN,
                d,
                f"{len(view.txt)} v=TLSRPTv1 records: RFC 8460 §3 makes senders ignore them all",
                f"keep exactly one, e.g. {record}",
            )
        ]
    try:
        uris = parse_tlsrpt(view.txt[0])
    except ValueError as e:
        return [
            Mark(
                "tlsrpt.record",
                Level.WARN,
                d,
                f"TLS-RPT record {view.txt[0]!r} is malformed: {e}",
                f"publish e.g. {record}",
            )
        ]
    return [Mark("tlsrpt.record", Level.OK, d, f"TLS reports go to {', '.join(uris)}")]
