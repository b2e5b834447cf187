"""Delivery status notifications (RFC 3464) built with the stdlib email package.

`dsn_owed` decides whether a notification is owed at all (never to `<>`, never for a DSN or a canary,
NOTIFY per RFC 3461); `build_dsn` returns a NewMessage from `<>` to the envelope sender, which the
engine queues in the same `spool.record` commit as the outcome it reports. The result always has CRLF
line endings and no bare CR or LF. Building never raises for odd input: a body without a header/body
separator is treated as all headers, 8-bit bytes pass through (the DSN is then marked 8BITMIME), no
envelope or reply value can put a line break into a header or DSN field (controls become spaces), and
should anything still fail, a minimal all-ASCII DSN is built instead (`_minimal_dsn`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, make_msgid
from enum import StrEnum

from backupmx.model import Envelope, MessageKind, MessageRecord, Recipient, RecipientRecord
from backupmx.reply import Reply
from backupmx.smtp.xtext import decode_unitext, decode_xtext, has_control
from backupmx.spool import NewMessage, Spool

__all__ = ["DsnAction", "DsnRecipient", "build_dsn", "decode_xtext", "dsn_owed"]

log = logging.getLogger(__name__)

FULL_LIMIT = 10 * 1024 * 1024  # RET=FULL above this returns the headers only (as Postfix does)
_POLICY = email_policy.SMTP.clone(max_line_length=78)


class DsnAction(StrEnum):
    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"  # handed to a primary that does not offer DSN, and NOTIFY had SUCCESS
    EXPANDED = "expanded"


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient's block in a DSN."""

    record: RecipientRecord
    action: DsnAction
    status: str  # RFC 3463, "5.1.1"
    diagnostic: Reply | None = None  # the remote server's reply, verbatim (Diagnostic-Code)
    remote_mta: str | None = None  # host name of the server that gave `diagnostic`
    last_attempt_at: float | None = None
    will_retry_until: float | None = None  # for DELAYED
    detail: str = ""  # one line for the human-readable part when there is no remote reply


def dsn_owed(envelope: Envelope, notify: tuple[str, ...] | None, action: DsnAction) -> bool:
    """RFC 3461 NOTIFY, plus the rules that prevent loops: nothing to `<>`, nothing about a DSN."""
    if not envelope.sender or envelope.kind is not MessageKind.USER:
        return False
    flags = {n.upper() for n in notify} if notify else None
    if flags is not None and "NEVER" in flags:
        return False
    if action is DsnAction.FAILED:
        return flags is None or "FAILURE" in flags
    if action is DsnAction.DELAYED:
        return flags is None or "DELAY" in flags  # without NOTIFY, delay notices are our option
    return flags is not None and "SUCCESS" in flags  # delivered / relayed / expanded


HEADERS_LIMIT = 1024 * 1024  # a DSN without RET=FULL quotes at most this much of the header section


async def original_for_dsn(spool: Spool, message: MessageRecord) -> bytes:
    """What a DSN about `message` quotes, read from the spool without loading a large body whole:
    the message itself for RET=FULL up to FULL_LIMIT, else the header section (at most HEADERS_LIMIT,
    the reading stops at its end). Empty when the body cannot be read: the DSN goes out without it."""
    whole = (message.envelope.ret or "").upper() == "FULL" and message.size <= FULL_LIMIT
    limit = FULL_LIMIT if whole else HEADERS_LIMIT
    got = bytearray()
    try:
        async for chunk in spool.iter_body(message.id, 256 * 1024):
            got += chunk
            if len(got) >= limit or (not whole and b"\r\n\r\n" in got):
                break
    except Exception:
        log.warning("%s: body unreadable for the DSN; it is sent without the original", message.id, exc_info=True)
        return b""
    return bytes(got) if whole else _headers_of(bytes(got[:limit]))


