"""DSNs (RFC 3464) parsed back with the email package; who gets one (RFC 3461 NOTIFY)."""

from __future__ import annotations

import re
from email import policy
from email.message import Message
from email.parser import BytesParser, Parser

import pytest

from backupmx.delivery.bounce import DsnAction, DsnRecipient, build_dsn, decode_xtext, dsn_owed
from backupmx.model import (
    Envelope,
    MessageKind,
    MessageRecord,
    QueueId,
    Recipient,
    RecipientRecord,
    RecipientState,
)
from backupmx.reply import Reply

T0 = 1_700_000_000.0
ORIGINAL = (
    b"Received: from client.test by backup.test\r\nFrom: Bob <bob@sender.test>\r\n"
    b"Subject: hello\r\n\r\nline one\r\n.dotted\r\nlast\r\n"
)


def message(
    *,
    ret: str | None = None,
    envid: str | None = None,
    smtputf8: bool = False,
    sender: str = "bob@Sender.Test",
    kind: MessageKind = MessageKind.USER,
) -> MessageRecord:
    recs = (
        RecipientRecord(
            QueueId("0ABC"),
            0,
            "alice@example.com",
            "example.com",
            RecipientState.QUEUED,
            orcpt="rfc822;alice+2Bsub@example.com",
        ),
        RecipientRecord(QueueId("0ABC"), 1, "carol@example.com", "example.com", RecipientState.QUEUED),
    )
    env = Envelope(
        sender=sender,
        recipients=tuple(Recipient(r.address, orcpt=r.orcpt) for r in recs),
        ret=ret,
        envid=envid,
        smtputf8=smtputf8,
        kind=kind,
    )
    return MessageRecord(QueueId("0ABC"), env, len(ORIGINAL), T0, recs)


def failed(msg: MessageRecord, i: int = 0) -> DsnRecipient:
    return DsnRecipient(
        msg.recipients[i],
        DsnAction.FAILED,
        "5.1.1",
        Reply(550, "5.1.1", "<alice@example.com>: Recipient address rejected: User unknown in virtual mailbox table"),
        "mx1.example.com",
        T0 + 60,
    )


def parse(body: bytes) -> Message:
    return BytesParser(policy=policy.default).parsebytes(body)


def no_bare_newlines(body: bytes) -> bool:
    return re.search(rb"(?<!\r)\n", body) is None and re.search(rb"\r(?!\n)", body) is None


def test_failure_dsn_structure() -> None:
    msg = message(envid="env+2B1")
    dsn = build_dsn(msg, [failed(msg)], original=ORIGINAL, reporting_mta="backup.test", now=T0 + 120)
    assert dsn.envelope.sender == "" and dsn.envelope.kind is MessageKind.DSN
    assert [r.address for r in dsn.envelope.recipients] == ["bob@sender.test"]
    assert no_bare_newlines(dsn.body)
    top = parse(dsn.body)
    assert top.get_content_type() == "multipart/report"
    assert top.get_param("report-type") == "delivery-status"
    assert top["To"].addresses[0].addr_spec == "bob@Sender.Test"
    assert "MAILER-DAEMON@backup.test" in top["From"]
    assert top["Auto-Submitted"] == "auto-replied"
    parts = top.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "User unknown" in parts[0].get_content()
    blocks = parts[1].get_payload()
    per_msg, per_rcpt = blocks[0], blocks[1]
    assert per_msg["Reporting-MTA"] == "dns; backup.test"
    assert per_msg["Original-Envelope-Id"] == "env+1"
    assert per_msg["Arrival-Date"]
    assert per_rcpt["Final-Recipient"] == "rfc822; alice@example.com"
    assert per_rcpt["Original-Recipient"] == "rfc822; alice+sub@example.com"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.example.com"
    assert str(per_rcpt["Diagnostic-Code"]).startswith("smtp; 550 5.1.1 <alice@example.com>: Recipient")
    assert "User unknown in virtual mailbox table" in str(per_rcpt["Diagnostic-Code"])
    assert per_rcpt["Last-Attempt-Date"]
    headers = parts[2].get_payload()
    assert "Subject: hello" in headers and "line one" not in headers


