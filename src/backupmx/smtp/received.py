"""The one header we write: `Received:` (RFC 5321 §4.4), prepended to the stored message.

    Received: from <helo> (<ip-literal> [<ip>])
    <TAB>(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))      only after STARTTLS
    <TAB>by <hostname> (backupmx <node>) with ESMTP[S] id <QUEUEID>
    <TAB>for <rcpt>; <RFC 5322 date>

`<ip-literal>` is the client's address as an RFC 5321 address literal (`[192.0.2.1]`,
`[IPv6:2001:db8::1]`; we do no reverse DNS); `for` appears only with exactly one recipient. The HELO
name is used as given when it is a domain or an address literal; otherwise every character outside a
small safe set is replaced by `_`, so nothing a client sends can add a line or a header.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from datetime import UTC, datetime
from email.utils import format_datetime

from backupmx.smtp.address import is_helo_name

_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_]")


def safe_helo(name: str) -> str:
    if name and is_helo_name(name):
        return name
    cleaned = _UNSAFE.sub("_", name)[:255]
    return cleaned or "unknown"


def _safe_token(text: str) -> str:
    return _UNSAFE.sub("_", text)[:255] or "unknown"


@functools.lru_cache(maxsize=1024)
def address_literal(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "[unknown]"
    return f"[IPv6:{addr.compressed}]" if addr.version == 6 else f"[{addr}]"


def protocol_name(*, extended: bool, tls: bool, smtputf8: bool) -> str:
    """RFC 3848 / RFC 6531 `with` keywords."""
    base = "UTF8SMTP" if smtputf8 else "ESMTP" if extended else "SMTP"
    return base + ("S" if tls else "")


def tls_comment(version: str | None, cipher: str | None, bits: int | None) -> str:
    """`using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits)`, in the habit of Postfix."""
    text = f"using {_safe_token(version or 'TLS')}"
    if cipher:
        text += f" with cipher {_safe_token(cipher)}"
        if bits:
            text += f" ({int(bits)} bits)"
    return text


# The parts that repeat from message to message are cached: on a busy connection or server they are
# the same client, HELO and host, and the date changes once a second; parsing the address and formatting
# the date for every message took ~6 % of the accept path's Python time (bench/profile.py).
@functools.lru_cache(maxsize=1024)
def _from_part(helo: str, client_ip: str) -> str:
    try:
        shown_ip = str(ipaddress.ip_address(client_ip))
    except ValueError:
        shown_ip = "unknown"
    return f"Received: from {safe_helo(helo)} ({address_literal(client_ip)} [{shown_ip}])"


@functools.lru_cache(maxsize=16)
def _by_part(hostname: str, node: str) -> str:
    return f"\tby {_safe_token(hostname)} (backupmx {_safe_token(node)}) with "


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    node: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    when: float,
    tls: str | None = None,
) -> bytes:
    date = _date(int(when // 1))  # RFC 5322 dates have whole seconds: format_datetime drops the rest
    lines = [
        _from_part(helo, client_ip),
        *([f"\t({tls})"] if tls else []),
        f"{_by_part(hostname, node)}{protocol} id {queue_id}",
    ]
    if len(recipients) == 1:
        # the address came through the strict parser: no CR, LF or control character is possible
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