def build_dsn(
    message: MessageRecord, recipients: Sequence[DsnRecipient], *, original: bytes, reporting_mta: str, now: float
) -> NewMessage:
    """A multipart/report DSN about `recipients` of `message`, addressed to its envelope sender.
    Never raises for what the message or a primary carried: the full DSN, or the minimal one."""
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    try:
        body = _full_dsn(message, recipients, original=original, reporting_mta=reporting_mta, now=now)
    except Exception:  # whatever slipped past the cleaning: the sender still hears of it
        log.exception("DSN for %s: the full report failed to build, sending the minimal one", message.id)
        body = _minimal_dsn(message, recipients, reporting_mta=reporting_mta, now=now)
    env = message.envelope
    sender_local, _, sender_domain = env.sender.rpartition("@")
    to = f"{sender_local}@{sender_domain.lower()}" if sender_local else env.sender
    dsn_env = Envelope(
        sender="",
        recipients=(Recipient(address=to),),
        body_type="8BITMIME" if any(b >= 0x80 for b in body) else None,
        smtputf8=env.smtputf8,
        kind=MessageKind.DSN,
    )
    return NewMessage(envelope=dsn_env, body=body)


def _full_dsn(
    message: MessageRecord, recipients: Sequence[DsnRecipient], *, original: bytes, reporting_mta: str, now: float
) -> bytes:
    env = message.envelope
    utf8 = env.smtputf8
    actions = {r.action for r in recipients}
    mta = _clean(reporting_mta)
    outer = MIMEMultipart("report", report_type="delivery-status", policy=_POLICY)
    outer.preamble = "This is a MIME-encapsulated message."

    text = _human_text(message, recipients, mta)
    outer.attach(_text_part(text, "plain"))

    blocks = _status_blocks(message, recipients, mta, utf8)
    if utf8:
        # RFC 6533; the stdlib has no writer for this type, so the fields are rendered here
        outer.attach(_verbatim_part("message", "global-delivery-status", _render_blocks(blocks)))
    else:
        status = MIMEBase("message", "delivery-status", policy=_POLICY)
        del status["MIME-Version"]
        status.set_payload([_block_message(b) for b in blocks])
        outer.attach(status)

    full = DsnAction.FAILED in actions and (env.ret or "").upper() == "FULL" and len(original) <= FULL_LIMIT
    if full:
        outer.attach(_verbatim_part("message", "global" if utf8 else "rfc822", _with_final_crlf(original)))
    else:
        headers = _headers_of(original)
        if utf8:
            outer.attach(_verbatim_part("message", "global-headers", headers))
        else:
            outer.attach(_verbatim_part("text", "rfc822-headers", headers))

    buf = io.BytesIO()
    _Generator(buf, policy=_POLICY).flatten(outer)
    return _top_headers(message, actions, mta, now) + buf.getvalue()


def _top_headers(message: MessageRecord, actions: set[DsnAction], mta: str, now: float) -> bytes:
    """From/To/Subject/Date/Message-ID, written here and not through the email package's header
    registry: it turns a UTF-8 address into an encoded-word (invalid inside an address) and re-parses
    odd but valid quoted local parts. To is the envelope sender verbatim: raw UTF-8 for an SMTPUTF8
    message (RFC 6532 §3.2), with any control made a space (the SMTP parser never lets one through)."""
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{_clean(message.envelope.sender)}>",
        f"Subject: {_subject(actions)}",
        f"Date: {_date(now)}",
        f"Message-ID: {make_msgid(idstring=_ascii(str(message.id)), domain=_ascii(mta))}",
        "Auto-Submitted: auto-replied",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def _minimal_dsn(
    message: MessageRecord, recipients: Sequence[DsnRecipient], *, reporting_mta: str, now: float
) -> bytes:
    """The fallback: plain string work only, every value cleaned and (but for To) made ASCII; the
    addresses in RFC 6533 utf-8-addr-xtext form, so the report still names who failed."""
    mta = _ascii(_clean(reporting_mta))
    boundary = f"backupmx-minimal-{_ascii(str(message.id))}"
    fields = [f"Reporting-MTA: dns; {mta}", f"Arrival-Date: {_date(message.received_at)}", ""]
    text = [f"This is the mail system at host {mta}.", "", "This is a delivery status report about your message:", ""]
    for r in recipients:
        addr = _unitext(r.record.address)
        detail = _ascii(_one_line(str(r.diagnostic))) if r.diagnostic is not None else r.action.value
        text.append(f"<{addr}>: {r.action.value} ({_ascii(r.status)}) {detail}")
        fields += [
            f"Final-Recipient: utf-8; {addr}",
            f"Action: {r.action.value}",
            f"Status: {_ascii(_clean(r.status))}",
            "",
        ]
    parts = [
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *text,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *fields,
        f"--{boundary}--",
        "",
    ]
    head = _top_headers(message, {r.action for r in recipients}, mta, now)
    mime = (
        f"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n"
        f' boundary="{boundary}"\r\n\r\n'
    )
    return head + mime.encode("ascii") + "\r\n".join(parts).encode("ascii", "replace")