def test_ret_full_includes_message_verbatim() -> None:
    msg = message(ret="FULL")
    dsn = build_dsn(msg, [failed(msg), failed(msg, 1)], original=ORIGINAL, reporting_mta="backup.test", now=T0)
    assert ORIGINAL in dsn.body  # byte for byte
    parts = parse(dsn.body).get_payload()
    assert parts[2].get_content_type() == "message/rfc822"
    inner = parts[2].get_payload()[0]
    assert inner["Subject"] == "hello"
    assert len(parts[1].get_payload()) == 3  # per-message block + two recipients


def test_expiry_dsn() -> None:
    msg = message()
    r = DsnRecipient(msg.recipients[0], DsnAction.FAILED, "4.4.7", None, None, T0 + 10)
    dsn = build_dsn(msg, [r], original=ORIGINAL, reporting_mta="backup.test", now=T0 + 30 * 86400)
    parts = parse(dsn.body).get_payload()
    block = parts[1].get_payload()[1]
    assert block["Status"] == "4.4.7" and block["Action"] == "failed"
    assert block["Diagnostic-Code"] is None
    assert "delivery time expired" in parts[0].get_content()


def test_delay_dsn_text_says_outage_and_safe() -> None:
    msg = message()
    r = DsnRecipient(msg.recipients[0], DsnAction.DELAYED, "4.4.1", None, None, T0, will_retry_until=T0 + 30 * 86400)
    dsn = build_dsn(msg, [r], original=ORIGINAL, reporting_mta="backup.test", now=T0 + 3600)
    top = parse(dsn.body)
    assert "Delayed" in top["Subject"]
    parts = top.get_payload()
    text = parts[0].get_content()
    assert "outage" in text and "safe" in text and "will be delivered" in text
    block = parts[1].get_payload()[1]
    assert block["Action"] == "delayed" and block["Will-Retry-Until"]


def test_smtputf8_uses_global_types_and_8bit() -> None:
    msg = message(smtputf8=True, sender="jöe@sender.test")
    original = "Subject: é\r\n\r\nbody\r\n".encode()
    dsn = build_dsn(msg, [failed(msg)], original=original, reporting_mta="backup.test", now=T0)
    assert dsn.envelope.smtputf8 and no_bare_newlines(dsn.body)
    parts = parse(dsn.body).get_payload()
    assert parts[1].get_content_type() == "message/global-delivery-status"
    assert parts[2].get_content_type() == "message/global-headers"
    assert "Subject: é".encode() in dsn.body


def test_8bit_original_marks_dsn_8bitmime() -> None:
    msg = message(ret="FULL")
    original = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"
    dsn = build_dsn(msg, [failed(msg)], original=original, reporting_mta="backup.test", now=T0)
    assert dsn.envelope.body_type == "8BITMIME"
    assert original in dsn.body


def test_bare_newlines_in_original_never_reach_the_dsn() -> None:
    msg = message(ret="FULL")
    dsn = build_dsn(msg, [failed(msg)], original=b"Subject: x\n\nbare\rcr\n", reporting_mta="b.test", now=T0)
    assert no_bare_newlines(dsn.body)


