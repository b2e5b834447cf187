"""RFC 3461 xtext ("+HH" for one octet) and RFC 6533 unitext ("\\x{HHHH}" for one code point), and
what a DSN parameter may carry once decoded: ENVID printable US-ASCII (RFC 3461 §4.4; raw UTF-8 too in
an SMTPUTF8 transaction), an ORCPT address without controls. A value that fails is refused at the
command (501 5.5.4): it could never be written into a DSN without breaking or injecting a line.
"""

from __future__ import annotations

import re

_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_UNITEXT = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
# C0, DEL, C1 and the Unicode line/paragraph separators: what must never reach a header or DSN field
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def decode_xtext(value: str) -> str:
    """ "+HH" to its octet; the octets read as UTF-8 (undecodable ones replaced), other text kept."""
    if "+" not in value:
        return value
    raw = value.encode("utf-8", "surrogateescape")
    out = re.sub(rb"\+([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)
    return out.decode("utf-8", "replace")


def decode_unitext(value: str) -> str:
    """RFC 6533 §3: xtext, plus "\\x{HHHH}" for a code point (utf-8-addr-xtext / -unitext)."""

    def point(m: re.Match[str]) -> str:
        n = int(m.group(1), 16)
        return chr(n) if n <= 0x10FFFF and not 0xD800 <= n <= 0xDFFF else "\ufffd"

    return _UNITEXT.sub(point, decode_xtext(value))


def has_control(text: str) -> bool:
    return bool(_CONTROL.search(text))


def envid_carriable(value: str) -> bool:
    """ENVID decodes to printable US-ASCII; raw (not "+HH"-encoded) UTF-8 passes only in SMTPUTF8
    transactions, which the caller checks before."""
    for m in _HEX.finditer(value):
        if not 0x20 <= int(m.group(1), 16) <= 0x7E:
            return False
    return not has_control(decode_xtext(value))


def orcpt_carriable(addr_type: str, value: str) -> bool:
    """The ORCPT address, decoded as its type says, holds no CR, LF or other control."""
    decoded = decode_unitext(value) if addr_type.lower() == "utf-8" else decode_xtext(value)
    return not has_control(decoded)