class _Generator(BytesGenerator):
    """BytesGenerator writes headers and text with surrogateescape but encodes a message/* part's
    string payload as strict ASCII; 8-bit originals (and SMTPUTF8 reports) need the same escape."""

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


# --- parts -------------------------------------------------------------------------------------------
def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _subject(actions: set[DsnAction]) -> str:
    if DsnAction.FAILED in actions:
        return "Undelivered Mail Returned to Sender"
    if DsnAction.DELAYED in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _human_text(message: MessageRecord, recipients: Sequence[DsnRecipient], mta: str) -> str:
    lines = [f"This is the mail system at host {mta}.", ""]
    actions = {r.action for r in recipients}
    if DsnAction.FAILED in actions:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
        ]
    if DsnAction.DELAYED in actions:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "The recipient's mail server is in an outage. Your message is safe:",
            f"it is held by the backup mail server {mta} and will be delivered",
            "as soon as the recipient's server is back. Nothing is lost.",
            "",
        ]
    if actions & {DsnAction.RELAYED, DsnAction.DELIVERED, DsnAction.EXPANDED}:
        lines += [
            "Your message was successfully delivered to the destination(s)",
            "listed below. If the message was delivered to a mail server that",
            "does not support delivery status notifications, you will receive",
            "no further notifications.",
            "",
        ]
    lines.append(f"Queue ID: {message.id}")
    lines.append("")
    for r in recipients:
        if r.diagnostic is not None:
            where = f"host {r.remote_mta} said: " if r.remote_mta else ""
            reason = f"{where}{_one_line(str(r.diagnostic))}"
        else:
            reason = r.detail or _default_detail(r)
        lines.append(_clean(f"<{r.record.address}>: {reason}"))
    return "\n".join(lines) + "\n"


def _default_detail(r: DsnRecipient) -> str:
    if r.status == "4.4.7":
        return "delivery time expired"
    if r.action is DsnAction.DELAYED:
        return "delivery temporarily suspended: the recipient's mail server is in an outage"
    if r.action is DsnAction.RELAYED:
        return "relayed to a mail server that does not offer delivery status notifications"
    return r.action.value


_Block = list[tuple[str, str]]