@pytest.mark.parametrize(
    ("sender", "kind", "notify", "action", "owed"),
    [
        ("bob@s.test", MessageKind.USER, None, DsnAction.FAILED, True),
        ("", MessageKind.USER, None, DsnAction.FAILED, False),  # never to <>
        ("bob@s.test", MessageKind.DSN, None, DsnAction.FAILED, False),  # never about a DSN
        ("bob@s.test", MessageKind.CANARY, None, DsnAction.FAILED, False),
        ("bob@s.test", MessageKind.USER, ("NEVER",), DsnAction.FAILED, False),
        ("bob@s.test", MessageKind.USER, ("SUCCESS",), DsnAction.FAILED, False),
        ("bob@s.test", MessageKind.USER, ("FAILURE",), DsnAction.FAILED, True),
        ("bob@s.test", MessageKind.USER, None, DsnAction.DELAYED, True),
        ("bob@s.test", MessageKind.USER, ("FAILURE",), DsnAction.DELAYED, False),
        ("bob@s.test", MessageKind.USER, ("DELAY", "FAILURE"), DsnAction.DELAYED, True),
        ("bob@s.test", MessageKind.USER, None, DsnAction.RELAYED, False),
        ("bob@s.test", MessageKind.USER, ("SUCCESS",), DsnAction.RELAYED, True),
        ("bob@s.test", MessageKind.USER, ("success", "failure"), DsnAction.RELAYED, True),
    ],
)
def test_dsn_owed(
    sender: str, kind: MessageKind, notify: tuple[str, ...] | None, action: DsnAction, owed: bool
) -> None:
    assert dsn_owed(Envelope(sender=sender, recipients=(), kind=kind), notify, action) is owed


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [("abc", "abc"), ("a+2Bb", "a+b"), ("a+3Db", "a=b"), ("trail+", "trail+"), ("+2", "+2")],
)
def test_xtext(raw: str, decoded: str) -> None:
    assert decode_xtext(raw) == decoded


def test_utf8_sender_to_is_raw_utf8_not_an_encoded_word() -> None:
    """Issue 12 item 9: RFC 6532 §3.2 lets a message/global DSN carry the address as raw UTF-8."""
    msg = message(smtputf8=True, sender="j\u00f6rg@b\u00fccher.test")
    dsn = build_dsn(msg, [failed(msg)], original=ORIGINAL, reporting_mta="backup.test", now=T0)
    assert "\r\nTo: <j\u00f6rg@b\u00fccher.test>\r\n".encode() in dsn.body
    assert b"=?utf-8?" not in dsn.body.split(b"\r\n\r\n", 1)[0]
    # the stdlib's BytesParser reads 8-bit headers as surrogates; the text parser reads UTF-8
    top = Parser(policy=policy.default).parsestr(dsn.body.decode("utf-8"))
    assert top["To"].addresses[0].addr_spec == "j\u00f6rg@b\u00fccher.test"
    assert [r.address for r in dsn.envelope.recipients] == ["j\u00f6rg@b\u00fccher.test"]


def test_minimal_dsn_when_the_full_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever slips past the cleaning, a DSN is still built: the minimal all-ASCII one."""
    import backupmx.delivery.bounce as bounce

    def boom(*_a: object, **_k: object) -> bytes:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(bounce, "_full_dsn", boom)
    msg = message(smtputf8=True, sender="j\u00f6rg@b\u00fccher.test")
    rec = DsnRecipient(
        RecipientRecord(QueueId("0ABC"), 0, "\u00fc\r\nX: y@example.com", "example.com", RecipientState.QUEUED),
        DsnAction.FAILED,
        "5.1.1",
        Reply(550, "5.1.1", "f\u00fcr\r\nX-Injected: 1"),
    )
    dsn = build_dsn(msg, [rec], original=ORIGINAL, reporting_mta="backup.test", now=T0)
    assert no_bare_newlines(dsn.body)
    top = parse(dsn.body)
    assert top.get_content_type() == "multipart/report" and not top.defects
    assert set(top.keys()) == {
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "Auto-Submitted",
        "MIME-Version",
        "Content-Type",
    }
    parts = top.get_payload()
    assert isinstance(parts, list) and parts[1].get_content_type() == "message/delivery-status"
    block = parts[1].get_payload()[1]
    assert block["Final-Recipient"] == "utf-8; \\x{FC}\\x{D}\\x{A}X:\\x{20}y@example.com"
    assert block["Action"] == "failed" and block["Status"] == "5.1.1"
    assert b"\r\nX-Injected" not in dsn.body
