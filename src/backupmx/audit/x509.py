"""Reads the few fields `check` shows from a DER certificate: subject, issuer, validity, DNS names.

The standard library gives parsed fields only for certificates it verified, and `check` must also show
the ones it could not verify (self-signed, expired, another name), so this is a small, strict DER
walker over the X.509 structure (RFC 5280 §4.1). It does not verify anything. Malformed input raises
`ValueError`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from backupmx.audit.views import CertInfo

_ATTR_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.5": "serialNumber",
    "1.2.840.113549.1.9.1": "emailAddress",
    "0.9.2342.19200300.100.1.25": "DC",
}
_SAN = "2.5.29.17"
_SEQUENCE, _SET, _OID, _OCTETS = 0x30, 0x31, 0x06, 0x04
_UTCTIME, _GENTIME = 0x17, 0x18
_STRING_TAGS = {
    0x0C: "utf-8",
    0x13: "ascii",
    0x16: "ascii",
    0x14: "latin-1",
    0x1E: "utf-16-be",
    0x1C: "utf-32-be",
    0x12: "ascii",
    0x1A: "ascii",
}


def parse_certificate(der: bytes) -> CertInfo:
    cert = _only(der, _SEQUENCE)
    tbs_tag, tbs, _ = _tlv(cert, 0)
    if tbs_tag != _SEQUENCE:
        raise ValueError("not an X.509 certificate")
    items = list(_items(tbs))
    if items and items[0][0] == 0xA0:  # [0] EXPLICIT version
        items = items[1:]
    if len(items) < 6:
        raise ValueError("truncated TBSCertificate")
    (
        (_, _serial, _),
        (_, _sig, _),
        (issuer_tag, issuer, issuer_raw),
        (validity_tag, validity, _),
        (subject_tag, subject, subject_raw),
    ) = items[:5]
    if issuer_tag != _SEQUENCE or subject_tag != _SEQUENCE or validity_tag != _SEQUENCE:
        raise ValueError("malformed TBSCertificate")
    times = list(_items(validity))
    if len(times) != 2:
        raise ValueError("malformed validity")
    dns_names: tuple[str, ...] = ()
    for tag, value, _ in items[6:]:
        if tag == 0xA3:  # [3] EXPLICIT extensions
            dns_names = _san_dns_names(_only(value, _SEQUENCE))
    return CertInfo(
        subject=_name(subject),
        issuer=_name(issuer),
        not_before=_time(*times[0][:2]),
        not_after=_time(*times[1][:2]),
        self_signed=issuer_raw == subject_raw,
        dns_names=dns_names,
    )


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, value, next position) of the element at `pos`."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers are not used in certificates")
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos : pos + length], pos + length


def _items(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """The elements of a constructed value: (tag, value, the whole encoding)."""
    out, pos = [], 0
    while pos < len(data):
        start = pos
        tag, value, pos = _tlv(data, pos)
        out.append((tag, value, data[start:pos]))
    return out


def _only(data: bytes, tag: int) -> bytes:
    got, value, _ = _tlv(data, 0)  # bytes after the element are ignored
    if got != tag:
        raise ValueError(f"expected tag {tag:#x}, got {got:#x}")
    return value


def _oid(data: bytes) -> str:
    if not data:
        raise ValueError("empty OID")
    first = data[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for byte in data[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(str(p) for p in parts)


def _name(data: bytes) -> str:
    """An X.501 Name as "CN=..., O=..." in the order it is encoded (as `openssl x509 -noout -subject`)."""
    out = []
    for set_tag, rdn, _ in _items(data):
        if set_tag != _SET:
            raise ValueError("malformed Name")
        for seq_tag, atv, _ in _items(rdn):
            if seq_tag != _SEQUENCE:
                raise ValueError("malformed Name")
            parts = _items(atv)
            if len(parts) != 2 or parts[0][0] != _OID:
                raise ValueError("malformed AttributeTypeAndValue")
            oid = _oid(parts[0][1])
            out.append(f"{_ATTR_NAMES.get(oid, oid)}={_string(parts[1][0], parts[1][1])}")
    return ", ".join(out)


def _string(tag: int, value: bytes) -> str:
    codec = _STRING_TAGS.get(tag)
    if codec is None:
        return "#" + value.hex()
    return value.decode(codec, "replace")


def _time(tag: int, value: bytes) -> datetime:
    text = value.decode("ascii", "replace")
    if tag == _UTCTIME and len(text) == 13 and text.endswith("Z"):
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"  # RFC 5280 §4.1.2.5.1
    elif not (tag == _GENTIME and len(text) == 15 and text.endswith("Z")):
        raise ValueError(f"unsupported time {text!r}")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def _san_dns_names(extensions: bytes) -> tuple[str, ...]:
    for tag, ext, _ in _items(extensions):
        if tag != _SEQUENCE:
            raise ValueError("malformed Extension")
        parts = _items(ext)
        if not parts or parts[0][0] != _OID or _oid(parts[0][1]) != _SAN:
            continue
        octets = parts[-1]
        if octets[0] != _OCTETS:
            raise ValueError("malformed subjectAltName")
        names = _only(octets[1], _SEQUENCE)
        return tuple(v.decode("ascii", "replace") for t, v, _ in _items(names) if t == 0x82)  # [2] dNSName
    return ()