def _status_blocks(message: MessageRecord, recipients: Sequence[DsnRecipient], mta: str, utf8: bool) -> list[_Block]:
    env = message.envelope
    blocks: list[_Block] = []
    head = [("Reporting-MTA", f"dns; {mta}"), ("X-Backupmx-Queue-ID", str(message.id))]
    if env.envid:
        head.append(("Original-Envelope-Id", decode_xtext(env.envid)))
    head.append(("Arrival-Date", _date(message.received_at)))
    blocks.append(head)
    addr_type = "utf-8" if utf8 else "rfc822"
    for r in recipients:
        block = [("Final-Recipient", f"{addr_type}; {r.record.address}")]
        if r.record.orcpt:
            kind, _, raw = r.record.orcpt.partition(";")
            decoded = decode_unitext(raw.strip()) if kind.strip().lower() == "utf-8" else decode_xtext(raw.strip())
            block.append(("Original-Recipient", f"{kind.strip()}; {decoded}"))
        block.append(("Action", r.action.value))
        block.append(("Status", r.status))
        if r.remote_mta:
            block.append(("Remote-MTA", f"dns; {r.remote_mta}"))
        if r.diagnostic is not None:
            block.append(("Diagnostic-Code", f"smtp; {_one_line(str(r.diagnostic))}"))
        if r.last_attempt_at is not None:
            block.append(("Last-Attempt-Date", _date(r.last_attempt_at)))
        if r.will_retry_until is not None and r.action is DsnAction.DELAYED:
            block.append(("Will-Retry-Until", _date(r.will_retry_until)))
        blocks.append(block)
    # one field, one line: no value from the envelope or a reply may break or add a line
    fit = _clean if utf8 else _ascii
    return [[(name, fit(value)) for name, value in block] for block in blocks]


def _block_message(block: _Block) -> Message:
    msg = Message(policy=_POLICY)
    for name, value in block:
        msg[name] = value
    return msg


def _render_blocks(blocks: list[_Block]) -> bytes:
    out: list[str] = []
    for block in blocks:
        for name, value in block:
            out.append(_fold(f"{name}: {value}"))
        out.append("")
    return "\r\n".join(out).encode("utf-8")


def _text_part(text: str, subtype: str) -> Message:
    if text.isascii():
        part = MIMEText(text, subtype, "us-ascii", policy=_POLICY)
    else:
        cs = Charset("utf-8")
        cs.body_encoding = QP
        part = MIMEText("", subtype, policy=_POLICY)
        part.set_payload(text, cs)
    del part["MIME-Version"]
    return part


def _verbatim_part(maintype: str, subtype: str, data: bytes) -> Message:
    """A part whose payload is written byte for byte (CRLF already in place): the generator emits a
    string payload of a message/* part unchanged, and surrogateescape carries 8-bit bytes through."""
    part = MIMEBase(maintype, subtype, policy=_POLICY)
    del part["MIME-Version"]
    part.set_payload(_crlf_only(data).decode("ascii", "surrogateescape"))
    if any(b >= 0x80 for b in data):
        part["Content-Transfer-Encoding"] = "8bit"
    return part


def _headers_of(original: bytes) -> bytes:
    end = original.find(b"\r\n\r\n")
    head = original if end < 0 else original[: end + 2]
    return _with_final_crlf(head)


def _with_final_crlf(data: bytes) -> bytes:
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _crlf_only(data: bytes) -> bytes:
    """Normalise any bare CR or LF (the spool never stores them, but a DSN must not carry one)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _one_line(text: str) -> str:
    return " ".join(text.replace("\r", " ").split("\n"))


def _fold(line: str, width: int = 78) -> str:
    """Fold a header line at spaces (RFC 5322 §2.2.3) with CRLF + space."""
    if len(line) <= width:
        return line
    out: list[str] = []
    current = ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\r\n".join(out)


def _clean(text: str) -> str:
    """Every control (CR, LF, NUL, C1, U+2028/9, all of which some parser takes as a line break) made a
    space, and lone surrogates replaced: a value fit for one header or DSN field line."""
    if has_control(text):
        text = "".join(" " if has_control(c) else c for c in text)
    return text.encode("utf-8", "replace").decode("utf-8")


def _ascii(text: str) -> str:
    return _clean(text).encode("ascii", "backslashreplace").decode("ascii")


def _unitext(address: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: printable ASCII kept, "+", "\\", "=" and the rest as \\x{HH}."""
    return "".join(c if "!" <= c <= "~" and c not in "+\\=" else f"\\x{{{ord(c):X}}}" for c in address)
