"""RFC 5321 §4.1.2 paths and ESMTP parameters, parsed strictly (RFC 6531 UTF-8 only when asked).

What is refused, and with which reply (the protocol picks the reply from the error's `kind` and the
role, so the choice lives here, in one table):

    kind        sender (MAIL FROM)                   recipient (RCPT TO)
    SYNTAX      501 5.1.7 Bad sender address syntax  501 5.1.3 Bad recipient address syntax
    TOO_LONG    553 5.1.7 ... too long               553 5.1.3 ... too long
                (local part > 64, domain > 255 or the whole path > 256 octets, RFC 5321 §4.5.3.1)
    UTF8        553 5.6.7 ... (non-ASCII address without SMTPUTF8 on the MAIL command, RFC 6531 §3.5)

SYNTAX covers: no angle brackets, unbalanced or nested brackets, `<user>` with no domain (only
`<postmaster>` is allowed, and only at RCPT), comments, control characters, `u@@d`, empty atoms, a
trailing dot in the domain, and `<>` at RCPT. A source route (`<@a,@b:u@d>`) is checked and dropped: the
final mailbox is what counts. A quoted local part is kept as written and treated as opaque. An IP literal
domain is parsed and kept in brackets (relay control refuses it). The domain is lower-cased; the local
part keeps its case. Nothing here raises for bad input except `AddressError`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressErrorKind(StrEnum):
    SYNTAX = "syntax"
    TOO_LONG = "too-long"
    UTF8 = "utf8"


class AddressError(ValueError):
    def __init__(self, kind: AddressErrorKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Mailbox:
    local: str  # as written (quotes kept)
    domain: str  # lower-cased; "[1.2.3.4]" for a literal; "" only for the bare <postmaster>

    @property
    def is_ip_literal(self) -> bool:
        return self.domain.startswith("[")

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


# --- grammar (RFC 5321 §4.1.2, RFC 6531 §3.3 for the UTF-8 variants) --------------------------------
_U = "\u0080-\U0010ffff"  # UTF8-non-ascii (decoded)
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_QTEXT = r"\x20\x21\x23-\x5b\x5d-\x7e"


def _grammar(utf8: bool) -> tuple[re.Pattern[str], re.Pattern[str]]:
    u = _U if utf8 else ""
    atom = f"[{_ATEXT}{u}]+"
    dot_string = f"{atom}(?:\\.{atom})*"
    quoted = f'"(?:[{_QTEXT}{u}]|\\\\[\\x20-\\x7e])*"'
    let_dig = f"[A-Za-z0-9{u}]"
    sub_domain = f"{let_dig}(?:[A-Za-z0-9\\-{u}]*{let_dig})?"
    domain = f"{sub_domain}(?:\\.{sub_domain})*"
    literal = r"\[[\x21-\x5a\x5e-\x7e]+\]"  # dcontent; checked further by _literal_ok
    route = f"@{domain}(?:,@{domain})*:"
    path = re.compile(f"(?P<route>{route})?(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{literal})")
    return path, re.compile(domain)


_PATH_ASCII, _DOMAIN_ASCII = _grammar(False)
_PATH_UTF8, _DOMAIN_UTF8 = _grammar(True)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _literal_ok(lit: str) -> bool:
    inner = lit[1:-1]
    tag, colon, rest = inner.partition(":")
    if not colon:
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            return False
        return True
    if tag.lower() == "ipv6":
        try:
            ipaddress.IPv6Address(rest)
        except ValueError:
            return False
        return True
    # General-address-literal: Standardized-tag ":" 1*dcontent
    return bool(re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?", tag)) and bool(rest)


def split_path(arg: str) -> tuple[str, str]:
    """`<path> PARAMS` -> ("<path>", "PARAMS"). The path must be in angle brackets; a `>` inside a quoted
    local part does not end it. Spaces before the `<` are tolerated (common, harmless)."""
    text = arg.lstrip(" ")
    if not text.startswith("<"):
        raise AddressError(AddressErrorKind.SYNTAX, "missing angle brackets")
    i, n, quoted = 1, len(text), False
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            raise AddressError(AddressErrorKind.SYNTAX, "nested angle bracket")
        elif c == ">":
            rest = text[i + 1 :]
            if rest and not rest.startswith(" "):
                raise AddressError(AddressErrorKind.SYNTAX, "text after the closing bracket")
            return text[: i + 1], rest.strip(" ")
        i += 1
    raise AddressError(AddressErrorKind.SYNTAX, "unbalanced angle brackets")


def parse_path(path: str, *, null_ok: bool, postmaster_ok: bool, utf8: bool) -> Mailbox | None:
    """Parse "<...>" (as returned by split_path). Returns None for the null path `<>` (when null_ok)."""
    if not (path.startswith("<") and path.endswith(">")) or len(path) < 2:
        raise AddressError(AddressErrorKind.SYNTAX, "missing angle brackets")
    inner = path[1:-1]
    if _CONTROL.search(inner):
        raise AddressError(AddressErrorKind.SYNTAX, "control character")
    if not inner:
        if null_ok:
            return None
        raise AddressError(AddressErrorKind.SYNTAX, "null path not allowed here")
    if not inner.isascii() and not utf8:
        raise AddressError(AddressErrorKind.UTF8, "non-ASCII address without SMTPUTF8")
    if len(path.encode("utf-8")) > MAX_PATH:
        raise AddressError(AddressErrorKind.TOO_LONG, "path too long")
    if postmaster_ok and inner.lower() == "postmaster":
        return Mailbox(inner, "")
    m = (_PATH_UTF8 if utf8 else _PATH_ASCII).fullmatch(inner)
    if m is None:
        raise AddressError(AddressErrorKind.SYNTAX, "not a mailbox")
    local, domain = m.group("local"), m.group("domain")
    if domain.startswith("[") and not _literal_ok(domain):
        raise AddressError(AddressErrorKind.SYNTAX, "bad address literal")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError(AddressErrorKind.TOO_LONG, "local part too long")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError(AddressErrorKind.TOO_LONG, "domain too long")
    return Mailbox(local, domain.lower())


# --- ESMTP parameters (RFC 5321 §4.1.2 Mail-parameters / Rcpt-parameters) ---------------------------
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_VALUE_ASCII = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_VALUE_UTF8 = re.compile(f"[\\x21-\\x3c\\x3e-\\x7e{_U}]+")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")


def parse_params(text: str, *, utf8: bool = False) -> list[tuple[str, str | None]]:
    """ "SIZE=100 BODY=8BITMIME" -> [("SIZE", "100"), ("BODY", "8BITMIME")]; keywords upper-cased."""
    out: list[tuple[str, str | None]] = []
    for item in text.split(" "):
        if not item:
            continue  # tolerate doubled spaces
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key):
            raise AddressError(AddressErrorKind.SYNTAX, f"bad parameter {item!r}")
        if eq:
            if not (_VALUE_UTF8 if utf8 else _VALUE_ASCII).fullmatch(value):
                raise AddressError(AddressErrorKind.SYNTAX, f"bad parameter value {item!r}")
            out.append((key.upper(), value))
        else:
            out.append((key.upper(), None))
    return out


def is_xtext(value: str, *, utf8: bool = False) -> bool:
    """RFC 3461 xtext (RFC 6533 lets UTF-8 through when the transaction is SMTPUTF8)."""
    if utf8 and not value.isascii():
        value = "".join(c for c in value if c.isascii())
    return bool(_XTEXT.fullmatch(value))


def is_helo_name(name: str) -> bool:
    """A domain or an address literal, as RFC 5321 §4.1.1.1 asks of EHLO/HELO."""
    if name.startswith("["):
        return name.endswith("]") and _literal_ok(name)
    return len(name) <= MAX_DOMAIN and bool(_DOMAIN_ASCII.fullmatch(name))
